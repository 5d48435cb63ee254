"""The scripted solver (a stand-in for a strong tool-using teacher): its code solves every built-in template
in the real sandbox, and its episodes become verified capture rows with a real model's teacher-forced top-k."""

from __future__ import annotations

import numpy as np

from potstill.agent.sandbox import Limits, Sandbox, detect_isolation
from potstill.agent.scripted import ScriptedSolver, solution_code
from potstill.agent.tasks import TEMPLATES, builtin_tasks, check


def test_solution_code_solves_two_instances_of_every_template():
    tasks = builtin_tasks(2 * len(TEMPLATES), seed=3)
    sandbox = Sandbox(Limits(cpu_seconds=2, wall_seconds=5), allow_unsafe=detect_isolation() == "none")
    code = "\n".join(f"print('@@{t.id}')\n" + solution_code(t) for t in tasks)  # one sandbox run for all
    result = sandbox.run(code)
    assert result.ok, result.observation(500)
    outputs = {}
    for chunk in result.output.split("@@")[1:]:
        tid, _, out = chunk.partition("\n")
        outputs[tid] = out.strip().splitlines()[-1]
    assert {t.template for t in tasks} == set(TEMPLATES)
    wrong = [(t.id, outputs.get(t.id), t.answer) for t in tasks if not check(t, outputs.get(t.id), sandbox)]
    assert not wrong


def test_scripted_episodes_are_verified_with_teacher_forced_topk(tmp_path, tiny_model_dir, tiny_tokenizer):
    from potstill.agent.generate import AgentGenerateConfig, agent_generate
    from potstill.capture.store import Capture
    from potstill.teachers.hf import HFTeacher
    from tests.agent_fixtures import write_tasks

    tasks = [t for t in builtin_tasks(30) if t.template in ("bigmul", "sort", "reverse")][:3]
    scorer = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    path = write_tasks(tmp_path / "t.jsonl", [{**t.to_dict(), "split": "train"} for t in tasks])
    manifest = agent_generate(AgentGenerateConfig(tasks=path, out=str(tmp_path / "cap"), samples=1, max_turns=2,
                                                  max_new_tokens=512, top_k=4, temperature=0.0,
                                                  unsafe_sandbox=detect_isolation() == "none", scaffold="none"),
                              teacher=ScriptedSolver(scorer, tasks), log=lambda *_: None)
    assert manifest["yield"]["all"]["verified"] == 3 and manifest["teacher"]["name"].startswith("scripted+")
    for row in Capture.open(tmp_path / "cap").rows():
        mask = row["role_mask"].astype(bool)
        text = tiny_tokenizer.decode(row["completion_ids"][mask])
        assert "```python\n" in text and "Final answer:" in text
        # model-written tokens carry the scorer's real distribution (k entries), context tokens a placeholder
        lps = row["topk"].logprobs
        assert np.isfinite(lps[mask]).all(axis=1).all() and (~np.isfinite(lps[~mask][:, 1:])).all()
        ids = np.asarray(row["completion_ids"])
        ref = scorer.score_ids([row["prompt_ids"].tolist()], [ids.tolist()], k=4)[0]
        assert np.array_equal(row["topk"].ids[mask][:, 0], ref.topk_ids[mask][:, 0])
