"""Shared fixtures: a tiny DeepSeek-like model built offline once per test session."""

import os

import pytest

# Tests never reach a model hub, and never use more threads than CI's 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
