"""Reading checkpoints: every supported form, planted values read back exactly, bad input refused."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from forgetdiag import CheckpointError, check_sequence, find_checkpoints, find_sequence
from forgetdiag.architectures import family_for, parse_name
from forgetdiag.parts import matrix_parts
from forgetdiag.streaming import stream_tensors, stream_updates

from helpers import build, save


def _state(path):
    return load_file(str(path / "model.safetensors"))


def test_model_dir_reads_every_tensor_exactly(llama_dir):
    (ckpt,) = find_checkpoints(llama_dir)
    assert ckpt.format == "safetensors" and ckpt.family.name == "llama"
    assert ckpt.n_layers == 2 and ckpt.hidden_size == 32 and ckpt.tokenizer_dir == llama_dir
    stored = _state(llama_dir)
    assert sorted(ckpt.names) == sorted(stored)
    for name, tensor in stored.items():
        assert torch.equal(ckpt.get(name), tensor.float())
    assert ckpt.n_params == sum(t.numel() for t in stored.values())


def test_sharded_equals_single_file(llama_dir, sharded_dir):
    (single,), (sharded,) = find_checkpoints(llama_dir), find_checkpoints(sharded_dir)
    assert len(sharded.weight_files) > 1
    assert sorted(single.names) == sorted(sharded.names)
    for name in single.names:
        assert torch.equal(single.get(name), sharded.get(name))


def test_half_precision_is_read_as_float32(half_dir):
    (ckpt,) = find_checkpoints(half_dir)
    stored = _state(half_dir)
    dtype = next(iter(stored.values())).dtype
    assert dtype in (torch.float16, torch.bfloat16)
    assert ckpt.dtypes == [str(dtype).removeprefix("torch.")]
    for name, tensor in stored.items():
        value = ckpt.get(name)
        assert value.dtype == torch.float32 and torch.equal(value, tensor.float())


def test_trainer_run_is_ordered_by_step_and_its_pickles_never_loaded(trainer_run):
    checkpoints = find_checkpoints(trainer_run)
    assert [c.label for c in checkpoints] == ["checkpoint-5", "checkpoint-50", "checkpoint-100"]
    assert [c.step for c in checkpoints] == [5, 50, 100]
    for c in checkpoints:
        c.get(c.names[0])
    check_sequence(checkpoints)
    assert not (trainer_run.parent / "UNPICKLED").exists()


def test_layer_index_is_parsed_whole(llama12_dir):
    (ckpt,) = find_checkpoints(llama12_dir)
    layers = {ckpt.parse(n).layer for n in ckpt.names}
    assert layers == set(range(12)) | {None}
    for name in ckpt.names:
        match = re.search(r"\.layers\.(\d+)\.", name)
        assert ckpt.parse(name).layer == (int(match.group(1)) if match else None)
    layer1 = [n for n in ckpt.names if ckpt.parse(n).layer == 1]
    assert layer1 and all(".layers.1." in n for n in layer1)  # never layers.10 / layers.11


def test_llama_components_and_orientation(llama_dir):
    (ckpt,) = find_checkpoints(llama_dir)
    family = family_for("llama")
    seen = {}
    for name, meta in ckpt.meta.items():
        for part in matrix_parts(parse_name(name, family), meta.shape, ckpt.config):
            seen[(part.layer, part.component)] = part.oriented(ckpt.get(name)).shape
    hidden, kv = 32, 16
    assert seen[(0, "q")] == (hidden, hidden) and seen[(0, "k")] == (hidden, kv)
    assert seen[(1, "down")] == (hidden, 64) and seen[(1, "up")] == (hidden, 64)
    assert seen[(None, "embed")] == (hidden, 64)
    assert (None, "lm_head") not in seen  # tied: not stored


def _parts(ckpt, name):
    return {p.component: p for p in matrix_parts(ckpt.parse(name), ckpt.meta[name].shape, ckpt.config)}


def test_neox_fused_qkv_split_matches_the_model(neox_dir):
    """The q part is exactly the rows that GPT-NeoX's attention uses as queries."""
    from transformers import AutoModelForCausalLM

    (ckpt,) = find_checkpoints(neox_dir)
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    parts = _parts(ckpt, name)
    assert set(parts) == {"q", "k", "v"}
    fused = ckpt.get(name)  # (3h, h)
    model = AutoModelForCausalLM.from_pretrained(neox_dir)
    attn = model.gpt_neox.layers[1].attention
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qkv = torch.nn.functional.linear(x, attn.query_key_value.weight)  # (5, 3h)
    heads, head_dim = 4, 8
    # HF: view(..., heads, 3 * head_dim) then chunk(3) per head
    q_ref, k_ref, v_ref = qkv.view(5, heads, 3 * head_dim).chunk(3, dim=-1)
    for part, ref in (("q", q_ref), ("k", k_ref), ("v", v_ref)):
        mine = x @ parts[part].extract(fused).T  # (5, h)
        torch.testing.assert_close(mine, ref.reshape(5, heads * head_dim), rtol=0, atol=1e-6)
    assert parts["q"].oriented(fused).shape == (32, 32)


