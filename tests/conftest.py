"""Session fixtures: tiny llama, gpt2 and gpt-neox checkpoints in every supported form."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread on small machines; FORGETDIAG_TEST_THREADS=2 runs the
# suite with two (the planted runs must give the same truths either way).
torch.set_num_threads(int(os.environ.get("FORGETDIAG_TEST_THREADS", "1")))

from helpers import (  # noqa: E402
    build,
    gpt2_config,
    llama_config,
    make_tokenizer,
    neox_config,
    save,
    save_pickle_only,
    write_malicious_pickle,
)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    """A 2-layer llama (GQA, tied embeddings) with a tokenizer, fp32 safetensors."""
    return save(build(llama_config(), seed=0), tmp_path_factory.mktemp("llama") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def llama_dir_b(tmp_path_factory, tokenizer):
    """Another llama of the same architecture (different weights)."""
    return save(build(llama_config(), seed=1), tmp_path_factory.mktemp("llama_b") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def llama12_dir(tmp_path_factory):
    """12 layers, so that layer 1 and layers 10, 11 can be told apart."""
    return save(
        build(llama_config(layers=12, hidden=16, heads=2, kv_heads=1, inter=32), seed=2),
        tmp_path_factory.mktemp("llama12") / "model",
    )


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    return save(build(gpt2_config(), seed=3), tmp_path_factory.mktemp("gpt2") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def neox_dir(tmp_path_factory, tokenizer):
    return save(build(neox_config(), seed=4), tmp_path_factory.mktemp("neox") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def sharded_dir(tmp_path_factory, llama_dir):
    """The llama of ``llama_dir`` saved in several safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    path = save(model, tmp_path_factory.mktemp("sharded") / "model", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="session", params=["float16", "bfloat16"])
def half_dir(request, tmp_path_factory, llama_dir):
    """The llama of ``llama_dir`` stored in fp16 or bf16."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    dtype = getattr(torch, request.param)
    return save(model, tmp_path_factory.mktemp(request.param) / "model", dtype=dtype)


@pytest.fixture(scope="session")
def pickle_dir(tmp_path_factory):
    """config.json + pytorch_model.bin only."""
    return save_pickle_only(build(llama_config(), seed=5), tmp_path_factory.mktemp("pickle") / "model")


@pytest.fixture(scope="session")
def trainer_run(tmp_path_factory, tokenizer):
    """A Trainer output dir: checkpoint-5, -50, -100 with the Trainer's own (booby-trapped) pickles.

    Each checkpoint's optimizer.pt etc. would create ``<run>/../UNPICKLED`` if anyone loaded it.
    """
    root = tmp_path_factory.mktemp("trainer")
    run = root / "run"
    marker = root / "UNPICKLED"
    for k, step in enumerate((100, 5, 50)):  # created out of order on purpose
        path = save(build(llama_config(), seed=10 + k), run / f"checkpoint-{step}", tokenizer=tokenizer)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            write_malicious_pickle(path / name, marker)
        (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return run


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, llama_dir):
    """A peft LoRA adapter over ``llama_dir`` (q_proj, v_proj, down_proj; r=4, alpha=8),
    with planted non-zero A and B so the update is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    path = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(path)
    return path


@pytest.fixture()
def copy_tree(tmp_path):
    """Copy a directory into this test's tmp dir (for tests that damage files)."""

    def copy(src, name="copy"):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy


def pytest_collection_modifyitems(config, items):
    """The longest module (the shipped samples' recoveries) first: with pytest-xdist's per-file
    scheduling one worker starts on it while the others take the rest, instead of it running
    alone at the end."""
    items.sort(key=lambda item: item.path.name != "test_samples.py")  # stable: order kept otherwise
