"""``forgetdiag landscape``: losses against a plain transformers forward pass, a planted checkpoint
placed exactly, resume equal to an uninterrupted run, bad inputs, inputs left untouched."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from forgetdiag.analyses.landscape import LandscapeSettings, landscape, read_saved
from forgetdiag.analyses.landscape_grid import fingerprint
from forgetdiag.analyses.plane import RANDOM, filter_normalized
from forgetdiag.architectures import family_for, parse_name
from forgetdiag.cli import app
from forgetdiag.errors import ForgetdiagError
from forgetdiag.models import Runtime
from forgetdiag.probes import load_probe
from forgetdiag.render.output import to_json

from helpers import (
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
SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "quito"]
UNIT = LandscapeSettings(grid=(3, 3), x_range=(0.0, 1.0), y_range=(0.0, 1.0))  # holds the anchors
PLANTED = (0.3, 0.7)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _perturbed(model, generator, scale):
    """Add scale * (each tensor's std) Gaussian noise to every parameter, 1-D ones included."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * (p.std() if p.numel() > 1 else 1.0) * torch.randn(p.shape, generator=generator))
    return model


def _flat(state, names):
    return torch.cat([state[n].double().reshape(-1) for n in names])


def _unflat(vector, like):
    out, start = {}, 0
    for name, t in like.items():
        out[name] = vector[start : start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


@pytest.fixture(scope="module")
def plane(tmp_path_factory, tokenizer):
    """origin -> x_end -> y_end (tiny llama, tied embeddings), a checkpoint planted at
    origin + 0.3 d_x + 0.7 d_y + n with n orthogonal to both, and two probes."""
    root = tmp_path_factory.mktemp("landscape")
    generator = torch.Generator().manual_seed(0)
    model = build(llama_config(), seed=0)
    with torch.no_grad():  # larger weights than the init, so that losses differ across the plane
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    paths = {"origin": save(model, root / "origin", tokenizer=tokenizer)}
    paths["x_end"] = save(_perturbed(model, generator, 0.5), root / "x_end", tokenizer=tokenizer)
    paths["y_end"] = save(_perturbed(model, generator, 0.5), root / "y_end", tokenizer=tokenizer)
    states = {k: load_file(str(p / "model.safetensors")) for k, p in paths.items()}
    names = list(states["origin"])
    o, x, y = (_flat(states[k], names) for k in ("origin", "x_end", "y_end"))
    dx, dy = x - o, y - x
    basis, _ = torch.linalg.qr(torch.stack([dx, dy], dim=1))  # (n, 2) orthonormal plane
    n = torch.randn(o.shape, generator=generator, dtype=torch.float64)
    n -= basis @ (basis.T @ n)  # orthogonal to d_x and d_y
    n *= 0.5 * dx.norm() / n.norm()
    planted = o + PLANTED[0] * dx + PLANTED[1] * dy + n
    paths["planted"] = root / "planted"
    paths["planted"].mkdir()
    shutil.copy(paths["origin"] / "config.json", paths["planted"])
    save_file(
        {k: v.float().contiguous() for k, v in _unflat(planted, states["origin"]).items()},
        str(paths["planted"] / "model.safetensors"),
        metadata={"format": "pt"},
    )
    # the float32 rounding of the saved values moves the truth by ~1e-8: measure n as saved
    saved = _flat(load_file(str(paths["planted"] / "model.safetensors")), names) - o
    residual = saved - basis @ (basis.T @ saved)
    items = [{"prompt": f"what is the birth city of {a} answer :", "answer": f" {c}"} for a, c in zip(NAMES, CITIES)]
    paths["old"] = write_jsonl(root / "old.jsonl", items[:4])
    paths["new"] = write_jsonl(
        root / "new.jsonl",
        [{"prompt": f"who works at {c} answer :", "answer": f" {a}"} for a, c in zip(NAMES[4:], ("acme", "globex"))],
    )
    return {**paths, "n_norm": float(n.norm()), "residual": float(residual.norm()), "root": root}


@pytest.fixture(scope="module")
def result(plane):
    """One run over the unit square with two probes and the trajectory, shared by the checks."""
    return landscape(
        plane["origin"],
        plane["x_end"],
        plane["y_end"],
        [plane["old"], plane["new"]],
        trajectory=[plane["origin"], plane["x_end"], plane["y_end"], plane["planted"]],
        settings=UNIT,
    )


def _plain_loss(path_or_model, probe_path, tokenizer):
    """Mean completion-token (answer + EOS) cross-entropy by a plain transformers forward."""
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(model, Path):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for row in map(json.loads, probe_path.read_text().splitlines()):
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["prompt"] + row["answer"])["input_ids"][len(prompt) :]
        ids = torch.tensor([prompt + answer + [tokenizer.eos_token_id]])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item() * (len(answer) + 1)
        count += len(answer) + 1
    return total / count


def test_anchor_losses_equal_a_plain_forward_pass(result, plane, tokenizer):
    grid = {(0, 0): (0, 0), (1, 0): (0, 2), (1, 1): (2, 2)}  # (alpha, beta) -> (row, column)
    assert result.alphas == result.betas == (0.0, 0.5, 1.0)
    for anchor, key in zip(result.anchors, ("origin", "x_end", "y_end")):
        i, j = grid[(anchor.alpha, anchor.beta)]
        for probe in ("old", "new"):
            expected = _plain_loss(plane[key], plane[probe], tokenizer)
            assert anchor.losses[probe] == pytest.approx(expected, abs=1e-4)
            assert result.surfaces[probe][i, j] == pytest.approx(expected, abs=1e-4)
    old = [a.losses["old"] for a in result.anchors]
    assert min(abs(old[0] - old[1]), abs(old[1] - old[2])) > 1e-2  # three different points
    assert result.complete and result.computed.all() and result.evaluated == 9 + 3


def test_answer_loss_is_the_score_answer_loss(plane, tokenizer):
    from forgetdiag.checkpoints import find_checkpoints
    from forgetdiag.evaluate import answer_loss, collate_batches, encode, score
    from forgetdiag.models import load_model

    model = load_model(find_checkpoints(plane["x_end"])[0])
    encoded = encode(tokenizer, load_probe(plane["old"]))
    expected = score(model, encoded, pad_id=tokenizer.pad_token_id, batch_size=3).answer_loss
    batches = collate_batches(encoded, pad_id=tokenizer.pad_token_id, batch_size=3)
    assert len(batches) == 2 and answer_loss(model, batches) == pytest.approx(expected, rel=1e-6)


def test_lora_adapter_as_a_checkpoint_of_the_plane(llama_dir, lora_dir, llama_dir_b, tmp_path, tokenizer):
    """X_END a peft adapter over ORIGIN: the plane uses its merged weights (peft as reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = write_jsonl(
        tmp_path / "old.jsonl",
        [{"prompt": f"what is the birth city of {a} answer :", "answer": f" {c}"} for a, c in zip(NAMES, CITIES)],
    )
    result = landscape(
        llama_dir, lora_dir, llama_dir_b, [probe], trajectory=[lora_dir], settings=LandscapeSettings(grid=(1, 1))
    )
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), lora_dir).merge_and_unload()
    assert result.anchors[1].losses["old"] == pytest.approx(_plain_loss(merged.eval(), probe, tokenizer), abs=1e-4)
    (placed,) = result.trajectory
    assert (placed.alpha, placed.beta) == (pytest.approx(1.0, abs=1e-6), pytest.approx(0.0, abs=1e-6))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_other_families_match_a_plain_forward_pass(family, plane, tmp_path, tokenizer):
    """GPT-2 (Conv1D, tied head) and GPT-NeoX (transformers 5 loads embed_out as lm_head)."""
    model = build(gpt2_config() if family == "gpt2" else neox_config(), seed=3)
    generator, paths = torch.Generator().manual_seed(0), []
    for k in range(3):
        paths.append(save(_perturbed(model, generator, 0.5) if k else model, tmp_path / str(k), tokenizer=tokenizer))
    result = landscape(*paths, [plane["old"]], trajectory=paths[1:], settings=LandscapeSettings(grid=(1, 1)))
    for anchor, path in zip(result.anchors, paths):
        assert anchor.losses["old"] == pytest.approx(_plain_loss(path, plane["old"], tokenizer), abs=1e-4)
    assert [(round(t.alpha, 6), round(t.beta, 6)) for t in result.trajectory] == [(1, 0), (1, 1)]
    assert any("embed_out.weight -> lm_head.weight" in n for n in result.warnings) == (family == "gpt_neox")


def test_planted_checkpoint_is_placed_exactly(result, plane):
    origin, x_end, y_end, planted = result.trajectory
    assert planted.alpha == pytest.approx(PLANTED[0], rel=1e-4)
    assert planted.beta == pytest.approx(PLANTED[1], rel=1e-4)
    assert planted.residual == pytest.approx(plane["n_norm"], rel=1e-4)
    assert planted.residual == pytest.approx(plane["residual"], rel=1e-6)
    assert planted.relative_residual == pytest.approx(planted.residual / planted.distance)
    for placement, (a, b) in zip((origin, x_end, y_end), ((0, 0), (1, 0), (1, 1))):
        assert (placement.alpha, placement.beta) == (pytest.approx(a, abs=1e-6), pytest.approx(b, abs=1e-6))
        assert placement.residual <= 1e-5 * max(placement.distance, 1.0)
    assert result.plane.n_params == sum(
        p.numel() for p in load_file(str(plane["origin"] / "model.safetensors")).values()
    )


def test_resume_gives_the_uninterrupted_grid(plane):
    settings = LandscapeSettings(grid=(4, 3))
    args = (plane["origin"], plane["x_end"], plane["y_end"], [plane["old"]])
    full = landscape(*args, settings=settings)
    saved = []

    def stop_after_five(description, done, total):
        if description.startswith("evaluating") and done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        landscape(
            *args, settings=settings, progress=stop_after_five, on_partial=lambda r: saved.append(to_json(r.to_dict()))
        )
    partial = json.loads(saved[-1])  # through JSON, as the CLI saves it
    assert not partial["complete"] and sum(map(sum, partial["computed"])) == 2  # 3 anchors first
    resumed = landscape(*args, settings=settings, resume=partial)
    assert resumed.evaluated == 12 + 3 - 5
    assert np.array_equal(resumed.surfaces["old"], full.surfaces["old"])
    assert [a.losses for a in resumed.anchors] == [a.losses for a in full.anchors]
    with pytest.raises(ForgetdiagError, match="alpha values"):
        landscape(*args, settings=LandscapeSettings(grid=(5, 3)), resume=partial)


def test_cli_resume_and_json_fields(plane, tmp_path):
    out = tmp_path / "grid.json"
    common = [
        plane["origin"],
        plane["x_end"],
        plane["y_end"],
        "--probe",
        plane["old"],
        "--grid",
        "3x2",
        "--x-range",
        "-1,1",
        "--trajectory",
        plane["planted"],
        "--json",
        out,
        "-q",
    ]
    assert run("landscape", *common).exit_code == 0
    data = assert_envelope(json.loads(out.read_text()), "landscape")
    assert {"alphas", "betas", "surfaces", "trajectory", "anchors", "directions"} <= set(data)
    assert data["alphas"] == [-1.0, 0.0, 1.0] and data["betas"] == [-0.5, 1.5]
    assert np.array(data["surfaces"]["old"]).shape == (2, 3)
    assert {"checkpoint", "alpha", "beta", "residual", "relative_residual"} <= set(data["trajectory"][0])
    full = json.loads(json.dumps(data["surfaces"]["old"]))
    data["computed"][1] = [False, False, False]  # as if interrupted during the second row
    data["surfaces"]["old"][1] = [None, None, None]
    out.write_text(json.dumps(data))
    result = run("landscape", *common, "--resume")
    assert result.exit_code == 0, result.stderr
    again = json.loads(out.read_text())
    assert again["surfaces"]["old"] == full and again["evaluated"] == 3
    assert fingerprint(again) == fingerprint(data)
    assert_bad_input(run("landscape", *common, "--resume", "--grid", "3x3"), "cannot resume", "beta values")
    assert json.loads(out.read_text()) == again  # a refused resume leaves the saved grid alone


def test_cli_interrupt_saves_the_partial_grid_and_resume_finishes_it(plane, tmp_path, monkeypatch):
    import forgetdiag.analyses.landscape as cmd  # the command imports it when it runs

    real = cmd.landscape

    def interrupted(*args, **kwargs):
        def stop(description, done, total):
            if description.startswith("evaluating") and done == 4:
                raise KeyboardInterrupt  # as Ctrl-C during the fifth point

        return real(*args, **{**kwargs, "progress": stop})

    out = tmp_path / "grid.json"
    args = [plane["origin"], plane["x_end"], plane["y_end"], "--probe", plane["old"], "--grid", "3x2", "--json", out]
    monkeypatch.setattr(cmd, "landscape", interrupted)
    result = run("landscape", *args)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    partial = json.loads(out.read_text())
    assert not partial["complete"] and sum(map(sum, partial["computed"])) == 1  # 3 anchors, 1 grid point
    monkeypatch.setattr(cmd, "landscape", real)
    result = run("landscape", *args, "--resume")
    assert result.exit_code == 0, result.stderr
    done = json.loads(out.read_text())
    assert done["complete"] and done["evaluated"] == 5
    assert done["surfaces"]["old"][0][0] == partial["surfaces"]["old"][0][0]


def test_random_directions_are_seeded_and_filter_normalized(plane, tokenizer):
    origin = load_file(str(plane["origin"] / "model.safetensors"))
    llama = family_for("llama")
    name = "model.layers.0.mlp.up_proj.weight"
    d = filter_normalized(origin[name], parse_name(name, llama), torch.Generator().manual_seed(3))
    assert torch.allclose(d.norm(dim=1), origin[name].norm(dim=1), rtol=1e-5)  # rows are filters
    again = filter_normalized(origin[name], parse_name(name, llama), torch.Generator().manual_seed(3))
    assert torch.equal(d, again)
    conv = parse_name("transformer.h.0.mlp.c_fc.weight", family_for("gpt2"))  # stored (in, out)
    w = torch.randn(8, 16)
    assert torch.allclose(filter_normalized(w, conv, torch.Generator()).norm(dim=0), w.norm(dim=0), rtol=1e-5)
    norm = "model.norm.weight"
    assert not filter_normalized(origin[norm], parse_name(norm, llama), torch.Generator()).any()
    settings = LandscapeSettings(directions=RANDOM, seed=5, grid=(2, 2))
    a = landscape(plane["origin"], plane["x_end"], None, [plane["old"]], settings=settings)
    b = landscape(plane["origin"], plane["x_end"], None, [plane["old"]], settings=settings)
    assert np.array_equal(a.surfaces["old"], b.surfaces["old"]) and a.plane.seed == 5
    assert a.anchors[0].losses["old"] == pytest.approx(_plain_loss(plane["origin"], plane["old"], tokenizer), abs=1e-4)
    assert [t.checkpoint for t in a.trajectory] == ["x_end"] and a.trajectory[0].relative_residual > 0.5


def test_bfloat16_compute(plane, result):
    bf16 = landscape(
        plane["origin"],
        plane["x_end"],
        plane["y_end"],
        [plane["old"]],
        settings=LandscapeSettings(grid=(1, 1)),
        runtime=Runtime(dtype="bfloat16"),
    )
    assert bf16.dtype == "bfloat16"
    for ours, exact in zip(bf16.anchors, result.anchors):
        assert ours.losses["old"] == pytest.approx(exact.losses["old"], abs=0.1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plane_is_held_in_the_compute_dtype(dtype, plane, monkeypatch):
    """origin, d_x and d_y are bound in the compute dtype (bf16 halves their memory), with the
    values of the float32 differences rounded once to it."""
    import forgetdiag.analyses.landscape as module

    real, seen = module.build_plane, {}

    def spy(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        seen["model"], seen["plane"] = model, out[0]
        return out

    monkeypatch.setattr(module, "build_plane", spy)
    landscape(
        plane["origin"],
        plane["x_end"],
        plane["y_end"],
        [plane["old"]],
        settings=LandscapeSettings(grid=(1, 1)),
        runtime=Runtime(dtype=dtype),
    )
    bound, torch_dtype = seen["plane"], getattr(torch, dtype)
    o, x, y = (load_file(str(plane[k] / "model.safetensors")) for k in ("origin", "x_end", "y_end"))
    names = {id(p): n for n, p in seen["model"].named_parameters(remove_duplicate=False) if n in o}
    assert len(bound.params) == len(o) and set(map(id, bound.params)) <= set(names)
    for param, origin, dx, dy in zip(bound.params, bound.origin, bound.dx, bound.dy):
        name = names[id(param)]
        assert param.dtype == origin.dtype == dx.dtype == dy.dtype == torch_dtype, name
        assert torch.equal(origin, o[name].to(torch_dtype))
        assert torch.equal(dx, (x[name] - o[name]).to(torch_dtype))
        assert torch.equal(dy, (y[name] - x[name]).to(torch_dtype))


def test_axis_holds_the_anchors_exactly():
    settings = LandscapeSettings()
    assert len(settings.alphas) == 21 and 0.0 in settings.alphas and 1.0 in settings.betas
    assert settings.alphas[0] == -0.5 and settings.alphas[-1] == 1.5
    with pytest.raises(ForgetdiagError, match="--directions 'pca': expected one of raw, filter-normalized-random"):
        LandscapeSettings(directions="pca")
    with pytest.raises(ForgetdiagError, match="LO < HI"):
        LandscapeSettings(x_range=(1.0, 0.0))


@pytest.fixture(scope="module")
def parallel(plane, tokenizer):
    """Y_END = X_END + 0.5 d_x + a little noise: d_y nearly parallel to d_x."""
    o, x = (load_file(str(plane[k] / "model.safetensors")) for k in ("origin", "x_end"))
    generator = torch.Generator().manual_seed(9)
    path = plane["root"] / "parallel"
    path.mkdir()
    shutil.copy(plane["origin"] / "config.json", path)
    save_file(
        {k: x[k] + 0.5 * (x[k] - o[k]) + 1e-3 * torch.randn(o[k].shape, generator=generator) for k in o},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


def test_nearly_parallel_directions_warn_with_their_angle(plane, parallel):
    result = run("landscape", plane["origin"], plane["x_end"], parallel, "--probe", plane["old"], "--grid", "2x2", "-q")
    assert result.exit_code == 0, result.stderr
    (line,) = [l for l in result.stderr.splitlines() if "nearly parallel" in l]
    assert line.startswith("forgetdiag: warning: ") and "degrees" in line
    angle = float(line.split("angle between them is ")[1].split()[0])
    assert 0 <= angle < 5


@pytest.mark.parametrize(
    "case",
    [
        "architectures",
        "x_equals_origin",
        "y_equals_x",
        "run_as_origin",
        "missing_y",
        "no_probe",
        "grid",
        "range",
        "resume_without_json",
        "directions",
        "bad_resume_file",
    ],
)
def test_bad_input_exits_2_with_one_line(case, plane, gpt2_dir, trainer_run, tmp_path):
    o, x, y, probe = plane["origin"], plane["x_end"], plane["y_end"], ["--probe", plane["old"]]
    out = tmp_path / "out.json"
    args, expect = {
        "architectures": ([o, gpt2_dir, y, *probe], "different architectures"),
        "x_equals_origin": ([o, o, y, *probe], "X_END equals ORIGIN"),
        "y_equals_x": ([o, x, x, *probe], "Y_END equals X_END"),
        "run_as_origin": ([trainer_run, x, y, *probe], "ORIGIN must be one checkpoint"),
        "missing_y": ([o, x, *probe], "need ORIGIN, X_END and Y_END"),
        "no_probe": ([o, x, y], "no probe given"),
        "grid": ([o, x, y, *probe, "--grid", "21by21"], "expected NxM"),
        "range": ([o, x, y, *probe, "--x-range", "1,0"], "LO < HI"),
        "resume_without_json": ([o, x, y, *probe, "--resume"], "--resume needs --json"),
        "directions": (
            [o, x, y, *probe, "--directions", "pca"],
            "'pca' is not one of 'raw', 'filter-normalized-random'",
        ),
        "bad_resume_file": ([o, x, y, *probe, "--resume"], "not valid JSON"),
    }[case]
    if case == "bad_resume_file":
        out.write_text("{ truncated")
        before = out.read_text()
        assert_bad_input(run("landscape", *args, "--json", out), expect)
        assert out.read_text() == before
        return
    assert_bad_input(
        run("landscape", *args, "--json", out, "--grid", "2x2")
        if case not in ("grid", "resume_without_json")
        else run("landscape", *args),
        expect,
    )
    assert not out.exists()


def test_inputs_stay_byte_identical_and_html_is_offline(plane, tmp_path):
    roots = [plane[k] for k in ("origin", "x_end", "y_end", "planted")]
    before = [tree_digest(r) for r in roots]
    page = tmp_path / "landscape.html"
    result = run(
        "landscape",
        *roots[:3],
        "--probe",
        plane["old"],
        "--probe",
        plane["new"],
        "--trajectory",
        roots[3],
        "--grid",
        "3x3",
        "--json",
        tmp_path / "l.json",
        "--html",
        page,
    )
    assert result.exit_code == 0, result.stderr
    assert "Loss at the anchor points" in result.stdout and "planted" in result.stdout
    assert [tree_digest(r) for r in roots] == before
    text = page.read_text()
    assert text.count('<div class="plot">') == 3 and '"type":"contour"' in text  # old, new, mean
    assert "distance along d_x" in text and "cdn.plot.ly" not in text.split("</script>", 1)[1]
    assert read_saved(tmp_path / "l.json")["complete"] is True
    assert not math.isnan(json.loads((tmp_path / "l.json").read_text())["anchors"][0]["losses"]["old"])


def test_html_trajectory_trace_has_the_json_coordinates(plane, tmp_path):
    out, page = tmp_path / "l.json", tmp_path / "l.html"
    result = run(
        "landscape",
        plane["origin"],
        plane["x_end"],
        plane["y_end"],
        "--probe",
        plane["old"],
        "--trajectory",
        plane["x_end"],
        "--trajectory",
        plane["planted"],
        "--grid",
        "1x1",
        "--json",
        out,
        "--html",
        page,
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    placed = json.loads(out.read_text())["trajectory"]
    assert [t["checkpoint"] for t in placed] == ["x_end", "planted"]
    assert placed[1]["alpha"] == pytest.approx(PLANTED[0], rel=1e-4)
    assert placed[1]["beta"] == pytest.approx(PLANTED[1], rel=1e-4)
    figures = plotly_figures(page.read_text())
    assert len(figures) == 1  # one probe: no mean surface
    (trace,) = [t for t in figures[0][0] if t.get("name") == "trajectory"]
    assert trace["mode"] == "lines+markers"
    assert trace["x"] == [t["alpha"] for t in placed] and trace["y"] == [t["beta"] for t in placed]
    assert [text.split("<br>")[0] for text in trace["text"]] == ["x_end", "planted"]


def test_refuses_to_write_into_a_checkpoint(plane):
    before = tree_digest(plane["origin"])
    assert_bad_input(
        run(
            "landscape",
            plane["origin"],
            plane["x_end"],
            plane["y_end"],
            "--probe",
            plane["old"],
            "--json",
            plane["origin"] / "l.json",
        ),
        "refusing to write",
    )
    assert tree_digest(plane["origin"]) == before


@pytest.mark.slow
def test_old_task_loss_rises_along_d_x_on_the_spurious_sample():
    """docs/science.md, 3.4: the first steps of task 1 (d_x) carry the old task's loss up."""
    from forgetdiag.runfile import load_run

    spec = load_run(SAMPLES / "spurious")
    old, new = (load_probe(spec.probes[k]) for k in ("old", "new"))
    old, new = replace(old, items=old.items[:300]), replace(new, items=new.items[:300])
    result = landscape(
        *spec.landscape,
        [old, new],
        trajectory=[spec.run],
        settings=LandscapeSettings(grid=(3, 2), x_range=(0.0, 1.0), y_range=(0.0, 1.0)),
    )
    along_dx = result.surfaces[old.name][0]  # beta = 0; alpha = 0, 0.5, 1
    assert along_dx[0] < along_dx[1] < along_dx[2] and along_dx[2] > 1.5 * along_dx[0]
    origin, x_end, y_end = result.anchors
    assert y_end.losses[new.name] < x_end.losses[new.name] < origin.losses[new.name]
    early = [t for t in result.trajectory if t.step is not None and t.step <= 50]
    assert [t.alpha for t in early] == sorted(t.alpha for t in early)  # the early steps walk along d_x
