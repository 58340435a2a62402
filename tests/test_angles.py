"""forgetdiag angles: planted subspaces come back, independent references agree, bad input is
refused in one line, inputs stay untouched, LoRA updates come from the factors alone."""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from forgetdiag.analyses.angle_pairs import PairSpec, Update, parse_pairs
from forgetdiag.analyses.angles import AngleSettings, compute_angles
from forgetdiag.cli import app
from forgetdiag.errors import ForgetdiagError
from forgetdiag.nulls import baseline_direction_angle
from forgetdiag.render.angles import angles_table
from forgetdiag.runtime import Runtime
from forgetdiag.storage import SafetensorsSource

from helpers import (
    HIDDEN,
    HIGH,
    LOW,
    assert_bad_input,
    assert_envelope,
    gpt2_config,
    llama_config,
    neox_config,
    planted_run,
    planted_updates,
    tree_digest,
)

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def plant_llama(params, k):
    q, down = planted_updates(LOW, 32, 1)[k], planted_updates(HIGH, 64, 2)[k]  # oriented (hidden, n)
    params["model.layers.0.self_attn.q_proj.weight"] += q.T.float()  # stored (out, in=hidden)
    params["model.layers.1.mlp.down_proj.weight"] += down.float()  # stored (out=hidden, in)


def plant_gpt2(params, k):
    q, fc_out = planted_updates(LOW, 32, 3)[k], planted_updates(HIGH, 128, 4)[k]
    params["transformer.h.0.attn.c_attn.weight"][:, :HIDDEN] += q.float()  # Conv1D (in, q|k|v)
    params["transformer.h.1.mlp.c_proj.weight"] += fc_out.T.float()  # Conv1D (in, out=hidden)


