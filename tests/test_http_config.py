"""The HTTP teacher's options have one home (config.HttpConfig): CLI flags and recipes reach the teacher.

A real uvicorn server on 127.0.0.1 (tests/http_fixtures.py) counts the requests it is sent.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from click.testing import CliRunner

from potstill.capture.generate import generate
from potstill.capture.store import Capture
from potstill.cli import app
from potstill.config import GenerateConfig, HttpConfig, build, load_recipe
from potstill.teachers.http import HTTPTeacher
from tests.http_fixtures import FakeOpenAIServer

QUIET = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def fake(tiny_tokenizer):
    srv = FakeOpenAIServer(tiny_tokenizer).start()
    yield srv
    srv.stop()


def _cli_generate(fake, prompts_file, tiny_model_dir, out, *extra) -> None:
    args = ["generate", "--teacher", fake.url, "--model", "fake-model", "--tokenizer", str(tiny_model_dir),
            "--prompts", str(prompts_file), "--max-prompts", "3", "--max-new-tokens", "8", "--top-k", "3",
            "--out", str(out), "--http-api-key-env", "", "--http-backoff-base", "0.01", *extra]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _rows(directory) -> list[tuple]:
    table = Capture.open(directory).table(["id", "completion_ids"])
    return sorted(zip(table.column("id").to_pylist(), table.column("completion_ids").to_pylist(), strict=True))


def test_cli_flag_switches_the_response_cache_on(fake, prompts_file, tiny_model_dir, tmp_path):
    fake.reset("openai-chat")
    cache = tmp_path / "cache"
    _cli_generate(fake, prompts_file, tiny_model_dir, tmp_path / "a", "--http-cache", "--http-cache-dir", str(cache))
    sent = len(fake.completion_requests)
    assert sent == 3 and len(list(cache.rglob("*.json"))) == 3
    # a second identical run (a new capture dir, so no resume) is served from the cache: no request reaches the server
    _cli_generate(fake, prompts_file, tiny_model_dir, tmp_path / "b", "--http-cache", "--http-cache-dir", str(cache))
    assert len(fake.completion_requests) == sent
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


def test_without_the_cache_a_second_run_asks_again(fake, prompts_file, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default cache dir is relative: nothing may appear there either
    fake.reset("openai-chat")
    _cli_generate(fake, prompts_file, tiny_model_dir, tmp_path / "a")
    _cli_generate(fake, prompts_file, tiny_model_dir, tmp_path / "b")
    assert len(fake.completion_requests) == 6 and not (tmp_path / "runs" / "http_cache").exists()


def test_recipe_override_reaches_the_teacher(fake, prompts_file, tiny_model_dir, tmp_path):
    fake.reset("openai-chat")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"generate:\n  teacher: {fake.url}\n  model: fake-model\n  tokenizer: {tiny_model_dir}\n"
                      f"  prompts: {prompts_file}\n  max_prompts: 2\n  max_new_tokens: 8\n  top_k: 3\n"
                      f"  http_api_key_env: ''\n  http_concurrency: 1\n")
    for out in ("a", "b"):
        data = load_recipe(recipe, [f"generate.out={tmp_path / out}", "generate.http_cache=true",
                                    f"generate.http_cache_dir={tmp_path / 'cache'}"])
        cfg = build(GenerateConfig, data["generate"], str(recipe))
        assert cfg.http_cache is True and cfg.http_teacher_kwargs()["cache_dir"] == str(tmp_path / "cache")
        generate(cfg, log=QUIET)
    assert len(fake.completion_requests) == 2 and fake.max_in_flight == 1
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


def test_http_teacher_defaults_are_the_configs():
    """HTTPTeacher's keyword defaults come from HttpConfig: one default per setting."""
    kwargs = HttpConfig().http_teacher_kwargs()
    params = inspect.signature(HTTPTeacher).parameters
    for name, value in kwargs.items():
        assert params[name].default == value, name
    assert {f.name for f in dataclasses.fields(HttpConfig)} <= {f.name for f in dataclasses.fields(GenerateConfig)}
