"""Shared fixtures: a tiny offline tokenizer and tiny random llama models (fast CPU tests, no network).

POTSTILL_HOME (the model cache) points at one fresh directory for the whole session, so the embedded
teacher is converted at most once per run and nothing leaks into the user's cache; set
POTSTILL_TEST_HOME to reuse a cache across runs.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["POTSTILL_HOME"] = os.environ.get("POTSTILL_TEST_HOME") or tempfile.mkdtemp(prefix="potstill-home-")

import pytest  # noqa: E402

from tests.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny llama (4 layers, peaked outputs) + tokenizer directory, usable as a teacher spec."""
    path = tmp_path_factory.mktemp("tiny-teacher")
    save_tiny_model(path, make_tiny_model(tiny_tokenizer, layers=4, seed=0, init=0.4), tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """The twelve tiny-pipeline prompts of test_pipeline.PROMPTS as a JSONL file."""
    import json

    from tests.pipeline_fixtures import PROMPTS

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path