def plant_neox(params, k):
    q, fc_out = planted_updates(LOW, 32, 5)[k], planted_updates(HIGH, 64, 6)[k]
    qkv = params["gpt_neox.layers.0.attention.query_key_value.weight"]  # (3 hidden, hidden)
    heads = 4
    # rows are (heads, 3, head_dim): part 0 of every head is q
    qkv.view(heads, 3, HIDDEN // heads, HIDDEN)[:, 0] += q.T.float().reshape(heads, HIDDEN // heads, HIDDEN)
    params["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"] += fc_out.float()  # (hidden, inter)


FAMILIES = {
    "llama": (
        llama_config,
        plant_llama,
        {("model.layers.0.self_attn.q_proj.weight", None): LOW, ("model.layers.1.mlp.down_proj.weight", None): HIGH},
    ),
    "gpt2": (
        gpt2_config,
        plant_gpt2,
        {("transformer.h.0.attn.c_attn.weight", "q"): LOW, ("transformer.h.1.mlp.c_proj.weight", None): HIGH},
    ),
    "neox": (
        neox_config,
        plant_neox,
        {
            ("gpt_neox.layers.0.attention.query_key_value.weight", "q"): LOW,
            ("gpt_neox.layers.1.mlp.dense_4h_to_h.weight", None): HIGH,
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def planted(request, tmp_path_factory):
    config, plant, expected = FAMILIES[request.param]
    paths = planted_run(tmp_path_factory.mktemp(f"planted_{request.param}"), config(), plant)
    return request.param, paths, expected


def test_planted_angles_come_back_in_every_family(planted, tmp_path):
    family, paths, expected = planted
    before = [tree_digest(p) for p in paths]
    out = tmp_path / "angles.json"
    result = run("angles", *paths, "--json", out, "--html", tmp_path / "angles.html", "--quiet")
    assert result.exit_code == 0, result.stderr
    data = assert_envelope(json.loads(out.read_text()), "angles")
    records = {(r["param"], r["part"]): r for r in data["records"]}
    for key, thetas in expected.items():
        r = records[key]
        assert r["status"] == "ok" and r["rank_a"] == 3 and r["rank_b"] == 3, r
        assert np.allclose(sorted(r["principal_deg"]), thetas, atol=0.5)
        assert np.allclose(sorted(r["direction_deg"]), thetas, atol=0.5)
        assert r["angle_deg"] == pytest.approx(sum(thetas) / 3, abs=0.5)
        assert r["baseline_deg"] == pytest.approx(baseline_direction_angle(3, HIDDEN))
        assert math.degrees(math.acos(math.sqrt(3 / HIDDEN))) < r["baseline_deg"] < 75
        assert r["energy_a"] == pytest.approx(1.0) and r["layer"] in (0, 1)
    untouched = [r for key, r in records.items() if key not in expected]
    assert untouched and all(r["status"] == "no_update" and r["angle_deg"] is None for r in untouched)
    assert [tree_digest(p) for p in paths] == before
    assert "Pair 0-1:1-2" in result.stdout and "no update" in result.stdout


def test_neox_fused_q_only_reports_k_and_v_as_no_update(tmp_path):
    paths = planted_run(tmp_path, neox_config(), plant_neox)
    result = compute_angles(paths)
    qkv = {r.part: r for r in result.records if r.param.endswith("query_key_value.weight") and r.layer == 0}
    assert set(qkv) == {"q", "k", "v"}
    assert qkv["q"].status == "ok" and qkv["q"].component == "q"
    assert np.allclose(sorted(qkv["q"].principal_deg), LOW, atol=0.5)
    for part in ("k", "v"):
        assert qkv[part].status == "no_update" and qkv[part].angle_deg is None
        assert qkv[part].principal_deg is None and qkv[part].rank_a is None
    assert any(r.component == "lm_head" for r in result.records)  # neox: untied embed_out


def test_tied_lm_head_is_left_out_and_embedding_included(llama_dir):
    result = compute_angles([llama_dir, llama_dir, llama_dir])
    components = {r.component for r in result.records}
    assert "embed" in components and "lm_head" not in components
    assert all(r.status == "no_update" for r in result.records)  # identical checkpoints


# --- independent references ------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """Three llamas whose updates are dense random matrices with decaying spectra."""

    def plant(params, k):
        g = torch.Generator().manual_seed(100 + k)
        for p in params.values():
            if p.ndim == 2:
                d = torch.randn(p.shape, generator=g) * torch.logspace(0, -2, p.shape[1])
                p += 0.01 * d

    return planted_run(tmp_path_factory.mktemp("random"), llama_config(), plant)


def reference_bases(paths, name, *, hidden_side_in, energy=None, rank=None, standardize=False):
    """Left singular bases of both updates by a full numpy SVD (float64): the naive way."""
    w = [load_file(str(p / "model.safetensors"))[name].double().numpy() for p in paths]
    bases = []
    for a, b in ((0, 1), (1, 2)):
        delta = w[b] - w[a]
        delta = delta.T if hidden_side_in else delta  # (hidden, n)
        if standardize:
            delta = (delta - delta.mean()) / delta.std(ddof=1)
        u, s, _ = np.linalg.svd(delta, full_matrices=False)
        if energy is not None:
            r = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), energy) + 1)
        else:
            r = min(rank, int((s > 1e-4 * s[0]).sum()))
        bases.append(u[:, :r])
    return bases


def reference_direction_angles(ua, ub):
    cos = np.linalg.norm(ua.T @ ub, axis=0)
    sin = np.linalg.norm(ub - ua @ (ua.T @ ub), axis=0)
    return np.degrees(np.arctan2(sin, cos))


@pytest.mark.parametrize("rank", [5, 12])
def test_principal_angles_agree_with_scipy_on_random_updates(random_run, rank):
    result = compute_angles(random_run, settings=AngleSettings(rank=rank))
    checked = 0
    for r in result.records:
        if r.part is not None or r.component not in ("q", "down", "gate", "embed"):
            continue
        ua, ub = reference_bases(random_run, r.param, hidden_side_in=r.component != "down", rank=rank)
        expected = np.sort(np.degrees(scipy.linalg.subspace_angles(ua, ub)))
        assert (r.rank_a, r.rank_b) == (ua.shape[1], ub.shape[1])
        assert np.allclose(r.principal_deg, expected, atol=1e-3), r.param
        assert np.allclose(r.direction_deg, reference_direction_angles(ua, ub), atol=1e-3)
        checked += 1
    assert checked == 2 * 3 + 1


@pytest.mark.parametrize("standardize", [False, True])
def test_energy_mode_agrees_with_a_full_svd(random_run, standardize):
    settings = AngleSettings(energy=0.9, standardize=standardize)
    result = compute_angles(random_run, settings=settings)
    for r in result.records:
        if r.component not in ("q", "o", "up", "embed"):
            continue
        ua, ub = reference_bases(
            random_run, r.param, hidden_side_in=r.component != "o", energy=0.9, standardize=standardize
        )
        assert (r.rank_a, r.rank_b) == (ua.shape[1], ub.shape[1]), r.param
        assert 1 < r.rank_a < HIDDEN and r.energy_a >= 0.9
        expected = reference_direction_angles(ua, ub)
        assert r.angle_deg == pytest.approx(expected.mean(), abs=1e-4)
        assert np.allclose(r.principal_deg, np.sort(np.degrees(scipy.linalg.subspace_angles(ua, ub))), atol=1e-4)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """Hidden 256: big enough that top-4 bases take the randomized SVD."""

    def plant(params, k):
        g = torch.Generator().manual_seed(200 + k)
        for p in params.values():
            if p.ndim == 2:
                p += 0.01 * torch.randn(p.shape, generator=g)

    config = llama_config(hidden=256, inter=512, heads=4, kv_heads=2)
    return planted_run(tmp_path_factory.mktemp("wide"), config, plant)


def test_independent_noise_updates_sit_at_the_baseline(wide_run):
    """Independent dense random updates share nothing: the randomized bases must not invent
    shared directions (one sketch seed for both updates of a pair did, by several degrees)."""
    result = compute_angles(wide_run, settings=AngleSettings(rank=4))
    gaps = [r.gap_deg for r in result.records]
    assert {r.method_a for r in result.records} == {"randomized"}
    assert abs(sum(gaps) / len(gaps)) < 1.0 and max(abs(g) for g in gaps) < 4.0, gaps


def test_workers_give_identical_numbers_with_randomized_bases(wide_run):
    settings = AngleSettings(rank=4)
    one = compute_angles(wide_run, settings=settings, runtime=Runtime(threads=1))
    assert {r.method_a for r in one.records} == {"randomized"}
    for _ in range(2):  # threads racing on torch's global RNG would change some numbers
        two = compute_angles(wide_run, settings=settings, runtime=Runtime(threads=3))
        assert [r.to_dict() for r in one.records] == [r.to_dict() for r in two.records]


def test_json_records_have_the_documented_fields(random_run, tmp_path):
    out = tmp_path / "a.json"
    result = run("angles", *random_run, "--rank", "4", "--json", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    data = assert_envelope(json.loads(out.read_text()), "angles")
    n_matrices = 2 * 7 + 1  # tied llama: 7 per layer + embed
    assert len(data["records"]) == n_matrices and data["pairs"][0]["pair"] == "0-1:1-2"
    first = data["records"][0]
    assert first["component"] == "embed" and first["layer"] is None
    for key in (
        "param",
        "layer",
        "component",
        "angle_deg",
        "principal_deg",
        "baseline_deg",
        "rank_a",
        "rank_b",
        "energy_a",
        "principal_baseline_deg",
        "direction",
    ):
        assert key in first
    assert isinstance(data["records"][1]["layer"], int) and len(first["principal_deg"]) == 4


# --- LoRA ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_adapter(lora_dir, tmp_path_factory):
    """Another adapter over the same base: same targets, other planted factors."""
    path = tmp_path_factory.mktemp("lora2") / "adapter"
    path.mkdir()
    shutil.copy(lora_dir / "adapter_config.json", path / "adapter_config.json")
    g = torch.Generator().manual_seed(11)
    factors = {
        k: torch.randn(v.shape, generator=g) * 0.1
        for k, v in load_file(str(lora_dir / "adapter_model.safetensors")).items()
    }
    save_file(factors, str(path / "adapter_model.safetensors"))
    return path


def test_lora_updates_come_from_the_factors(llama_dir, lora_dir, second_adapter, monkeypatch):
    read = []
    original = SafetensorsSource.get
    monkeypatch.setattr(
        SafetensorsSource, "get", lambda self, name: read.append(self.meta[name].file) or original(self, name)
    )
    result = compute_angles([llama_dir, lora_dir, second_adapter])
    assert llama_dir / "model.safetensors" not in read  # the base's weights are never read
    scale = json.loads((lora_dir / "adapter_config.json").read_text())["lora_alpha"] / 4
    f1 = load_file(str(lora_dir / "adapter_model.safetensors"))
    f2 = load_file(str(second_adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"
    d1 = scale * (f1[key.format("B")] @ f1[key.format("A")]).double().numpy()  # (out, in)
    d2 = scale * (f2[key.format("B")] @ f2[key.format("A")]).double().numpy()
    ua = np.linalg.svd(d1.T, full_matrices=False)[0][:, :4]  # q: hidden side is "in"
    ub = np.linalg.svd((d2 - d1).T, full_matrices=False)[0][:, :8]
    (r,) = [r for r in result.records if r.param == "model.layers.1.self_attn.q_proj.weight"]
    assert (r.rank_a, r.rank_b) == (4, 8)
    assert np.allclose(r.principal_deg, np.sort(np.degrees(scipy.linalg.subspace_angles(ua, ub))), atol=1e-3)
    untouched = [r for r in result.records if r.component in ("k", "o", "gate", "up", "embed")]
    assert untouched and all(r.status == "no_update" for r in untouched)


# --- bad input -------------------------------------------------------------------------------


def test_fewer_than_three_checkpoints(llama_dir, llama_dir_b, tmp_path):
    out = tmp_path / "a.json"
    assert_bad_input(run("angles", llama_dir, llama_dir_b, "--json", out), "at least 3 checkpoints", "found 2")
    assert not out.exists()


def test_checkpoints_that_differ_in_shape(llama_dir, llama_dir_b, copy_tree):
    bad = copy_tree(llama_dir_b, "bad")
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:48]
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert_bad_input(run("angles", llama_dir, llama_dir_b, bad), "differ in shape", "model.layers.1.mlp.up_proj.weight")


def test_nan_in_an_update_is_named(llama_dir, llama_dir_b, copy_tree):
    bad = copy_tree(llama_dir_b, "bad")
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.0.mlp.gate_proj.weight"][3, 5] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert_bad_input(
        run("angles", llama_dir, bad, llama_dir_b, "--quiet"), "model.layers.0.mlp.gate_proj.weight holds NaN"
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--compare", "0-1"], "cannot read '0-1'"),
        (["--compare", "0-1:1-5"], "needs 0 <= i < j <= 2"),
        (["--compare", "1:1"], "with itself"),
        (["--compare", "x:1"], "cannot read update 'x'"),
        (["--rank", "8", "--energy", "0.9"], "not both"),
        (["--energy", "1.5"], "--energy 1.5: expected a number between 0 and 1, 0 excluded"),
        (["--rank", "0"], "--rank 0: expected an integer >= 1"),
        (["--device", "cuda:7"], "CUDA"),
    ],
)
def test_bad_options_exit_2(llama_dir, llama_dir_b, args, fragment):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_bad_input(run("angles", llama_dir, llama_dir_b, llama_dir, *args), fragment)


def test_parse_pairs():
    u = Update
    assert parse_pairs(None, 4) == [PairSpec(u(0, 1), u(1, 2)), PairSpec(u(1, 2), u(2, 3))]
    assert parse_pairs("0:1", 3) == parse_pairs("0-1:1-2", 3) == [PairSpec(u(0, 1), u(1, 2))]
    assert parse_pairs(" 0-1 : 1-3 , 0:2, 0-1:1-3", 4) == [PairSpec(u(0, 1), u(1, 3)), PairSpec(u(0, 1), u(2, 3))]
    with pytest.raises(ForgetdiagError, match="i < j"):
        parse_pairs("1-0:1-2", 3)


def test_trainer_run_expands_and_table_renders(trainer_run, tmp_path):
    result = compute_angles([trainer_run], settings=AngleSettings(rank=4))
    assert result.checkpoints == ("checkpoint-5", "checkpoint-50", "checkpoint-100")
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(angles_table(result))
    text = console.file.getvalue()
    assert "checkpoint-5 → checkpoint-50" in text and "null" in text and "embed" in text
    assert "update A: rank 4" in text
    assert not (trainer_run.parent / "UNPICKLED").exists()


def test_html_is_offline_and_has_every_pair(random_run, tmp_path):
    out = tmp_path / "a.html"
    four = [*random_run, random_run[0]]  # C3 = C0: three updates, two consecutive pairs
    result = run("angles", *four, "--rank", "4", "--html", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    page = out.read_text()
    assert "pair 0-1:1-2" in page and "pair 1-2:2-3" in page
    assert "<script src=" not in page and "Plotly" in page
