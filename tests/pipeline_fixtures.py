"""What the tiny-pipeline tests share: the twelve prompts and the stage configs they run with.

A plain module (not a test module), so that test files import from here and never from each other.
"""

from __future__ import annotations

from potstill.config import GenerateConfig, TrainConfig

PROMPTS = [
    {"instruction": "Name a color.", "output": "Blue."},
    {"instruction": "Say hello to the rain.", "output": "Hello, rain."},
    {"instruction": "Count to three.", "output": "One two three."},
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "Write a short poem.", "input": "about the quiet town"},
    {"instruction": "List two animals.", "output": "cat, dog"},
    {"instruction": "Explain gravity in one sentence.", "output": "Masses attract each other."},
    {"instruction": "Summarize the text.", "input": "The rain is falling on the town."},
    {"instruction": "Name three numbers.", "output": "seven eight nine"},
    {"instruction": "How to learn a language?", "output": "Practice every day."},
    {"instruction": "Best way to rest?", "output": "Sleep well."},
    {"instruction": "Describe the capital of Italy.", "output": "Rome is old."},
]


def gen_cfg(teacher, prompts, out, **kw):
    base = dict(teacher=str(teacher), prompts=str(prompts), out=str(out), max_new_tokens=12, top_k=8,
                batch_size=4, heldout=0.25, dtype="float32", shard_rows=4)
    base.update(kw)
    return GenerateConfig(**base)


def train_cfg(capture, out, **kw):
    base = dict(capture=str(capture), out=str(out), student="prune:depth:2", loss="fkl", max_steps=6,
                batch_size=2, warmup_steps=2, lr=1e-2, checkpoint_every=3, bf16="off", calibration=4)
    base.update(kw)
    return TrainConfig(**base)


def slow_writes(seconds: float) -> str:
    """Python source for a child process: every capture row written sleeps first, so that a test's kill -9
    lands mid-capture whatever the machine's speed."""
    return (
        "import time\n"
        "import potstill.capture.store as _store\n"
        "_add = _store.CaptureWriter.add\n"
        f"_store.CaptureWriter.add = lambda self, row: (time.sleep({seconds}), _add(self, row))[1]\n"
    )


def kill9_after_shards(proc, out, shards: int = 1, timeout: float = 120.0) -> None:
    """Wait until the child process `proc` has `shards` complete capture shards under `out` (listed in the
    manifest, which is replaced atomically after a shard is written), then SIGKILL it and reap it. Fails when
    the child ended first: a kill test must kill mid-capture."""
    import json
    import os
    import signal
    import time
    from pathlib import Path

    def listed() -> int:
        try:
            return len(json.loads((Path(out) / "manifest.json").read_text()).get("shards", []))
        except (OSError, ValueError):
            return 0

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and listed() < shards:
        time.sleep(0.02)
    assert proc.poll() is None, "the child finished (or died) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
