"""Shared fixtures: a tiny offline tokenizer and tiny random llama models (fast CPU tests, no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny llama (2 layers) + tokenizer directory, usable as a teacher spec."""
    path = tmp_path_factory.mktemp("tiny-teacher")
    save_tiny_model(path, make_tiny_model(tiny_tokenizer, layers=4, seed=0, init=0.4), tiny_tokenizer)
    return path


@pytest.fixture(autouse=True)
def _potstill_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("POTSTILL_HOME", os.environ.get("POTSTILL_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "home"))
