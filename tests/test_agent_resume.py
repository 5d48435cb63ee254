"""`potstill agent generate` killed with SIGKILL mid-capture resumes like `generate`: the killed capture
is incomplete, the rerun finishes it with no episode lost or repeated, and every row equals the one an
uninterrupted run writes (episodes are seeded by their id and turn)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from potstill.agent.generate import AgentGenerateConfig, agent_generate
from potstill.agent.sandbox import detect_isolation
from potstill.capture.store import Capture
from tests.pipeline_fixtures import kill9_after_shards, slow_writes

EPISODES = 12  # 6 tasks x 2 samples, 2 per shard: 6 shards

KILL_SCRIPT = slow_writes(0.25) + """
import sys
from potstill.agent.generate import AgentGenerateConfig, agent_generate
agent_generate(AgentGenerateConfig(**__import__("json").loads(sys.argv[1])), log=lambda *_: None)
"""


def _cfg(teacher, out) -> dict:
    return dict(tasks="builtin:potstill_tools:60", teacher=str(teacher), out=str(out), samples=2, max_tasks=6,
                max_turns=2, max_new_tokens=8, top_k=4, dtype="float32", shard_rows=2, batch_size=4,
                sandbox_cpu_s=1, sandbox_wall_s=3, unsafe_sandbox=detect_isolation() == "none")


def _rows(out) -> dict[str, dict]:
    cap = Capture.open(out)
    return {r["id"]: {"ids": r["completion_ids"].tolist(), "roles": r["role_mask"].tolist(), "split": r["split"],
                      "topk": r["topk"].ids.tolist(), "prompt": r["prompt"]} for r in cap.rows()}


@pytest.mark.slow  # ~40 s on the 2-core CPU (child start, two captures)
@pytest.mark.subprocess
def test_agent_generate_resumes_after_kill9(tmp_path, tiny_model_dir):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(_cfg(tiny_model_dir, out))], env=env)
    kill9_after_shards(proc, out)
    shards = list(out.glob("shard-*.parquet"))
    assert shards and len(shards) < EPISODES // 2, f"{len(shards)} shards: the kill did not land mid-capture"
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest.get("complete"), "the killed capture claims to be complete"
    killed_rows = len(Capture.open(out, allow_incomplete=True))
    assert 0 < killed_rows < EPISODES

    logs: list[str] = []
    resumed_manifest = agent_generate(AgentGenerateConfig(**_cfg(tiny_model_dir, out)), log=logs.append)
    assert any(f"resuming: {killed_rows} episodes already in complete shards, {EPISODES - killed_rows} to go" in line
               for line in logs), logs
    ids = [r["id"] for r in Capture.open(out).rows(columns=["id"])]
    assert len(ids) == len(set(ids)) == EPISODES
    assert resumed_manifest["complete"] and resumed_manifest["yield"]["all"]["episodes"] == EPISODES

    whole = tmp_path / "whole"
    agent_generate(AgentGenerateConfig(**_cfg(tiny_model_dir, whole)), log=lambda *_: None)
    assert _rows(out) == _rows(whole)  # the same episodes, token for token, role for role
