"""`potstill agent` CLI: bad input is one line naming file:line, exit 2, nothing written."""

from __future__ import annotations

from click.testing import CliRunner

from potstill.cli import app


def test_bad_task_file_exits_2_with_file_and_line(tmp_path):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "q", "answer": 5}\n')
    out = tmp_path / "cap"
    res = CliRunner().invoke(app, ["agent", "generate", "--tasks", str(bad), "--out", str(out)])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: {bad}:2: field 'answer' must be a non-empty string"
    assert not out.exists()


def test_unknown_builtin_and_bad_recipe_section(tmp_path):
    res = CliRunner().invoke(app, ["agent", "eval", "--tasks", "builtin:nope", "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "builtin:nope" in res.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text("agent_generate: {samples: 1}\nagent_evl: {}\n")
    res = CliRunner().invoke(app, ["run", str(recipe)])
    assert res.exit_code == 2 and "unknown section 'agent_evl'" in res.stderr
