"""The prefill scaffold: each assistant turn opens with "```python\n" (call the tool) or "Final answer:" (after
a run that printed something, or without the tool) as context; the model writes the rest. Prefilled tokens are
role 0 (never a target, placeholder top-k), the model's tokens role 1 with their real top-k; the scaffold is
recorded in the capture's manifest and in the eval results."""

from __future__ import annotations

import json

import pytest

from potstill.agent.episode import ANSWER_PREFILL, CODE_PREFILL
from potstill.agent.evaluate import AgentEvalConfig, run_agent_eval
from potstill.agent.generate import AgentGenerateConfig, agent_generate
from potstill.agent.sandbox import detect_isolation
from potstill.capture.store import Capture
from potstill.errors import PotstillError
from tests.agent_fixtures import ScriptedTeacher, write_tasks
from tests.tiny import make_tiny_model

# whole turns as the model would read them; the scaffold writes each turn's opening, the model the rest
SCRIPTS = {
    "What is 6 times 7?": ["```python\nprint(6 * 7)\n```\n", "Final answer: 42"],
    "What is 2 to the 10?": ["```python\nx = 2 ** 10\n```\n", "```python\nprint(2 ** 10)\n```\n", "Final answer: 1024"],
}
TASKS = [
    {"id": "mul", "kind": "arithmetic", "question": "What is 6 times 7?", "answer": "42", "checker": {"type": "number"}},
    {"id": "pow", "kind": "arithmetic", "question": "What is 2 to the 10?", "answer": "1024",
     "checker": {"type": "number"}},
]


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer):
    return ScriptedTeacher(make_tiny_model(tiny_tokenizer, layers=2, seed=1, init=0.4), tiny_tokenizer, SCRIPTS)


def test_prefill_is_context_and_the_model_writes_the_rest(tmp_path, teacher, tiny_tokenizer):
    cfg = AgentGenerateConfig(tasks=write_tasks(tmp_path / "tasks.jsonl", TASKS), out=str(tmp_path / "cap"), samples=1,
                              max_turns=3, max_new_tokens=48, top_k=4, sandbox_cpu_s=1, sandbox_wall_s=3,
                              unsafe_sandbox=detect_isolation() == "none", scaffold="prefill")
    manifest = agent_generate(cfg, teacher=teacher, log=lambda *_: None)
    assert manifest["sampling"]["scaffold"] == "prefill"
    assert manifest["yield"]["all"]["verified"] == 2
    rows = {r["prompt"][1]["content"]: r for r in Capture.open(tmp_path / "cap").rows()}
    for question, turns in (("What is 6 times 7?", 2), ("What is 2 to the 10?", 3)):
        r = rows[question]
        ids, mask = r["completion_ids"], r["role_mask"].astype(bool)
        model_text, context_text = tiny_tokenizer.decode(ids[mask]), tiny_tokenizer.decode(ids[~mask])
        assert "```python" not in model_text and "Final answer" not in model_text  # the scaffold wrote those
        assert "print(" in model_text and r["reference"] in model_text  # the model wrote the code and the answer
        # turn 1 opens with code; a run that printed nothing is followed by code again, one that printed, by the answer
        assert context_text.count(CODE_PREFILL.strip()) == turns - 1 and context_text.count(ANSWER_PREFILL) == 1
        topk = r["topk"].ids
        assert all(t in row for t, row in zip(ids[mask], topk[mask], strict=True))  # real top-k on model tokens
        assert all(row[0] == t and r["topk"].logprobs[i, 1:].max() == -float("inf")  # placeholders on context
                   for i, (t, row) in enumerate(zip(ids, topk, strict=True)) if not mask[i])
    messages = json.loads(rows["What is 6 times 7?"]["completion_text"])
    turns = [m["content"] for m in messages if m["role"] == "assistant"]
    assert turns == ["```python\nprint(6 * 7)\n```", "Final answer: 42"]


def test_eval_records_the_scaffold_and_uses_it_for_both_modes(tmp_path, teacher):
    tasks = [dict(t, split="heldout") for t in TASKS]
    result = run_agent_eval(AgentEvalConfig(tasks=write_tasks(tmp_path / "tasks.jsonl", tasks), teacher=None,
                                            students=["x"], splits=["heldout"], max_turns=3, max_new_tokens=48,
                                            sandbox_cpu_s=1,
                                            sandbox_wall_s=3, out=str(tmp_path / "ev"), scaffold="prefill",
                                            unsafe_sandbox=detect_isolation() == "none"),
                            log=lambda *_: None, models={"scripted": teacher})
    assert result["scaffold"] == "prefill" and result["config"]["scaffold"] == "prefill"
    row = result["rows"][0]
    assert row["tool"]["solved"] == 2
    # without the tool the only turn opens with "Final answer:": the script's first turn is code, not a number
    assert row["no_tool"]["answered"] == 2 and row["no_tool"]["solved"] == 0
    assert "scaffold prefill" in (tmp_path / "ev" / "table.md").read_text()


def test_unknown_scaffold_is_one_error():
    with pytest.raises(PotstillError, match="unknown scaffold 'fill'"):
        AgentGenerateConfig(scaffold="fill")
    with pytest.raises(PotstillError, match="unknown scaffold"):
        AgentEvalConfig(students=["x"], scaffold="fill")
