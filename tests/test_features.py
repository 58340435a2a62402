"""`forgetdiag features`: last-token hidden states and per-layer PC / mean / CKA shifts.

The statistics are checked against an independent numpy computation (covariance eigh, scipy's
subspace angles, the n x n Gram form of CKA) on hidden states from a plain transformers forward
pass; the extraction against transformers' own ``output_hidden_states``; and a planted case in
which only the last layer changes.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import scipy.linalg
import torch
from typer.testing import CliRunner

from forgetdiag.analyses.feature_stats import LayerPCA, compare_layer, summarise_layer
from forgetdiag.analyses.features import (
    FeatureSettings,
    check_pairs,
    compare_features,
    feature_shifts,
    parse_pairs,
    shift_start,
)
from forgetdiag.analyses.hidden import _LastToken, decoder_layers, encode_prompts, extract_features
from forgetdiag.cli import app
from forgetdiag.errors import ForgetdiagError, ProbeError
from forgetdiag.models import Runtime
from forgetdiag.probes import load_probe, probe_from_pairs

from helpers import (
    WORDS,
    assert_bad_input,
    assert_envelope,
    build,
    gpt2_config,
    llama_config,
    neox_config,
    plotly_figures,
    save,
    tree_digest,
    write_jsonl,
)

runner = CliRunner()
N_PROMPTS = 40


def random_prompts(n=N_PROMPTS, seed=0):
    """Prompts of 1-12 random words: varied lengths and last tokens."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "old.jsonl"
    return write_jsonl(path, [{"prompt": p, "answer": "paris"} for p in random_prompts()])


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer):
    """(before, after): a 4-layer llama, and the same model with only its last layer changed."""
    model = build(llama_config(layers=4), seed=20)
    root = tmp_path_factory.mktemp("planted")
    before = save(model, root / "before", tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.model.layers[-1].parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return before, save(model, root / "after", tokenizer=tokenizer)


def run_cli(*args):
    return runner.invoke(app, ["features", *map(str, args)])


def transformers_states(model, tokenizer, prompts):
    """(L + 1, n, d) float64: output_hidden_states of an unbatched forward, last position."""
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out = model(input_ids=ids, output_hidden_states=True)
            rows.append(torch.stack([h[0, -1] for h in out.hidden_states]))
    return torch.stack(rows, dim=1).double()


# ------------------------------------------------------------------- independent numpy reference


def numpy_layer(x, y, k):
    """The per-layer numbers computed another way: covariance eigh, scipy, Gram-form CKA."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def top_pcs(a):
        cov = np.cov(a, rowvar=False)  # (d, d)
        _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
        return vecs[:, ::-1][:, :k]  # (d, k) descending

    pb, pa = top_pcs(x), top_pcs(y)
    cos = np.clip(np.abs(np.sum(pb * pa, axis=0)), 0.0, 1.0)
    shift = y.mean(0) - x.mean(0)
    shift_cos = abs(shift @ pb[:, 0]) / np.linalg.norm(shift)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    hsic = lambda a, b: np.trace(a @ a.T @ h @ b @ b.T @ h)
    return {
        "pc_angles_deg": np.degrees(np.arccos(cos)),
        "subspace_angles_deg": np.sort(np.degrees(scipy.linalg.subspace_angles(pb, pa))),
        "mean_shift_rel": np.linalg.norm(shift) / np.linalg.norm(x, axis=1).mean(),
        "mean_shift_pc1_angle_deg": np.degrees(np.arccos(min(shift_cos, 1.0))),
        "cka": hsic(x, y) / math.sqrt(hsic(x, x) * hsic(y, y)),
    }


def assert_matches_numpy(shifts, before, after, k, *, angle_tol, rel_tol):
    for s in shifts:
        ref = numpy_layer(before[s.layer], after[s.layer], k)
        assert s.k == k
        np.testing.assert_allclose(s.pc_angles_deg, ref["pc_angles_deg"], atol=angle_tol)
        np.testing.assert_allclose(s.subspace_angles_deg, ref["subspace_angles_deg"], atol=angle_tol)
        assert s.mean_shift_pc1_angle_deg == pytest.approx(ref["mean_shift_pc1_angle_deg"], abs=angle_tol)
        assert s.mean_shift_rel == pytest.approx(ref["mean_shift_rel"], rel=rel_tol)
        assert s.cka == pytest.approx(ref["cka"], rel=rel_tol)
        assert 0 <= s.pc1_angle_deg <= 90


def test_statistics_match_numpy_on_the_same_states(llama_dir, llama_dir_b, tokenizer):
    from transformers import AutoModelForCausalLM

    prompts = random_prompts()
    before = transformers_states(AutoModelForCausalLM.from_pretrained(llama_dir), tokenizer, prompts)
    after = transformers_states(AutoModelForCausalLM.from_pretrained(llama_dir_b), tokenizer, prompts)
    shifts = compare_features(before, after, settings=FeatureSettings(k=4))
    assert [s.layer for s in shifts] == [0, 1, 2]
    assert_matches_numpy(shifts, before, after, 4, angle_tol=1e-6, rel_tol=1e-9)


def test_end_to_end_matches_numpy_on_transformers_states(llama_dir, llama_dir_b, probe_file, tokenizer):
    """Batched, left-padded hook extraction + statistics vs unbatched transformers + numpy."""
    from transformers import AutoModelForCausalLM

    result = feature_shifts(
        [llama_dir, llama_dir_b], load_probe(probe_file), settings=FeatureSettings(k=4), runtime=Runtime(batch_size=7)
    )
    prompts = random_prompts()
    before = transformers_states(AutoModelForCausalLM.from_pretrained(llama_dir), tokenizer, prompts)
    after = transformers_states(AutoModelForCausalLM.from_pretrained(llama_dir_b), tokenizer, prompts)
    (pair,) = result.pairs
    assert (result.n_layers, result.hidden_size, result.n_prompts) == (2, 32, N_PROMPTS)
    # features agree to ~1e-6 (float32, other batching): angles to ~1e-3 deg
    assert_matches_numpy(pair.layers, before, after, 4, angle_tol=2e-3, rel_tol=1e-5)


@pytest.mark.parametrize("config", [llama_config, gpt2_config, neox_config])
def test_hooks_equal_output_hidden_states(config, tokenizer):
    model = build(config(layers=3), seed=1)
    prompts = encode_prompts(tokenizer, probe_from_pairs([(p, "x") for p in random_prompts(17)]))
    full = extract_features(model, prompts, pad_id=0, batch_size=5, method="output_hidden_states")
    count = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in decoder_layers(model)]
    hooks_before = count()  # transformers installs its own output-capturing hooks and keeps them
    hooks = extract_features(model, prompts, pad_id=0, batch_size=5)
    assert hooks.shape == (4, 17, 32) and hooks.dtype == torch.float32
    assert torch.equal(hooks, full)
    texts = random_prompts(17)
    reference = transformers_states(model, tokenizer, texts).float()
    torch.testing.assert_close(hooks, reference, atol=1e-5, rtol=1e-5)
    assert count() == hooks_before  # ours are removed


def test_hooks_keep_one_position_not_the_whole_sequence(tokenizer):
    """What the hooks hold is a copy of (batch, hidden), not a view of (batch, tokens, hidden)."""
    model = build(llama_config(layers=2), seed=1)
    recorder = _LastToken(decoder_layers(model))
    ids = torch.randint(4, 30, (3, 40))
    with torch.inference_mode():
        model.base_model(input_ids=ids)
    recorder.remove()
    assert len(recorder.states) == 2  # embedding output + layer 1 (layer 2 is the final norm's)
    for state in recorder.states:
        assert state.shape == (3, 32)
        assert state.untyped_storage().nbytes() == 3 * 32 * state.element_size()


def test_planted_last_layer_change(planted, probe_file):
    before, after = planted
    result = feature_shifts([before, after], load_probe(probe_file), settings=FeatureSettings(k=4))
    (pair,) = result.pairs
    *lower, last = pair.layers
    assert [s.layer for s in pair.layers] == [0, 1, 2, 3, 4]
    for s in lower:  # identical features: no shift at all
        assert s.mean_shift_norm == 0.0 and s.mean_shift_rel == 0.0
        assert s.cka == pytest.approx(1.0, abs=1e-12)
        assert max(s.pc_angles_deg) < 1e-6 and max(s.subspace_angles_deg) < 1e-6
        assert math.isnan(s.mean_shift_pc1_angle_deg)  # a zero shift has no direction
    assert last.mean_shift_rel > 0.01 and last.cka < 0.95 and last.pc1_angle_deg > 1.0
    assert pair.shift_start == 4


def test_sign_flip_of_a_pc_gives_0_not_180():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=generator, dtype=torch.float64) * torch.arange(6, 0, -1)
    pb = summarise_layer(x, k=3)
    flipped = LayerPCA(pb.mean, -pb.components, pb.explained, pb.rank, pb.mean_norm)
    s = compare_layer(0, x, x, pb, flipped, k=3)
    assert max(s.pc_angles_deg) < 1e-6 and max(s.subspace_angles_deg) < 1e-6
    # a mean shift along MINUS PC1 is at 0 deg to the PC1 axis, not 180
    y = x - 3.0 * pb.components[0]
    s = compare_layer(0, x, y, pb, summarise_layer(y, k=3), k=3)
    assert s.mean_shift_pc1_angle_deg < 1e-6 and s.pc1_angle_deg < 1e-6
    assert s.mean_shift_rel == pytest.approx(3.0 / float(x.norm(dim=1).mean()))


def test_constant_layer_is_reported_not_crashed(llama_dir, llama_dir_b, tmp_path):
    """Every prompt ends with ':': the embedding output is one vector, so it has no PCs."""
    rows = [{"prompt": f"{p} answer :", "answer": "paris"} for p in random_prompts(12)]
    probe = load_probe(write_jsonl(tmp_path / "same_end.jsonl", rows))
    result = feature_shifts([llama_dir, llama_dir_b], probe, settings=FeatureSettings(k=3))
    layer0 = result.pairs[0].layers[0]
    assert layer0.k == 0 and layer0.rank_before == 0 and math.isnan(layer0.cka)
    assert layer0.mean_shift_rel > 0  # the one vector still moved
    assert result.pairs[0].shift_start != 0 and "do not vary" in result.warnings[0]


def test_sequence_pairs_and_shift_vs_previous(trainer_run, probe_file):
    probe = load_probe(probe_file)
    result = feature_shifts(trainer_run, probe, settings=FeatureSettings(k=3))
    assert [(p.before, p.after) for p in result.pairs] == [
        ("checkpoint-5", "checkpoint-50"),
        ("checkpoint-50", "checkpoint-100"),
    ]
    assert all(math.isnan(s.shift_vs_previous_deg) for s in result.pairs[0].layers)
    assert all(0 <= s.shift_vs_previous_deg <= 180 for s in result.pairs[1].layers)
    one = feature_shifts(trainer_run, probe, settings=FeatureSettings(pairs=parse_pairs("0:2"), k=3))
    assert [(p.before_step, p.after_step) for p in one.pairs] == [(5, 100)]
    assert not (trainer_run.parent / "UNPICKLED").exists()


def test_pairs_are_validated():
    assert parse_pairs("0:1, 1-3") == [(0, 1), (1, 3)]
    assert check_pairs(None, 3) == [(0, 1), (1, 2)]
    with pytest.raises(ForgetdiagError, match="I:J"):
        parse_pairs("0:1,x")
    with pytest.raises(ForgetdiagError, match="indices 0 to 2"):
        check_pairs([(0, 3)], 3)
    with pytest.raises(ForgetdiagError, match="at least 2"):
        check_pairs(None, 1)


def test_bfloat16_forward_gives_finite_float64_statistics(planted, probe_file):
    before, after = planted
    result = feature_shifts(
        [before, after], load_probe(probe_file), settings=FeatureSettings(k=4), runtime=Runtime(dtype="bfloat16")
    )
    assert result.pairs[0].shift_start == 4
    assert all(math.isfinite(s.cka) for s in result.pairs[0].layers)


# ------------------------------------------------------------------------------------ the CLI


def test_cli_json_html_and_untouched_inputs(planted, probe_file, tmp_path):
    before, after = planted
    digests = (tree_digest(before), tree_digest(after))
    out, page = tmp_path / "f.json", tmp_path / "f.html"
    result = run_cli(before, after, "--probe", probe_file, "--k", 4, "--json", out, "--html", page)
    assert result.exit_code == 0, result.stderr
    assert "shifts start at layer 4 of 4" in " ".join(result.stdout.split())
    data = assert_envelope(json.loads(out.read_text()), "features")
    assert len(data["records"]) == 5 and data["pairs"][0]["shift_start"] == 4
    record = data["records"][0]
    for key in ("layer", "pc1_angle_deg", "subspace_angles_deg", "mean_shift_rel", "mean_shift_pc1_angle_deg", "cka"):
        assert key in record
    assert record["layer"] == 0 and record["mean_shift_pc1_angle_deg"] is None  # zero shift
    text = page.read_text()
    assert '<script src="http' not in text and "Plotly.newPlot" in text and "before PC1" in text
    assert (tree_digest(before), tree_digest(after)) == digests


def test_html_per_layer_curves_have_one_point_per_layer(planted, probe_file, tmp_path):
    """Four panels, one curve each for the one pair, over hidden-state indices 0 (embedding
    output) to 4 (after the last of the model's 4 layers), with the JSON's values."""
    before, after = planted
    out, page = tmp_path / "f.json", tmp_path / "f.html"
    result = run_cli(before, after, "--probe", probe_file, "--k", 4, "--json", out, "--html", page)
    assert result.exit_code == 0, result.stderr
    data = assert_envelope(json.loads(out.read_text()), "features")
    (curves,) = [
        (traces, layout)
        for traces, layout in plotly_figures(page.read_text())
        if layout.get("title", {}).get("text", "").startswith("Per-layer shifts")
    ]
    traces, layout = curves
    panels = [
        "PC1 angle (deg)",
        "PC shift: mean principal angle of the top-k PCs (deg)",
        "linear CKA",
        "mean shift / feature norm",
    ]
    assert [a["text"] for a in layout["annotations"]] == panels
    nulls = [t for t in traces if t["name"].startswith("split-half null")]
    traces = [t for t in traces if t not in nulls]
    assert data["n_layers"] == 4 and len(traces) == len(panels) and len(nulls) == 1
    layers = [r["layer"] for r in data["records"]]
    assert nulls[0]["y"] == [r["null_pc_angle_deg"] for r in data["records"]]
    for trace, key in zip(traces, ("pc1_angle_deg", "pc_shift_deg", "cka", "mean_shift_rel")):
        lows = [r["intervals"].get(key, [None])[0] for r in data["records"]]
        got = [
            None if v is None or m is None else round(v - m, 9)
            for v, m in zip(trace["y"], trace["error_y"]["arrayminus"])
        ]
        assert got == [None if x is None else round(x, 9) for x in lows]  # error bars = the JSON's intervals
    assert layers == list(range(data["n_layers"] + 1))
    for trace, key in zip(traces, ("pc1_angle_deg", "pc_shift_deg", "cka", "mean_shift_rel")):
        assert trace["x"] == layers and trace["name"] == "before -> after"
        assert trace["y"] == [r[key] for r in data["records"]]
    assert traces[3]["y"][:4] == [0.0] * 4 and traces[3]["y"][4] > 0.01  # only the last layer moved
    assert [s["x0"] for s in layout["shapes"]] == [4] * 4  # the start line, on every panel


def test_cli_probe_smaller_than_k(llama_dir, llama_dir_b, tmp_path):
    probe = write_jsonl(tmp_path / "tiny.jsonl", [{"prompt": p, "answer": "x"} for p in random_prompts(5)])
    assert_bad_input(
        run_cli(llama_dir, llama_dir_b, "--probe", probe, "--k", 8), "has 5 prompts", "--k 8 needs at least 9"
    )
    with pytest.raises(ProbeError, match="needs at least"):
        compare_features(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), settings=FeatureSettings(k=3))


def test_cli_different_hidden_sizes(llama_dir, tokenizer, tmp_path, probe_file):
    small = save(build(llama_config(hidden=16, heads=2, kv_heads=1), seed=3), tmp_path / "small", tokenizer=tokenizer)
    assert_bad_input(
        run_cli(llama_dir, small, "--probe", probe_file), "different architectures", "hidden_size 32 vs 16"
    )


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--pairs", "0:5"], "not two different checkpoints"),
        (["--pc-shift-min", "0"], "pc-shift-min"),
    ],
)
def test_cli_bad_options(llama_dir, llama_dir_b, probe_file, args, expect):
    assert_bad_input(run_cli(llama_dir, llama_dir_b, "--probe", probe_file, *args), expect)


def test_cli_one_checkpoint_is_not_enough(llama_dir, probe_file):
    assert_bad_input(run_cli(llama_dir, "--probe", probe_file), "at least 2")


def test_near_tied_pcs_turn_pc1_but_not_the_start_rule():
    """PC1 and PC2 of nearly equal variance rotate in their plane: PC1 turns 45 deg, but the
    top-2 subspace does not move, so no shift starts (the rule reads the subspace)."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(400, 5, generator=generator, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / 399)).T  # whitened: covariance I
    x = z * torch.tensor([1.0, 0.98, 0.3, 0.2, 0.1], dtype=torch.float64)  # (400, 5)
    c = s = math.sqrt(0.5)
    rotate = torch.eye(5, dtype=torch.float64)
    rotate[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)  # 45 deg in the PC1-PC2 plane
    (layer,) = compare_features(x[None], (x @ rotate.T)[None], settings=FeatureSettings(k=2))
    assert layer.pc1_angle_deg > 30 and layer.pc_shift_deg < 1e-6
    assert layer.explained_before[1] > 0.9 * layer.explained_before[0]
    assert shift_start([layer], FeatureSettings(k=2)) is None


def test_split_half_same_model_is_no_shift_at_every_layer(llama_dir, tokenizer):
    """One model, two disjoint halves of its prompts: the raw PC shift passes the 10 deg rule
    somewhere (sampling alone), but against the split-half null no layer shifts."""
    from forgetdiag.checkpoints import find_checkpoints
    from forgetdiag.models import load_model

    prompts = probe_from_pairs([(p, " x") for p in random_prompts(120, seed=3)], name="halves")
    encoded = encode_prompts(tokenizer, prompts)
    feats = extract_features(
        load_model(find_checkpoints(llama_dir)[0]), encoded, pad_id=0, batch_size=16
    )  # (L + 1, 120, d)
    settings = FeatureSettings(k=4, bootstrap=100)
    first, second = feats[:, :60], feats[:, 60:]
    layers = compare_features(first, second, settings=settings, paired=False, null_from=feats)
    assert max(s.pc_shift_deg for s in layers if not math.isnan(s.pc_shift_deg)) >= settings.pc_shift_min
    assert shift_start(layers, settings) is None
    for s in layers:
        if s.k:
            assert set(s.intervals) >= {"pc_shift_deg", "mean_shift_rel"} and "cka" not in s.intervals
            low, high = s.intervals["pc_shift_deg"]
            assert low <= s.pc_shift_deg <= high or s.pc_shift_deg == pytest.approx(low)
            assert s.null_pc_angle_range[0] <= s.null_pc_angle_deg <= s.null_pc_angle_range[1]
            assert s.mean_shift_baseline_deg == pytest.approx(
                math.degrees(math.acos(math.sqrt(s.k / feats.shape[2]))), abs=1.0
            )
