"""The embedded teacher (SmolLM2-135M-Instruct) as an agent: real episodes, real sandbox, real capture."""

from __future__ import annotations

import pytest

from potstill.agent.generate import AgentGenerateConfig, agent_generate
from potstill.agent.sandbox import detect_isolation
from potstill.capture.store import Capture


@pytest.mark.slow
def test_embedded_teacher_episodes_are_captured(tmp_path):
    cfg = AgentGenerateConfig(tasks="builtin:potstill_tools", teacher="embedded", samples=1, max_tasks=3,
                              kinds=["arithmetic"], max_turns=2, max_new_tokens=64, top_k=8, dtype="float32",
                              out=str(tmp_path / "cap"), unsafe_sandbox=detect_isolation() == "none")
    manifest = agent_generate(cfg, log=lambda *_: None)
    rows = list(Capture.open(tmp_path / "cap").rows())
    assert len(rows) == 3 and manifest["yield"]["all"]["episodes"] == 3
    for r in rows:
        mask = r["role_mask"].astype(bool)
        assert mask.any() and (~mask).any()  # the model wrote something; turn markers are context
        hits = [t in row for t, row in zip(r["completion_ids"][mask], r["topk"].ids[mask], strict=True)]
        assert sum(hits) >= 0.9 * len(hits)  # sampled at T=0.7, top-p 0.95: nearly always in the top 8
        assert r["split"] in ("train", "rejected")
