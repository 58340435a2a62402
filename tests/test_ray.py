"""``--ray``: the per-tensor work of ``angles`` and ``inspect`` on a local Ray runtime (2 CPUs, one
per module) gives what one process gives; bad input found on a worker is one line, exit 2; tasks
receive paths and names, never tensor bytes. And ``--device-map``'s plumbing on a CPU map."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_families import PLANTS, config, plant_in
from typer.testing import CliRunner

from forgetdiag import distributed
from forgetdiag.analyses.angles import compute_angles
from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.cli import app
from forgetdiag.distributed import plan_tasks
from forgetdiag.errors import CheckpointError, ForgetdiagError
from forgetdiag.runtime import Runtime

from helpers import assert_bad_input, gpt2_config, llama_config, neox_config, planted_run

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _noise(params, k):
    g = torch.Generator().manual_seed(100 + k)
    for p in params.values():
        p.data += 0.01 * torch.randn(p.shape, generator=g)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, lora_dir, llama_dir):
    """Triples of several families: llama (GQA), gpt2 (fused c_attn), neox (fused
    query_key_value), a Mixtral MoE with one planted expert, and LoRA adapters over one base."""
    root = tmp_path_factory.mktemp("ray_runs")
    out = {
        name: planted_run(root / name, cfg, _noise)
        for name, cfg in {"llama": llama_config(), "gpt2": gpt2_config(), "neox": neox_config()}.items()
    }
    out["mixtral"] = planted_run(root / "mixtral", config("mixtral"), lambda p, k: plant_in(p, k, PLANTS["mixtral"]))
    second = root / "lora2"
    second.mkdir()
    shutil.copy(lora_dir / "adapter_config.json", second / "adapter_config.json")
    g = torch.Generator().manual_seed(11)
    factors = load_file(str(lora_dir / "adapter_model.safetensors"))
    save_file(
        {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in factors.items()},
        str(second / "adapter_model.safetensors"),
    )
    out["lora"] = [llama_dir, lora_dir, second]
    return out


def _json(tmp_path, name, *args):
    target = tmp_path / f"{name}.json"
    result = run(*args, "--json", target, "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(target.read_text())
    data.pop("timings_s")
    return data


def test_ray_gives_the_records_of_one_process(ray_cluster, runs, tmp_path):
    for family, paths in runs.items():
        one = _json(tmp_path, f"{family}_one", "angles", *paths)
        on_ray = _json(tmp_path, f"{family}_ray", "angles", *paths, "--ray", "local")
        assert on_ray == one, family
        assert len(one["records"]) > 4 and any(r["status"] == "ok" for r in one["records"]), family
        parts = {r["part"] for r in one["records"]}
        if family in ("gpt2", "neox"):
            assert {"q", "k", "v"} <= parts, family  # fused q/k/v split into its parts
        if family == "mixtral":
            assert any(r["expert"] is not None for r in one["records"])
        one = _json(tmp_path, f"{family}_inspect_one", "inspect", *paths)
        assert _json(tmp_path, f"{family}_inspect_ray", "inspect", *paths, "--ray", "local") == one, family


def test_no_task_receives_tensor_bytes(ray_cluster, runs, monkeypatch):
    """Every argument a task is given, pickled as Ray pickles it: no tensor or array inside, and
    all of them together a small fraction of the tensor bytes the tasks read."""
    from ray import cloudpickle

    paths = runs["mixtral"]
    submitted: list = []
    monkeypatch.setattr(distributed, "SUBMITTED", submitted)
    compute_angles(paths, runtime=Runtime(ray="local"))
    angle_tasks = len(submitted)
    resolve = resolve_checkpoints(paths)
    from forgetdiag.analyses.inspect import inspect_checkpoints

    inspect_checkpoints(paths, runtime=Runtime(ray="local"))
    assert angle_tasks >= 2 and len(submitted) > angle_tasks  # the work was split

    found = []

    class Counting(cloudpickle.CloudPickler):
        def reducer_override(self, obj):
            if isinstance(obj, (torch.Tensor, torch.UntypedStorage)) or type(obj).__module__.startswith("numpy"):
                found.append(type(obj).__name__)
            return super().reducer_override(obj)

    sent = 0
    for args in submitted:
        buffer = io.BytesIO()
        Counting(buffer).dump(args)
        sent += buffer.tell()
    tensor_bytes = sum(f.stat().st_size for c in resolve for f in c.weight_files)
    assert found == []
    assert sent < 0.05 * tensor_bytes, (sent, tensor_bytes)  # names, shapes and paths only


def _nan(path, name):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def test_bad_input_on_a_worker_is_one_line(ray_cluster, runs, copy_tree, monkeypatch):
    paths = runs["llama"]
    bad = copy_tree(paths[2], "nan")
    name = "model.layers.1.mlp.up_proj.weight"
    file = _nan(bad, name)
    submitted: list = []
    monkeypatch.setattr(distributed, "SUBMITTED", submitted)
    for command in ("angles", "inspect"):
        assert_bad_input(run(command, paths[0], paths[1], bad, "--ray", "local", "--quiet"), name, str(file))
    assert submitted  # found on a worker: the driver never reads tensor values
    # an unreadable shard: truncated after the driver read its header
    found = resolve_checkpoints([paths[0], paths[1], copy_tree(paths[2], "short")])
    shard = found[2].weight_files[0]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError) as caught:
        compute_angles(found, runtime=Runtime(ray="local"))
    assert str(shard) in str(caught.value) and "\n" not in str(caught.value)


def test_a_failure_returns_only_once_the_other_tasks_are_cancelled(ray_cluster, monkeypatch):
    """After one task fails, the others are force-cancelled and run_tasks returns only when
    every cancellation has landed: a worker still to be killed could otherwise be given the
    next command's task and take it down (a WorkerCrashedError seen in CI)."""

    def fail_first(k: int) -> int:  # defined here: Ray ships it by value (tests/ is no package)
        if k == 0:
            raise CheckpointError("bad tensor")
        time.sleep(3.0)
        return k

    cancelled = []
    cancel = ray_cluster.cancel
    monkeypatch.setattr(ray_cluster, "cancel", lambda ref, **kw: (cancelled.append(ref), cancel(ref, **kw)))
    with pytest.raises(CheckpointError, match="bad tensor"):
        distributed.run_tasks("local", fail_first, lambda cpus: [(0,), (1,), (2,), (3,)])
    assert cancelled
    _, unfinished = ray_cluster.wait(cancelled, num_returns=len(cancelled), timeout=0)
    assert unfinished == []
    assert distributed.run_tasks("local", fail_first, lambda cpus: [(1,), (2,)]) == [1, 2]