def test_neox_fused_qkv_parts_are_exactly_the_planted_rows(neox_dir, copy_tree):
    """Plant distinct q, k, v matrices in GPT-NeoX's per-head interleaved layout
    ([q_h; k_h; v_h] for each head h, as its attention views (heads, 3 * head_dim)) and read
    each part back exactly, bit for bit."""
    heads, head_dim, hidden = 4, 8, 32
    planted = {
        c: torch.arange(hidden * hidden, dtype=torch.float32).reshape(hidden, hidden) + 10_000 * k
        for k, c in enumerate("qkv")
    }  # (out, in) each, all entries distinct
    per_head = [torch.cat([planted[c][h * head_dim : (h + 1) * head_dim] for c in "qkv"]) for h in range(heads)]
    fused = torch.cat(per_head)  # (3 * hidden, hidden)
    other = copy_tree(neox_dir)
    state = _state(other)
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    assert state[name].shape == fused.shape
    state[name] = fused
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    (ckpt,) = find_checkpoints(other)
    parts = _parts(ckpt, name)
    for c in "qkv":
        assert torch.equal(parts[c].extract(ckpt.get(name)), planted[c])
        assert torch.equal(parts[c].oriented(ckpt.get(name)), planted[c].T)  # hidden (in) side first


def test_gpt2_conv1d_split_matches_the_model(gpt2_dir):
    from transformers import AutoModelForCausalLM

    (ckpt,) = find_checkpoints(gpt2_dir)
    name = "transformer.h.0.attn.c_attn.weight"
    parts = _parts(ckpt, name)
    stored = ckpt.get(name)  # (h, 3h): Conv1D stores (in, out)
    assert stored.shape == (32, 96)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.transformer.h[0].attn.c_attn(x) - model.transformer.h[0].attn.c_attn.bias
    for k, part in enumerate(("q", "k", "v")):
        torch.testing.assert_close(x @ parts[part].extract(stored).T, out[:, 32 * k : 32 * (k + 1)], rtol=0, atol=1e-6)
    proj = _parts(ckpt, "transformer.h.0.mlp.c_proj.weight")["fc_out"]
    assert proj.hidden_side == "out"
    assert proj.oriented(ckpt.get("transformer.h.0.mlp.c_proj.weight")).shape == (32, 128)


def test_phi3_blocks_split_by_config_sizes(tmp_path):
    from transformers import Phi3Config

    config = Phi3Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    path = save(build(config), tmp_path / "phi3")
    (ckpt,) = find_checkpoints(path)
    parts = _parts(ckpt, "model.layers.0.self_attn.qkv_proj.weight")
    fused = ckpt.get("model.layers.0.self_attn.qkv_proj.weight")  # (32 + 16 + 16, 32)
    assert torch.equal(parts["q"].extract(fused), fused[:32])
    assert torch.equal(parts["k"].extract(fused), fused[32:48])
    assert torch.equal(parts["v"].extract(fused), fused[48:])
    gate_up = _parts(ckpt, "model.layers.0.mlp.gate_up_proj.weight")
    assert [p.extract(ckpt.get("model.layers.0.mlp.gate_up_proj.weight")).shape[0] for p in gate_up.values()] == [
        48,
        48,
    ]


def test_lora_update_is_scale_times_b_at_a(lora_dir, llama_dir):
    (adapter,) = find_checkpoints(lora_dir)
    assert adapter.format == "lora" and adapter.base.path == llama_dir
    raw = load_file(str(lora_dir / "adapter_model.safetensors"))
    base = _state(llama_dir)
    targets = [n for n in base if n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    assert sorted(adapter.targets) == sorted(targets)
    for name in targets:
        module = "base_model.model." + name.removesuffix(".weight")
        a, b = raw[module + ".lora_A.weight"], raw[module + ".lora_B.weight"]
        expected = (8 / 4) * (b @ a)
        torch.testing.assert_close(adapter.delta(name), expected, rtol=0, atol=1e-7)
        torch.testing.assert_close(adapter.get(name), base[name] + expected, rtol=0, atol=1e-6)
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert adapter.delta(untouched) is None and torch.equal(adapter.get(untouched), base[untouched])


def test_lora_merge_agrees_with_peft(lora_dir, llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), lora_dir)
        .merge_and_unload()
        .state_dict()
    )
    (adapter,) = find_checkpoints(lora_dir)
    for name in adapter.names:
        torch.testing.assert_close(adapter.get(name), merged[name], rtol=0, atol=1e-6)


