"""The data-informed null of ``angles`` on planted updates ``X^T G`` from a chosen spectrum."""

from types import SimpleNamespace

import numpy as np
import torch

from forgetdiag.analyses.angle_pairs import PairSpec, Update
from forgetdiag.analyses.angle_records import angle_record
from forgetdiag.linalg import update_basis
from forgetdiag.nulls import InputSpectrum, baseline_direction_angle, chance_label
from forgetdiag.runtime import torch_threads

D, N, T, RANK = 64, 128, 400, 8


def _inputs(rng, alpha=1.0):
    scale = np.arange(1, D + 1, dtype=float) ** (-alpha / 2)  # eigenvalues of X^T X ~ i^-alpha
    return rng.standard_normal((T, D)) * scale  # (T, D)


def _update(x, rng):
    """X^T G for a fresh Gaussian G (T, N): (D, N). Single-threaded matmul (threaded BLAS on
    small matrices crawls on shared cores)."""
    with torch_threads(1):
        return (torch.from_numpy(x).mT @ torch.from_numpy(rng.standard_normal((T, N)))).numpy()


def _angle(a, b):
    """Mean angle of b's top-RANK directions to a's top-RANK subspace (reference: a direct SVD
    of each drawn update; one thread, as threaded small SVDs crawl on shared cores)."""
    with torch_threads(1):
        qa = torch.linalg.svd(torch.from_numpy(a), full_matrices=False)[0][:, :RANK].numpy()
        qb = torch.linalg.svd(torch.from_numpy(b), full_matrices=False)[0][:, :RANK].numpy()
    return float(np.degrees(np.arccos(np.clip(np.linalg.norm(qa.T @ qb, axis=0), 0, 1))).mean())


def _record(a, b, spectrum):
    part = SimpleNamespace(tensor=SimpleNamespace(name="w"), part=None, component="q", layer=0, expert=None)
    basis = lambda m: update_basis(torch.from_numpy(m), rank=RANK, energy=None, rtol=1e-6, seed=0, niter=4)
    r = angle_record(part, PairSpec(Update(0, 1), Update(1, 2)), (basis(a), 1.0), (basis(b), 1.0), D)
    null = spectrum.null(N, r.rank_a, r.rank_b)
    return r, null, chance_label(r.angle_deg, null)


def test_data_null_matches_monte_carlo_of_x_transpose_g():
    rng = np.random.default_rng(1)
    x = _inputs(rng)
    spectrum = InputSpectrum(torch.from_numpy(x.T @ x))
    null = spectrum.null(N, RANK, RANK, samples=32)
    # independent reference: draw the updates themselves, X^T G with Gaussian G (T, N)
    direct = [_angle(_update(x, rng), _update(x, rng)) for _ in range(64)]
    assert abs(null.mean_deg - np.mean(direct)) < 1.0
    iso = baseline_direction_angle(RANK, D)
    assert null.mean_deg < iso - 15  # the isotropic null is far off for such updates


def test_independent_updates_at_chance_and_shared_direction_beyond():
    rng = np.random.default_rng(2)
    x = _inputs(rng)
    spectrum = InputSpectrum(torch.from_numpy(x.T @ x))
    a, b = _update(x, rng), _update(x, rng)  # (D, N) each
    record, null, label = _record(a, b, spectrum)
    assert label == "at chance", (record.angle_deg, null)
    assert record.angle_deg < record.baseline_deg - 10  # the isotropic null would call it aligned
    # plant one shared direction in the low-variance tail, strong enough to be kept by both
    u = np.zeros(D)
    u[-1] = 1.0
    size = 3 * np.linalg.norm(a, 2)
    shared_a = a + size * np.outer(u, rng.standard_normal(N) / np.sqrt(N))
    shared_b = b + size * np.outer(u, rng.standard_normal(N) / np.sqrt(N))
    record, null, label = _record(shared_a, shared_b, spectrum)
    assert label == "beyond chance", (record.angle_deg, null)
    assert record.energy_overlap > null.energy_overlap + 0.2


def test_cli_probe_and_null_run_add_the_nulls_to_every_record(trainer_run, tokenizer, tmp_path):
    """``angles RUN --probe P --null-run RUN`` JSON: every covered record has the data-informed
    null and the energy overlap; o/down (hidden side not an input) have no data null; with the
    run itself as the null run, the second-run angle equals the angle."""
    import json
    import random

    from typer.testing import CliRunner

    from forgetdiag.cli import app

    from helpers import WORDS, write_jsonl

    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(6)), "answer": " x"} for _ in range(24)]
    probe = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "a.json"
    args = [
        "angles",
        trainer_run,
        "--probe",
        probe,
        "--null-run",
        trainer_run,
        "--rank",
        4,
        "--json",
        out,
        "--html",
        tmp_path / "a.html",
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())  # the legend, unwrapped
    assert "the data-informed null" in text and "aligned beyond chance" in text
    assert "data-informed null" in (tmp_path / "a.html").read_text()
    records = [r for r in json.loads(out.read_text())["records"] if r["status"] == "ok"]
    covered = [r for r in records if r["component"] in ("q", "k", "v", "gate", "up")]
    assert covered and all(r["baseline_data_deg"] is not None and r["chance"] for r in covered)
    assert all(r["baseline_data_deg"] is None for r in records if r["component"] in ("o", "down", "embed"))
    assert all(0.0 <= r["energy_overlap"] <= 1.0 for r in records)
    assert all(r["baseline_run_deg"] == r["angle_deg"] for r in records)
