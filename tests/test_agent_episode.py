"""Agent episodes end to end on a tiny scripted teacher: the tool really runs in the sandbox, only
verified trajectories reach the train split, the role mask marks model-written tokens, training
learns only those, and a rerun resumes."""

from __future__ import annotations

import numpy as np
import pytest

from potstill.agent.generate import AgentGenerateConfig, agent_generate
from potstill.agent.sandbox import detect_isolation
from potstill.capture.store import Capture
from potstill.errors import PotstillError
from potstill.train.data import collate, examples_from_capture
from tests.agent_fixtures import SCRIPTS, TASKS, ScriptedTeacher, write_tasks
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer):
    return ScriptedTeacher(make_tiny_model(tiny_tokenizer, layers=2, seed=1, init=0.4), tiny_tokenizer, SCRIPTS)


def _cfg(tmp_path, **kw):
    return AgentGenerateConfig(tasks=write_tasks(tmp_path / "tasks.jsonl", TASKS), out=str(tmp_path / "cap"),
                               samples=1, max_turns=3, max_new_tokens=96, top_k=4, sandbox_cpu_s=1,
                               sandbox_wall_s=3, unsafe_sandbox=detect_isolation() == "none", scaffold="none", **kw)


def test_episodes_verify_capture_and_train_only_model_tokens(tmp_path, teacher, tiny_tokenizer, tiny_model_dir,
                                                            monkeypatch):
    monkeypatch.setenv("AGENT_SECRET", "hunter2")
    logs: list[str] = []
    manifest = agent_generate(_cfg(tmp_path), teacher=teacher, log=logs.append)
    cap = Capture.open(tmp_path / "cap")
    rows = list(cap.rows())
    assert len(rows) == 3  # 3 train tasks x 1 sample; the held-out task is not run
    by_task = {}
    for r in rows:
        by_task.setdefault(r["prompt"][1]["content"], []).append(r)
    assert {r["split"] for r in by_task["What is 6 times 7?"]} == {"train"}
    assert {r["split"] for r in by_task["What is 2 to the 10?"]} == {"rejected"}
    assert {r["finish_reason"] for r in by_task["Loop forever?"]} == {"max_turns"}
    assert manifest["yield"]["arithmetic"] == {"episodes": 2, "verified": 1, "yield": 0.5, "tasks": 2,
                                               "tasks_solved": 1}
    assert manifest["sandbox"]["isolation"] in ("unshare", "bwrap", "unsafe")
    assert manifest["episodes_this_run"]["sandbox_errors"] == 1  # the endless loop (killed), once
    assert manifest["episodes_this_run"]["well_formed_call_share"] == 1.0

    good = by_task["What is 6 times 7?"][0]
    ids, mask = good["completion_ids"], good["role_mask"].astype(bool)
    assert len(mask) == len(ids) == len(good["topk"].ids)
    model_text = tiny_tokenizer.decode(ids[mask])
    context_text = tiny_tokenizer.decode(ids[~mask])
    assert "print(6 * 7)" in model_text and "Final answer: 42" in model_text
    assert "Output:\n42" in context_text and "Output" not in model_text and "42\n" not in model_text.split("42")[0]
    # the teacher's real top-k on model tokens contains the sampled token; placeholders elsewhere
    assert all(t in row for t, row in zip(ids[mask], good["topk"].ids[mask], strict=True))
    secret_rows = by_task["What is 2 to the 10?"]
    assert all("hunter2" not in tiny_tokenizer.decode(r["completion_ids"]) for r in secret_rows)
    assert "Output:\nNone\n1024" in tiny_tokenizer.decode(secret_rows[0]["completion_ids"])

    examples = examples_from_capture(cap, split="train", max_seq_len=1024)
    assert len(examples) == 1
    batch = collate(examples, pad_id=0)
    assert batch.n_targets == sum(int(e.loss_mask.sum()) for e in examples) < sum(
        len(e.input_ids) - e.prompt_len for e in examples)
    b0 = batch.rows == 0
    e0 = examples[0]
    assert np.array_equal(batch.targets[b0].numpy(), e0.input_ids[e0.prompt_len:][e0.loss_mask])
    assert np.array_equal(batch.input_ids[0, batch.cols[b0] + 1].numpy(), batch.targets[b0].numpy())
    assert batch.topk_ids.shape[0] == batch.n_targets

    # `potstill train` runs on the agent capture (only model-written tokens are targets)
    from potstill.config import TrainConfig
    from potstill.train.loop import train

    summary = train(TrainConfig(capture=str(tmp_path / "cap"), out=str(tmp_path / "student"),
                                teacher=str(tiny_model_dir), student=f"pretrained:{tiny_model_dir}", max_steps=2,
                                warmup_steps=0, batch_size=1, max_seq_len=1024, checkpoint_every=0),
                    log=lambda *_: None)
    assert summary["steps"] == 2 and summary["examples"] == 1
    assert (tmp_path / "student" / "config.json").exists()

    # a rerun resumes: nothing new to do, nothing duplicated
    logs.clear()
    again = agent_generate(_cfg(tmp_path), teacher=teacher, log=logs.append)
    assert any("resuming: 3 episodes" in line for line in logs)
    assert again["counts"]["rows"] == 3 and again["yield"]["all"]["verified"] == 1


