"""The embedded teacher (SmolLM2-135M-Instruct) as an agent: real episodes, real sandbox, real capture."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from potstill.agent.generate import AgentGenerateConfig, agent_generate
from potstill.agent.sandbox import detect_isolation
from potstill.capture.store import Capture
from potstill.lm.loading import resolve_model_dir


@pytest.mark.slow
def test_embedded_teacher_episodes_are_captured(tmp_path):
    cfg = AgentGenerateConfig(tasks="builtin:potstill_tools", teacher="embedded", samples=1, max_tasks=3,
                              kinds=["arithmetic"], max_turns=2, max_new_tokens=64, top_k=16, dtype="float32",
                              out=str(tmp_path / "cap"), unsafe_sandbox=detect_isolation() == "none")
    manifest = agent_generate(cfg, log=lambda *_: None)
    rows = list(Capture.open(tmp_path / "cap").rows())
    assert len(rows) == 3 and manifest["yield"]["all"]["episodes"] == 3
    for r in rows:
        mask = r["role_mask"].astype(bool)
        assert mask.any() and (~mask).any()  # the model wrote something; turn markers are context
        hits = [t in row for t, row in zip(r["completion_ids"][mask], r["topk"].ids[mask], strict=True)]
        # sampled at T=0.7, top-p 0.95: nearly always in the top 16 (top 8 is too few: a sampled answer turn writes
        # long numbers, whose digits are near-uniform among 10)
        assert sum(hits) >= 0.9 * len(hits)
        assert r["split"] in ("train", "rejected")
    # the default scaffold (prefill): every first turn opens with "```python\n" as context, the model writes code
    assert manifest["sampling"]["scaffold"] == "prefill" and manifest["episodes_this_run"]["tool_calls"] >= 3
    tok = AutoTokenizer.from_pretrained(resolve_model_dir("embedded"))
    for r in rows:
        ids, mask = r["completion_ids"], r["role_mask"].astype(bool)
        first = json.loads(r["completion_text"])[0]["content"]
        assert first.startswith("```python\n") and "```python" not in tok.decode(ids[mask])
