"""Attack 8: deleting the evidence. Raw SQL edits on a real SQLite log must be named by `log verify`."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from potstill.errors import PotstillError
from potstill.guard.keymat import Secret
from potstill.guard.logchain import load_log_key, verify
from potstill.guard.querylog import QueryLog, read_log

LOG_KEY = "3f9c1e7a5b2d4068a1c3e5f7092b4d6f8e0a2c4e6f8091b3d5f7092b4c6e8a0f"


@pytest.fixture
def logged(tmp_path):
    path = tmp_path / "q.db"
    log = QueryLog(path, key=LOG_KEY, checkpoint_every=20)
    for i in range(50):
        log.record({"key_id": f"k{i % 3}", "endpoint": "/v1/completions", "status": 200, "prompt": f"p{i}",
                    "params": {"max_tokens": 4}, "completion": f"c{i}", "ts": 1000.0 + i, "latency_ms": 1.5})
        if i % 10 == 9:
            log.flush()  # five batches: checkpoints at seq 20 and 40, and 50 on close
    log.close()
    return path


def _sql(path, *stmts):
    con = sqlite3.connect(path)
    for s in stmts:
        con.execute(s)
    con.commit()
    con.close()


def _check(path, kind, row_id):
    rep = verify(path, load_log_key(LOG_KEY))
    assert not rep.ok and rep.kind == kind and rep.row_id == row_id, rep.summary()
    assert f"row id {row_id}" in rep.problem if row_id is not None else rep.problem
    return rep


def test_untouched_log_verifies(logged):
    rep = verify(logged, load_log_key(LOG_KEY))
    assert rep.ok and rep.chained_rows == 50 and rep.last_seq == 50 and rep.checkpoints >= 3, rep.summary()


def test_edited_row_is_named(logged):
    _sql(logged, "UPDATE queries SET completion = 'something else' WHERE id = 17")
    _check(logged, "edited", 17)


def test_edited_timestamp_is_named(logged):
    _sql(logged, "UPDATE queries SET ts = ts + 0.001 WHERE id = 3")
    _check(logged, "edited", 3)


def test_deleted_row_is_named(logged):
    _sql(logged, "DELETE FROM queries WHERE id IN (30, 31)")
    rep = _check(logged, "deleted", 32)
    assert "seq 30..31" in rep.problem


def test_inserted_row_is_named(logged):
    _sql(logged, "INSERT INTO queries (ts, key_id, prompt, status) VALUES (1001.5, 'k0', '\"alibi\"', 200)")
    _check(logged, "inserted", 51)


def test_replayed_row_is_named(logged):
    cols = "ts, key_id, method, endpoint, model, prompt, params, tokens_in, tokens_out, logprobs, top_logprobs, " \
           "latency_ms, status, error_type, completion, prompt_kind, seq, mac"
    # the unique index on seq refuses a plain copy; an attacker drops it first
    _sql(logged, "DROP INDEX ix_queries_seq", f"INSERT INTO queries ({cols}) SELECT {cols} FROM queries WHERE id = 10")
    _check(logged, "inserted", 51)


def test_reordered_rows_are_named(logged):
    _sql(logged, "UPDATE queries SET id = -20 WHERE id = 20", "UPDATE queries SET id = 20 WHERE id = 21",
         "UPDATE queries SET id = 21 WHERE id = -20")
    _check(logged, "reordered", 20)


def test_rows_cut_off_the_end_are_caught_by_a_checkpoint(logged):
    _sql(logged, "DELETE FROM queries WHERE id > 45")
    rep = _check(logged, "deleted", None)
    assert "checkpoint" in rep.problem and "seq 45" in rep.problem


def test_forged_checkpoint_and_wrong_key(logged):
    rep = verify(logged, load_log_key("a" + LOG_KEY[1:]))
    assert not rep.ok and rep.kind == "edited" and rep.row_id == 1
    _sql(logged, "UPDATE log_checkpoints SET seq = 10 WHERE id = 1")
    assert verify(logged, load_log_key(LOG_KEY)).kind == "checkpoint"


def test_cli_log_verify_exit_codes(logged):
    env = {**os.environ, "POTSTILL_LOG_KEY": LOG_KEY}
    ok = subprocess.run([sys.executable, "-m", "potstill.cli", "log", "verify", "--log-db", str(logged)],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "log OK: 50 chained rows" in ok.stdout, ok.stderr
    _sql(logged, "UPDATE queries SET status = 500 WHERE id = 7")
    bad = subprocess.run([sys.executable, "-m", "potstill.cli", "log", "verify", "--log-db", str(logged)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "row id 7" in bad.stdout and "edited" in bad.stdout
    assert LOG_KEY not in bad.stdout + bad.stderr


def test_two_writers_share_one_chain(tmp_path):
    path = tmp_path / "q.db"
    logs = [QueryLog(path, key=LOG_KEY, batch_size=7) for _ in range(2)]

    def write(log, tag):
        for i in range(150):
            log.record({"key_id": tag, "status": 200, "prompt": [i]})

    threads = [threading.Thread(target=write, args=(log, f"w{n}")) for n, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    rep = verify(path, load_log_key(LOG_KEY))
    assert rep.ok and rep.chained_rows == 300, rep.summary()


def test_bounded_queue_reports_depth_and_drops_visibly(tmp_path):
    path = tmp_path / "q.db"
    log = QueryLog(path, key=LOG_KEY, max_pending=10)
    log.record({"status": 200})
    log.flush()
    con = sqlite3.connect(path, timeout=30)
    con.execute("BEGIN EXCLUSIVE")  # the database stops taking writes
    for _ in range(50):
        log.record({"status": 200})
    deadline = time.time() + 10  # the writer sets its in-flight count just after taking a batch
    while (h := log.health())["pending"] + h["in_flight"] + h["dropped"] != 50 and time.time() < deadline:
        time.sleep(0.01)
    assert h["pending"] == 10 and h["max_pending"] == 10 and not h["ok"]
    assert h["pending"] + h["in_flight"] + h["dropped"] == 50 and h["dropped"] >= 50 - 10 - 10
    con.rollback()
    con.close()
    log.close()
    assert len(read_log(path)) == 51 - log.health()["dropped"]
    assert verify(path, load_log_key(LOG_KEY)).ok


def test_log_key_sources_and_secrecy(tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_LOG_KEY", LOG_KEY)
    assert load_log_key().reveal() == LOG_KEY.encode()
    (tmp_path / "k").write_text(LOG_KEY[::-1] + "\n")
    monkeypatch.delenv("POTSTILL_LOG_KEY")
    monkeypatch.setenv("POTSTILL_LOG_KEY_FILE", str(tmp_path / "k"))
    assert load_log_key().reveal() == LOG_KEY[::-1].encode()
    monkeypatch.delenv("POTSTILL_LOG_KEY_FILE")
    monkeypatch.setenv("POTSTILL_HOME", str(tmp_path / "home"))
    with pytest.raises(PotstillError, match="no log key"):
        load_log_key(create=False)
    made = load_log_key()
    assert (tmp_path / "home/guard/log.key").stat().st_mode & 0o077 == 0 and load_log_key().reveal() == made.reveal()
    for weak in ("hunter2", "k" * 64, "abcabcabcabcabcabc"):
        with pytest.raises(PotstillError, match="too weak"):
            load_log_key(weak)
    log = QueryLog(tmp_path / "q.db", key=LOG_KEY)
    assert LOG_KEY not in repr(log) and LOG_KEY not in repr(log.__dict__) and isinstance(log._key, Secret)
    log.close()


def test_tail_cut_with_checkpoints_is_caught_by_the_head(logged):
    _sql(logged, "DELETE FROM queries WHERE id > 45", "DELETE FROM log_checkpoints WHERE seq > 45")
    rep = verify(logged, load_log_key(LOG_KEY))
    assert not rep.ok and rep.kind == "deleted" and "head is at seq 50" in rep.problem
