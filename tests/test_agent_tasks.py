"""Built-in agent tasks and task files: every reference answer passes its checker, wrong ones fail,
splits hold out instances and whole templates, bad files name file:line."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from potstill.agent.sandbox import Limits, Sandbox, detect_isolation
from potstill.agent.tasks import HELDOUT_TEMPLATES, Task, builtin_tasks, check, load_tasks
from potstill.errors import PotstillError


def test_builtin_tasks_are_many_seeded_and_split():
    tasks = load_tasks("builtin:potstill_tools")
    assert len(tasks) >= 300 and len({t.id for t in tasks}) == len(tasks)
    assert [t.question for t in tasks] == [t.question for t in builtin_tasks(seed=0)]
    assert [t.question for t in tasks] != [t.question for t in builtin_tasks(seed=1)]
    kinds = Counter(t.kind for t in tasks)
    assert set(kinds) == {"arithmetic", "dates", "units", "strings", "lists", "primes", "statistics"}
    splits = Counter(t.split for t in tasks)
    assert splits["train"] > 150 and splits["heldout"] > 20 and splits["heldout_template"] > 20
    assert {t.template for t in tasks if t.split == "heldout_template"} == set(HELDOUT_TEMPLATES)
    assert not {t.template for t in tasks if t.split != "heldout_template"} & set(HELDOUT_TEMPLATES)
    assert len(load_tasks("builtin:potstill_tools:30")) == 30


def test_every_reference_answer_passes_and_a_wrong_one_fails():
    sandbox = Sandbox(Limits(wall_seconds=10), allow_unsafe=detect_isolation() == "none")
    sandboxed = 0
    for t in builtin_tasks(n=120):
        if t.checker["type"] == "python":
            if sandboxed < 3:  # a sample of the sandboxed ones (each run ~0.3 s)
                assert check(t, t.answer, sandbox), t
                assert not check(t, "12", sandbox) and not check(t, "import os", sandbox)
                sandboxed += 1
            continue
        assert check(t, t.answer), t
        wrong = f"{float(t.answer) * 1.5 + 3}" if t.checker["type"] == "number" else t.answer + "1"
        assert not check(t, wrong), t
        assert not check(t, None)
    assert sandboxed == 3


@pytest.mark.parametrize(("checker", "answer", "given", "ok"), [
    ({"type": "number", "tol": 1e-3}, "3.14159", "3.1416", True),
    ({"type": "number", "tol": 1e-3}, "3.14159", "3.2", False),
    ({"type": "number"}, "1200", "1,200", True),
    ({"type": "number"}, "12", "12 or 13", False),
    ({"type": "set"}, "[1, 2, 3]", "3, 2, 1", True),
    ({"type": "list"}, "[1, 2, 3]", "3, 2, 1", False),
    ({"type": "exact"}, "Monday", " monday. ", True),
    ({"type": "regex", "pattern": "(0b)?101"}, "101", "0b101", True),
    ({"type": "regex", "pattern": "(0b)?101"}, "101", "1010", False),
])
def test_checkers(checker, answer, given, ok):
    assert check(Task("t", "k", "k", "q", answer, checker), given) is ok


def test_task_file_loads(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"id": "a", "question": "2+2?", "answer": "4", "checker": {"type": "number"}}) + "\n\n"
                 + json.dumps({"id": "b", "question": "hi?", "answer": "hi", "split": "heldout"}) + "\n")
    tasks = load_tasks(str(f))
    assert [t.id for t in tasks] == ["a", "b"] and tasks[1].split == "heldout"


@pytest.mark.parametrize(("line", "field"), [
    ("{not json", "not valid JSON"),
    ('{"id": "x", "question": "q"}', "'answer'"),
    ('{"id": "x", "question": "q", "answer": "a", "checker": {"type": "magic"}}', "checker.type"),
    ('{"id": "x", "question": "q", "answer": "a", "checker": {"type": "regex", "pattern": "("}}', "checker.pattern"),
    ('{"id": "x", "question": "q", "answer": "a", "checker": {"type": "number"}}', "numeric"),
    ('{"id": "x", "question": "q", "answer": "a", "split": "test"}', "'split'"),
])
def test_bad_task_file_names_file_and_line(tmp_path, line, field):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "ok", "question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(PotstillError) as e:
        load_tasks(str(f))
    assert str(e.value).startswith(f"{f}:2: ") and field in str(e.value)


def test_select_tasks_by_template_sets_the_difficulty_mix():
    from potstill.agent.generate import select_tasks

    tasks = builtin_tasks(90)
    easy = select_tasks(tasks, ("train",), ["arithmetic"], 6, ["bigmul", "powmod"])
    assert len(easy) == 6 and {t.template for t in easy} == {"bigmul", "powmod"} and {t.split for t in easy} == {"train"}
    with pytest.raises(PotstillError, match="templates: unknown 'bigmull' \\(known: .*bigmul"):
        select_tasks(tasks, ("train",), [], None, ["bigmull"])
    # one misspelled name among good ones is an error too, not silently dropped
    with pytest.raises(PotstillError, match="templates: unknown 'powmd'"):
        select_tasks(tasks, ("train",), [], None, ["bigmul", "powmd"])
    with pytest.raises(PotstillError, match="kinds: unknown 'arithmetik'"):
        select_tasks(tasks, ("train",), ["arithmetic", "arithmetik"], None)
    # a real template with no task in the split asked for is still the old error
    with pytest.raises(PotstillError, match="no tasks in split"):
        select_tasks(tasks, ("heldout_template",), [], None, ["bigmul"])


def test_eval_templates_narrow_the_unseen_instances_only():
    from potstill.agent.evaluate import AgentEvalConfig, eval_tasks

    tasks = builtin_tasks(360)
    cfg = AgentEvalConfig(teacher="embedded", max_tasks=8, templates=["bigmul", "powmod"])
    chosen = eval_tasks(cfg, tasks)
    seen = [t for t in chosen if t.split == "heldout"]
    unseen = [t for t in chosen if t.split == "heldout_template"]
    assert len(seen) == 8 and {t.template for t in seen} == {"bigmul", "powmod"}
    assert len(unseen) == 8 and len({t.template for t in unseen}) > 1  # unseen templates: all of them
    assert {t.template for t in eval_tasks(AgentEvalConfig(teacher="embedded", max_tasks=8), tasks)
            if t.split == "heldout"} - {"bigmul", "powmod"}  # without it, every seen template