def test_bad_task_file_fails_before_anything_is_written(tmp_path, teacher):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b"}\n')
    cfg = AgentGenerateConfig(tasks=str(bad), out=str(tmp_path / "cap"))
    with pytest.raises(PotstillError, match=f"{bad}:2: field 'question'"):
        agent_generate(cfg, teacher=teacher)
    assert not (tmp_path / "cap").exists()


def test_agent_eval_with_and_without_tool(tmp_path, teacher):
    from potstill.agent.evaluate import AgentEvalConfig, run_agent_eval

    tasks = [dict(t, split="heldout") for t in TASKS[:2]] + [dict(TASKS[2], split="heldout_template")]
    cfg = AgentEvalConfig(tasks=write_tasks(tmp_path / "tasks.jsonl", tasks), teacher=None, students=["x"],
                          max_turns=3, max_new_tokens=96, sandbox_cpu_s=1, sandbox_wall_s=3, out=str(tmp_path / "ev"),
                          scaffold="none",
                          unsafe_sandbox=detect_isolation() == "none")
    result = run_agent_eval(cfg, log=lambda *_: None, models={"scripted": teacher})
    row = result["rows"][0]
    tool, plain = row["tool"], row["no_tool"]
    assert (tool["n"], tool["solved"], tool["pass@1"]) == (3, 1, round(1 / 3, 4))
    assert tool["pass@1[heldout]"]["solved"] == 1 and tool["pass@1[heldout_template]"]["n"] == 1
    assert tool["sandbox_errors"] == 1 and tool["tool_calls"] == 3 and tool["well_formed_call_share"] == 1.0
    lo, hi = tool["pass@1_ci95"]
    assert 0 < lo < 1 / 3 < hi < 1
    # without the tool the script's first turn (code) is not an answer: nothing is solved, one turn each
    assert plain["solved"] == 0 and plain["mean_turns"] == 1 and plain["tool_calls"] == 0
    table = (tmp_path / "ev" / "table.md").read_text()
    assert "| scripted | 1/3 = 0.333 |" in table
    assert (tmp_path / "ev" / "results.json").exists()


def test_interrupted_generate_resumes_without_losing_or_repeating(tmp_path, teacher):
    """The run dies in its second window (shard_rows=1: one episode per window); the first episode's
    shard is complete and listed, the rerun does only the rest."""
    calls = {"n": 0}
    real = teacher.complete_ids

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # window 1 took two turns; window 2 dies on its first
            raise KeyboardInterrupt
        return real(*a, **kw)

    teacher.complete_ids = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            agent_generate(_cfg(tmp_path, shard_rows=1), teacher=teacher, log=lambda *_: None)
    finally:
        del teacher.complete_ids
    cap = Capture.open(tmp_path / "cap", allow_incomplete=True)
    assert len(cap) == 1 and not cap.manifest["complete"]
    logs: list[str] = []
    manifest = agent_generate(_cfg(tmp_path, shard_rows=1), teacher=teacher, log=logs.append)
    assert any("resuming: 1 episodes already in complete shards, 2 to go" in line for line in logs)
    rows = list(Capture.open(tmp_path / "cap").rows(columns=["id"]))
    assert manifest["complete"] and len(rows) == len({r["id"] for r in rows}) == 3