def test_lora_base_can_be_given_and_must_exist(lora_dir, llama_dir, copy_tree):
    moved = copy_tree(lora_dir)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a local directory.*--base"):
        find_checkpoints(moved)
    (adapter,) = find_checkpoints(moved, base=llama_dir)
    assert adapter.base.path == llama_dir


def test_stream_updates_of_lora_use_factors_only(lora_dir, llama_dir):
    checkpoints = find_sequence([llama_dir, lora_dir])
    (adapter,) = find_checkpoints(lora_dir)
    reads = []
    original = checkpoints[0].source.get
    checkpoints[0].source.get = lambda name: reads.append(name) or original(name)
    updates = dict(stream_updates(checkpoints, [(0, 1)]))
    assert reads == []  # the base is never read
    for tensor, pair in updates.items():
        delta = adapter.delta(tensor.name)
        if delta is None:
            assert pair[(0, 1)] is None
        else:
            assert torch.equal(pair[(0, 1)], delta)


@pytest.mark.parametrize("dtypes", [("bfloat16", "bfloat16"), ("float16", "float32"), ("float32", "bfloat16")])
def test_stream_updates_are_float32_differences_of_the_stored_values(llama_dir, tmp_path, monkeypatch, dtypes):
    import forgetdiag.streaming as streaming

    monkeypatch.setattr(streaming, "_BLOCK", 100)  # several blocks and a partial last one per tensor
    stored = []
    for k, dtype in enumerate(dtypes):
        state = {
            n: (t + 0.01 * k * torch.randn_like(t)).to(getattr(torch, dtype)).contiguous()
            for n, t in _state(llama_dir).items()
        }
        path = tmp_path / f"c{k}"
        path.mkdir()
        (path / "config.json").write_text((llama_dir / "config.json").read_text())
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        stored.append(state)
    checkpoints = find_sequence([tmp_path / "c0", tmp_path / "c1"])
    seen = 0
    for tensor, updates in stream_updates(checkpoints, [(0, 1)]):
        a, b = stored[0][tensor.name], stored[1][tensor.name]
        update = updates[(0, 1)]
        assert update.dtype == torch.float32
        assert torch.equal(update, b.float() - a.float())
        torch.testing.assert_close(update.double(), b.double() - a.double(), rtol=1e-6, atol=1e-9)
        seen += a.numel() > 100
    assert seen > 5


def test_half_precision_finite_check_survives_overflowing_sums(llama_dir):
    from forgetdiag.streaming import require_finite

    (ckpt,) = find_checkpoints(llama_dir)
    for dtype in (torch.float16, torch.bfloat16):
        big = torch.full((4, 100), 60000.0, dtype=dtype)  # float16 sum overflows past 65504
        assert require_finite(big, "w", ckpt) is big
        big[2, 7] = float("nan")
        with pytest.raises(CheckpointError, match="tensor w holds NaN"):
            require_finite(big, "w", ckpt)
        big[2, 7] = float("-inf")
        with pytest.raises(CheckpointError, match="tensor w holds Inf"):
            require_finite(big, "w", ckpt)


def test_prefetch_advises_each_tensors_exact_bytes(sharded_dir, monkeypatch):
    (ckpt,) = find_checkpoints(sharded_dir)
    advised = []
    monkeypatch.setattr(
        "os.posix_fadvise",
        lambda fd, start, length, advice: advised.append((os.readlink(f"/proc/self/fd/{fd}"), start, length, advice)),
        raising=False,
    )
    for name in ckpt.names:
        ckpt.prefetch(name)
        path, start, length, advice = advised[-1]
        assert advice == os.POSIX_FADV_WILLNEED and path == str(ckpt.meta[name].file.resolve())
        with open(path, "rb") as handle:  # the advised range holds exactly the tensor's bytes
            handle.seek(start)
            raw = handle.read(length)
        tensor = ckpt.source.get(name)
        assert raw == tensor.contiguous().view(torch.uint8).numpy().tobytes()
    assert len(advised) == len(ckpt.names) and len({a[0] for a in advised}) > 1  # several shards


def test_stream_updates_prefetch_the_next_name_before_reading(llama_dir, llama_dir_b):
    checkpoints = find_sequence([llama_dir, llama_dir_b])
    log = []
    for c in checkpoints:
        original = c.source.get
        c.source.get = lambda name, _o=original: log.append(("get", name)) or _o(name)
        c.prefetch = lambda name: log.append(("prefetch", name))
    names = list(check_sequence(checkpoints).names)
    for _ in stream_updates(checkpoints, [(0, 1)]):
        pass
    expected = [("prefetch", names[0])] * 2 + [("prefetch", names[1])] * 2 + [("get", names[0])] * 2
    assert log[:6] == expected
    gets = [n for kind, n in log if kind == "get"]
    for k, name in enumerate(names[1:-1], start=1):  # name k+1 is advised before name k is read
        assert log.index(("prefetch", names[k + 1])) < log.index(("get", name))
    assert gets == [n for n in names for _ in range(2)]