def test_ray_missing_is_one_line_with_the_install_command(llama_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ForgetdiagError, match=r"pip install 'forgetdiag\[ray\]'"):
        Runtime(ray="local")
    assert_bad_input(run("inspect", llama_dir, "--ray", "local"), "pip install 'forgetdiag[ray]'")
    assert "--ray" not in run("score", "--help").output  # only the weight analyses take it
    assert "--device-map" in run("score", "--help").output


def test_plan_tasks_groups_by_file_largest_first():
    units = [("a1", "A", 10), ("a2", "A", 10), ("a3", "A", 10), ("b1", "B", 50), ("c1", "C", 1)]
    tasks = plan_tasks(units, cpus=2)  # target 81 // 8 = 10 bytes: a file splits, files never mix
    assert tasks == [["b1"], ["a1"], ["a2"], ["a3"], ["c1"]]
    assert plan_tasks(units, cpus=0)[0] == ["b1"]
    assert sorted(u for t in plan_tasks(units, cpus=1) for u in t) == ["a1", "a2", "a3", "b1", "c1"]


def test_device_map_loads_through_accelerate_and_scores_the_same(llama_dir, monkeypatch):
    """The plumbing of --device-map on a CPU-only machine: from_pretrained gets the map, accelerate
    places every layer (all on the CPU here), and the model computes what a plain load does."""
    from transformers import AutoModelForCausalLM

    from forgetdiag.models import load_model

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    checkpoint = resolve_checkpoints(llama_dir, single="MODEL")
    mapped = load_model(checkpoint, Runtime(device_map="auto"))
    assert seen["device_map"] == "auto"
    # one device (the CPU here): transformers sets no hf_device_map; several GPUs would set one
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    plain = load_model(checkpoint, Runtime())
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(mapped(ids).logits, plain(ids).logits)
    with pytest.raises(ForgetdiagError, match="--device-map"):
        Runtime(device_map="everywhere")
