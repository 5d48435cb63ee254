"""Capture store: round trip, manifest and checksums, resume after kill -9, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from potstill.capture.codec import get_codec
from potstill.capture.store import Capture, CaptureWriter, row_id
from potstill.errors import PotstillError
from potstill.utils import sha256_file

REPO = Path(__file__).resolve().parents[1]
VOCAB, K = 1000, 8
RUN = {
    "teacher": {"name": "tiny", "tokenizer_sha256": "abc"},
    "sampling": {"temperature": 1.0, "top_p": 1.0, "seed": 0},
    "k": K,
    "prompts": {"source": "test", "sha256": "0" * 64, "count": 40},
}


def make_row(i: int, k: int = K, vocab: int = VOCAB) -> dict:
    """A deterministic completion for prompt i (same i -> same row, in any process)."""
    rng = np.random.default_rng(i)
    t = int(rng.integers(0, 24))
    lps = np.log(rng.dirichlet(np.full(40, 0.3), size=t) + 1e-12)
    order = np.argsort(-lps, axis=1)[:, :k]
    messages = [{"role": "user", "content": f"question {i}"}]
    return {
        "id": row_id(messages, RUN["sampling"], 0),
        "prompt": json.dumps(messages),
        "reference": f"answer {i}" if i % 2 else None,
        "split": "heldout" if i % 5 == 0 else "train",
        "prompt_ids": rng.integers(0, vocab, size=int(rng.integers(1, 9))).tolist(),
        "completion_ids": rng.integers(0, vocab, size=t),
        "completion_text": f"completion {i}",
        "finish_reason": "stop" if t < 20 else "length",
        "sampled_logprob": -rng.random(t).astype(np.float32),
        "topk_ids": (order * (vocab // 40)).astype(np.int64),
        "topk_logprobs": np.take_along_axis(lps, order, axis=1).astype(np.float32),
    }


def write(directory, n: int = 10, codec=None, shard_rows: int = 4, start: int = 0) -> dict:
    codec = codec or get_codec("mass", VOCAB, K)
    with CaptureWriter(directory, RUN, codec, shard_rows=shard_rows) as w:
        for i in range(start, n):
            if make_row(i)["id"] not in w.done_ids:
                w.add(make_row(i))
    return w.manifest


def test_round_trip_and_manifest(tmp_path):
    manifest = write(tmp_path / "cap", n=10)
    on_disk = json.loads((tmp_path / "cap" / "manifest.json").read_text())
    assert on_disk == manifest
    for key in ("teacher", "sampling", "k", "prompts"):
        assert manifest[key] == RUN[key]
    assert manifest["format_version"] == 1 and manifest["complete"] is True
    assert manifest["codec"] == {"name": "mass", "params": {"vocab_size": VOCAB, "k": K, "mass": 0.98}}
    assert manifest["potstill_version"] and manifest["created"]
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    rows = [make_row(i) for i in range(10)]
    tokens = sum(len(r["completion_ids"]) for r in rows)
    counts = manifest["counts"]
    assert counts["rows"] == 10 and counts["completion_tokens"] == tokens
    assert counts["prompt_tokens"] == sum(len(r["prompt_ids"]) for r in rows)
    assert counts["splits"]["heldout"]["rows"] == 2 and counts["splits"]["train"]["rows"] == 8
    for s in manifest["shards"]:
        assert s["sha256"] == sha256_file(tmp_path / "cap" / s["file"])
    assert manifest["bytes_on_disk"] == sum(s["bytes"] for s in manifest["shards"])
    assert manifest["bytes_per_completion_token"] == pytest.approx(manifest["bytes_on_disk"] / tokens, abs=1e-3)

    capture = Capture.open(tmp_path / "cap")
    assert len(capture) == 10 and not capture.text_only and len(capture.shard_paths) == 3
    codec = get_codec("mass", VOCAB, K)
    for want, got in zip(rows, capture.rows(), strict=True):
        assert got["id"] == want["id"] and got["prompt"] == json.loads(want["prompt"])
        assert got["reference"] == want["reference"] and got["split"] == want["split"]
        assert got["prompt_ids"].dtype == np.int64 and got["prompt_ids"].tolist() == list(want["prompt_ids"])
        assert got["completion_ids"].tolist() == want["completion_ids"].tolist()
        np.testing.assert_array_equal(got["sampled_logprob"], want["sampled_logprob"])
        expected = codec.decode(codec.encode(want["topk_ids"], want["topk_logprobs"]))
        np.testing.assert_array_equal(got["topk"].ids, expected.ids)
        np.testing.assert_array_equal(got["topk"].logprobs, expected.logprobs)
        np.testing.assert_array_equal(got["topk"].tail_logprob, expected.tail_logprob)
    assert [r["id"] for r in capture.rows(split="heldout")] == [rows[0]["id"], rows[5]["id"]]
    slim = next(capture.rows(columns=["id", "prompt"]))
    assert set(slim) == {"id", "prompt"}
    assert capture.table().num_rows == 10


def test_shards_are_plain_parquet(tmp_path):
    write(tmp_path / "cap", n=6)
    table = pq.read_table(tmp_path / "cap" / "shard-00000.parquet")
    assert table.column_names[:9] == ["id", "prompt", "reference", "split", "prompt_ids", "completion_ids",
                                      "completion_text", "finish_reason", "sampled_logprob"]
    assert table.schema.field("completion_ids").type == pa.list_(pa.uint16())
    assert pq.ParquetFile(tmp_path / "cap" / "shard-00000.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    wide = get_codec("f16", 100_000, K)
    with CaptureWriter(tmp_path / "wide", RUN, wide) as w:
        w.add(make_row(1))
    assert pq.read_table(tmp_path / "wide" / "shard-00000.parquet").schema.field("topk_ids").type == pa.list_(pa.uint32())


def test_text_only_capture(tmp_path):
    with CaptureWriter(tmp_path / "cap", RUN, get_codec("none", VOCAB, 0)) as w:
        for i in range(3):
            row = make_row(i)
            row.update(topk_ids=None, topk_logprobs=None, sampled_logprob=None)
            w.add(row)
    capture = Capture.open(tmp_path / "cap")
    assert capture.text_only
    assert [r["topk"] for r in capture.rows()] == [None] * 3
    assert next(capture.rows())["sampled_logprob"] is None
    assert "topk_ids" not in pq.read_table(capture.shard_paths[0]).column_names


def test_mismatched_run_is_refused(tmp_path):
    write(tmp_path / "cap", n=3)
    other = json.loads(json.dumps(RUN))
    other["sampling"]["temperature"] = 0.7
    with pytest.raises(PotstillError, match="different sampling.temperature; use a new --out"):
        CaptureWriter(tmp_path / "cap", other, get_codec("mass", VOCAB, K))
    with pytest.raises(PotstillError, match="different codec.params.k"):
        CaptureWriter(tmp_path / "cap", RUN, get_codec("mass", VOCAB, 4))
    # writer-owned fields (counts, timings, ...) in the caller's dict do not count
    CaptureWriter(tmp_path / "cap", {**RUN, "timings": {"x": 1}}, get_codec("mass", VOCAB, K)).close()


def test_corrupt_shard_is_named(tmp_path):
    write(tmp_path / "cap", n=10)
    shard = tmp_path / "cap" / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PotstillError, match=r"cap/shard-00001.parquet: sha256 mismatch \(corrupt or modified\)"):
        Capture.open(tmp_path / "cap")
    with pytest.raises(PotstillError, match="shard-00001.parquet: sha256 mismatch"):
        CaptureWriter(tmp_path / "cap", RUN, get_codec("mass", VOCAB, K))
    Capture.open(tmp_path / "cap", verify=False)  # opt-out still opens


def test_missing_malformed_and_incomplete(tmp_path):
    with pytest.raises(PotstillError, match="no manifest.json"):
        Capture.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(PotstillError, match="manifest.json: unreadable manifest"):
        Capture.open(tmp_path)
    w = CaptureWriter(tmp_path / "cap", RUN, get_codec("mass", VOCAB, K), shard_rows=2)
    for i in range(5):
        w.add(make_row(i))
    w._release()  # abandoned without close(): like a killed run
    with pytest.raises(PotstillError, match="capture is incomplete"):
        Capture.open(tmp_path / "cap")
    assert len(Capture.open(tmp_path / "cap", allow_incomplete=True)) == 4


def test_duplicates_and_second_writer_are_refused(tmp_path):
    with CaptureWriter(tmp_path / "cap", RUN, get_codec("mass", VOCAB, K)) as w:
        w.add(make_row(0))
        with pytest.raises(PotstillError, match="already in the capture"):
            w.add(make_row(0))
        with pytest.raises(PotstillError, match="another process is writing"):
            CaptureWriter(tmp_path / "cap", RUN, get_codec("mass", VOCAB, K))


def test_crash_between_rename_and_manifest(tmp_path, monkeypatch):
    """A shard renamed but never listed, and a half-written temp file, are dropped on resume."""
    cap = tmp_path / "cap"
    w = CaptureWriter(cap, RUN, get_codec("mass", VOCAB, K), shard_rows=4)
    for i in range(4):
        w.add(make_row(i))
    calls = []

    def crash():
        calls.append(1)
        raise OSError("killed")

    monkeypatch.setattr(w, "_write_manifest", crash)
    with pytest.raises(OSError):
        for i in range(4, 8):
            w.add(make_row(i))
    w._release()
    assert (cap / "shard-00001.parquet").exists() and calls
    (cap / ".shard-00002.parquet.tmp").write_bytes(b"PAR1 half a shard")
    partial = Capture.open(cap, allow_incomplete=True)
    assert len(partial) == 4 and [r["id"] for r in partial.rows(columns=["id"])] == [make_row(i)["id"] for i in range(4)]
    write(cap, n=10)
    assert not (cap / ".shard-00002.parquet.tmp").exists()
    ids = [r["id"] for r in Capture.open(cap).rows(columns=["id"])]
    assert ids == [make_row(i)["id"] for i in range(10)]


SCRIPT = """
import sys, time
from tests.test_store import RUN, make_row
from potstill.capture.codec import get_codec
from potstill.capture.store import CaptureWriter
w = CaptureWriter(sys.argv[1], RUN, get_codec("mass", 1000, 8), shard_rows=5)
for i in range(40):
    w.add(make_row(i))
    time.sleep(0.03)