def test_stream_reads_one_name_at_a_time(llama_dir, llama_dir_b):
    checkpoints = find_sequence([llama_dir, llama_dir_b])
    log = []
    for c in checkpoints:
        original = c.source.get
        c.source.get = lambda name, _o=original, _c=c: log.append((_c.path, name)) or _o(name)
    stream = stream_tensors(checkpoints)
    first_name, tensors = next(stream)
    assert len(log) == 2 and {n for _, n in log} == {first_name.name}
    assert torch.equal(tensors[1], _state(llama_dir_b)[first_name.name])


def test_pickle_refused_without_flag(pickle_dir):
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        find_checkpoints(pickle_dir)


def test_pickle_read_with_weights_only(pickle_dir):
    (ckpt,) = find_checkpoints(pickle_dir, allow_pickle=True)
    stored = torch.load(pickle_dir / "pytorch_model.bin", weights_only=True)
    assert ckpt.format == "pickle"
    for name in ckpt.names:
        assert torch.equal(ckpt.get(name), stored[name].float())


def test_malicious_pickle_never_runs(pickle_dir, copy_tree, tmp_path):
    from helpers import write_malicious_pickle

    bad = copy_tree(pickle_dir)
    marker = tmp_path / "PWNED"
    write_malicious_pickle(bad / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match="weights_only"):
        find_checkpoints(bad, allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "no such file"),
        ("empty", "empty directory"),
        ("config_only", "no weights"),
        ("truncated", "not a readable safetensors"),
        ("garbage", "not a readable safetensors"),
        ("bad_config", "invalid JSON"),
    ],
)
def test_bad_directories_are_refused(llama_dir, copy_tree, tmp_path, damage, message):
    path = tmp_path / "bad"
    if damage == "empty":
        path.mkdir()
    elif damage != "missing":
        path = copy_tree(llama_dir, "bad")
        weights = path / "model.safetensors"
        data = weights.read_bytes()
        if damage == "config_only":
            weights.unlink()
        elif damage == "truncated":
            weights.write_bytes(data[: len(data) // 2])
        elif damage == "garbage":
            weights.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{this is not a json header!!!!}")
        elif damage == "bad_config":
            (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=message):
        find_checkpoints(path)


def test_different_architectures_are_refused(llama_dir, gpt2_dir):
    with pytest.raises(CheckpointError, match="different architectures"):
        check_sequence(find_sequence([llama_dir, gpt2_dir]))


def test_shape_mismatch_is_refused(llama_dir, copy_tree):
    other = copy_tree(llama_dir)
    state = _state(other)
    state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(32, 16)
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="differ in shape: model.layers.0.self_attn.o_proj"):
        check_sequence(find_sequence([llama_dir, other]))


def test_nan_is_reported_with_the_tensor_name(llama_dir, copy_tree):
    other = copy_tree(llama_dir)
    state = _state(other)
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight holds NaN"):
        list(stream_tensors(find_sequence([llama_dir, other])))


def test_resized_vocabulary_compares_common_rows(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.resize_token_embeddings(70)
    bigger = save(model, tmp_path / "bigger")
    checkpoints = find_sequence([llama_dir, bigger])
    check = check_sequence(checkpoints)
    assert check.rows == {"model.embed_tokens.weight": 64}
    assert any("vocabulary resized" in n for n in check.notes)
    tensors = dict((t.name, v) for t, v in stream_tensors(checkpoints, check=check))
    a, b = tensors["model.embed_tokens.weight"]
    assert a.shape == b.shape == (64, 32) and torch.equal(a, b)


def test_fingerprint_changes_with_the_tensors_not_the_path(llama_dir, llama_dir_b, copy_tree):
    from forgetdiag.checkpoints import fingerprint

    (a,), (b,) = find_checkpoints(llama_dir), find_checkpoints(llama_dir_b)
    (same,) = find_checkpoints(copy_tree(llama_dir))
    fa, fb, fs = fingerprint(a), fingerprint(b), fingerprint(same)
    assert fa["index_sha256"] == fs["index_sha256"] and fa["config_sha256"] == fs["config_sha256"]
    assert fa["size_bytes"] == (llama_dir / "model.safetensors").stat().st_size
    assert fa["sample_sha256"] == fs["sample_sha256"]
    # same layout (so the same index), other values: the sampled bytes tell them apart
    assert fa["index_sha256"] == fb["index_sha256"] and fa["sample_sha256"] != fb["sample_sha256"]
