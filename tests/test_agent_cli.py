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


def test_recipe_with_a_teacher_that_never_answers_is_all_rejected(tmp_path, tiny_model_dir):
    """A real (tiny, random) local teacher: every episode ends at max_turns, lands in 'rejected',
    and the recipe stops before training with a one-line reason."""
    from potstill.agent.pipeline import run_agent_recipe
    from potstill.agent.sandbox import detect_isolation
    from potstill.capture.store import Capture
    from potstill.errors import PotstillError

    recipe = tmp_path / "agent.yaml"
    recipe.write_text(
        f"agent_generate:\n  tasks: builtin:potstill_tools:30\n  teacher: {tiny_model_dir}\n  samples: 1\n"
        f"  max_tasks: 3\n  max_turns: 2\n  max_new_tokens: 12\n  top_k: 4\n  dtype: float32\n"
        f"  unsafe_sandbox: {str(detect_isolation() == 'none').lower()}\n")
    import pytest

    with pytest.raises(PotstillError, match="solved no training task"):
        run_agent_recipe(recipe, run_dir=str(tmp_path / "run"), log=lambda *_: None)
    cap = Capture.open(tmp_path / "run" / "agentcap")
    rows = list(cap.rows())
    assert len(rows) == 3 and {r["split"] for r in rows} == {"rejected"}
    assert {r["finish_reason"] for r in rows} <= {"max_turns", "context"}
    assert cap.manifest["yield"]["all"] == {"episodes": 3, "verified": 0, "yield": 0.0, "tasks": 3, "tasks_solved": 0}


def test_shipped_agent_recipe_builds_valid_configs():
    from pathlib import Path

    from potstill.agent.pipeline import SECTIONS, is_agent_recipe, load_agent_recipe
    from potstill.config import build

    path = Path(__file__).parents[1] / "recipes" / "agent.yaml"
    assert is_agent_recipe(path)
    data = load_agent_recipe(path, ["agent_generate.samples=2"])
    assert data["agent_generate"]["samples"] == 2
    for name, cls in SECTIONS.items():
        extra = {"teacher": "embedded"} if name == "agent_eval" else {}
        build(cls, {**data.get(name, {}), **extra}, name)