w.close()
"""


@pytest.mark.subprocess
def test_resume_after_kill_9(tmp_path):
    reference = tmp_path / "reference"
    write(reference, n=40, shard_rows=5)
    want = [(r["id"], r["completion_ids"].tolist()) for r in Capture.open(reference).rows(columns=["id", "completion_ids"])]

    cap = tmp_path / "cap"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(cap)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (cap / "shard-00001.parquet").exists():
            assert proc.poll() is None, "writer exited before it could be killed"
            assert time.monotonic() < deadline, "no shard written in 60 s"
            time.sleep(0.01)
        time.sleep(0.05)  # somewhere inside the third shard
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    listed = json.loads((cap / "manifest.json").read_text())["shards"]
    assert not json.loads((cap / "manifest.json").read_text())["complete"]
    with CaptureWriter(cap, RUN, get_codec("mass", VOCAB, K), shard_rows=5) as w:
        assert w.done_ids == {want[i][0] for i in range(5 * len(listed))}
        for i in range(40):
            if make_row(i)["id"] not in w.done_ids:
                w.add(make_row(i))
    got = [(r["id"], r["completion_ids"].tolist()) for r in Capture.open(cap).rows(columns=["id", "completion_ids"])]
    assert got == want
    assert not [p for p in cap.iterdir() if p.name.endswith(".tmp")]
