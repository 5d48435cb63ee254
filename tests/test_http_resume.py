"""A capture over HTTP (`potstill generate --teacher http://…/v1` against `potstill serve` on 127.0.0.1)
killed with SIGKILL resumes with the same command: nothing lost, nothing duplicated, same rows as an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guard_fixtures import live_server, one_torch_thread
from tests.pipeline_fixtures import slow_writes

pytestmark = pytest.mark.subprocess  # every test here starts the CLI in a child process

SRC = str(Path(__file__).parents[1] / "src")
TOPICS = ["the sea", "volcanoes", "bread baking", "chess openings", "the moon", "honey bees", "old maps",
          "glass making", "river otters", "jazz drums", "winter storms", "paper kites"]
PROMPTS = [{"instruction": f"Write two sentences about {t}.", "output": "ok"} for t in TOPICS]
# The CLI with every written row slowed down, so the kill lands mid-capture on any machine's speed.
SLOW_CLI = slow_writes(0.15) + "import sys\nfrom potstill.cli import app\napp(sys.argv[1:])\n"

def _cmd(server, tokenizer_dir, prompts, out, slow: bool = False) -> list[str]:
    head = [sys.executable, "-c", SLOW_CLI] if slow else [sys.executable, "-m", "potstill.cli"]
    return [*head, "generate", "--teacher", server.base, "--model", "tiny",
            "--tokenizer", str(tokenizer_dir), "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "8", "--top-k", "4", "--batch-size", "2", "--shard-rows", "2", "--heldout", "0.25"]


def test_http_capture_resumes_after_kill9(tmp_path, tiny_model_dir):
    from potstill.capture.store import Capture
    from potstill.teachers.hf import HFTeacher

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    with one_torch_thread(), live_server(HFTeacher.load(str(tiny_model_dir), dtype="float32"), tmp_path) as server:
        _, secret = server.keys.create("distiller", max_top_logprobs=None)
        env = {**os.environ, "PYTHONPATH": SRC, "OPENAI_API_KEY": secret, "OMP_NUM_THREADS": "1"}
        killed = tmp_path / "killed"
        proc = subprocess.Popen(_cmd(server, tiny_model_dir, prompts, killed, slow=True), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(list(killed.glob("shard-*.parquet"))) < 2:
            time.sleep(0.01)
        assert proc.poll() is None, "the capture finished before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = sorted(p.name for p in killed.glob("shard-*.parquet"))
        assert 2 <= len(before) < len(PROMPTS) // 2
        resumed = subprocess.run(_cmd(server, tiny_model_dir, prompts, killed), env=env, capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming:" in resumed.stdout
        whole = tmp_path / "whole"
        done = subprocess.run(_cmd(server, tiny_model_dir, prompts, whole), env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    a = {r["id"]: r for r in Capture.open(killed).rows()}
    b = {r["id"]: r for r in Capture.open(whole).rows()}
    assert len(a) == len(b) == len(PROMPTS) and set(a) == set(b)
    assert sum(1 for _ in Capture.open(killed).rows()) == len(PROMPTS)  # nothing duplicated
    for rid in a:  # per-row seeds: the resumed rows are the ones an uninterrupted run writes
        assert list(a[rid]["completion_ids"]) == list(b[rid]["completion_ids"])
        assert a[rid]["completion_text"] == b[rid]["completion_text"]
