"""Shared fixtures: everything offline, on CPU, in temp folders; a tiny DeepSeek-like model built once."""

import os
import shutil
from pathlib import Path

import pytest

# Tests never reach a model hub, and never use more threads than CI's 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped when no GPU is present)")
    config.addinivalue_line("markers", "slow: long-running; run on demand with -m slow")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """builtin: models and the tokenization cache live in a per-session temp folder, never in ~/.cache."""
    cache = tmp_path_factory.mktemp("finllm_cache")
    old = os.environ.get("FINLLM_CACHE")
    os.environ["FINLLM_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FINLLM_CACHE", None)
    else:
        os.environ["FINLLM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(_isolated_cache) -> Path:
    from finllm_pl.assets import ensure_builtin

    return ensure_builtin("tiny-deepseek")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from finllm_pl.model import load_tokenizer

    return load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short fit of the smoke config, once per test module: (run folder, adapter folder, last.ckpt)."""
    from finllm_pl.__main__ import cli_main

    run = tmp_path_factory.mktemp("fit")
    cli_main(["fit", "--config", str(ROOT / "configs/smoke.yaml"), "--data.train_path", str(ROOT / "data/sample.jsonl"),
              "--trainer.max_steps", "6", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
              "--trainer.default_root_dir", str(run), "--checkpoint.dirpath", str(run / "ck"),
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    return run, run / "ck" / "adapter", run / "ck" / "last.ckpt"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temp working folder holding a copy of the bundled sample and configs (runs write checkpoints/ here)."""
    shutil.copytree(ROOT / "data", tmp_path / "data")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path
