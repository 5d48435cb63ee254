"""`potstill study agent-anchor` end to end on the tiny teacher: scripted verified trajectories with the
teacher's top-k, the same init trained by SFT (CE) and by KD (fkl), both measured on held-out scripted
trajectories and by agent eval; each arm moves its own objective from the shared init."""

from __future__ import annotations

import json

import pytest

from potstill.agent.sandbox import detect_isolation


@pytest.mark.slow  # ~25 s on the 2-core CPU: two captures, three student builds, two trainings, agent eval
def test_agent_anchor_sft_vs_kd_on_the_tiny_teacher(tmp_path, tiny_model_dir):
    from potstill.studies.agent_anchor import AgentAnchorConfig, run_agent_anchor

    out = tmp_path / "anchor"
    result = run_agent_anchor(AgentAnchorConfig(teacher=str(tiny_model_dir), student="prune:depth:2", train_tasks=6,
                                                heldout_tasks=3, eval_tasks=2, max_steps=2, batch_size=2,
                                                max_new_tokens=8, out=str(out),
                                                unsafe_sandbox=detect_isolation() == "none"), log=lambda *_: None)
    assert result["trajectories"]["train"]["verified"] == 6 and result["trajectories"]["heldout"]["verified"] == 3
    assert {a: t["loss"] for a, t in result["train"].items()} == {"sft": "ce", "kd": "fkl"}
    assert all(t["steps"] == 2 and t["examples"] == 6 for t in result["train"].values())
    fit = result["heldout_fit"]
    assert fit["sft"]["nll_teacher_tokens"] < fit["before"]["nll_teacher_tokens"]
    assert fit["kd"]["kl"] < fit["before"]["kl"]
    assert [r["model"] for r in result["agent_eval"]] == ["before", "sft (ce)", "kd (fkl)"]
    assert all(r["tool"]["n"] == 4 for r in result["agent_eval"])
    assert json.loads((out / "results.json").read_text())["discordant"] == result["discordant"]
    assert "| sft (ce) |" in (out / "table.md").read_text() and (out / "eval" / "pass_at_1.png").exists()
