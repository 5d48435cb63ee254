"""The served query log under attack, through a real uvicorn server (tiny model, real SQLite)."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest

from potstill.guard.querylog import read_log
from tests.guard_fixtures import live_server, one_torch_thread, tiny_teacher


@pytest.fixture(scope="module")
def teacher():
    with one_torch_thread():
        yield tiny_teacher()


def _post(srv, path, raw: str, secret: str) -> httpx.Response:
    # `raw` is ASCII JSON holding \\ud800-style escapes: json.loads turns them into lone surrogates
    return httpx.post(srv.base + path, content=raw.encode(), timeout=30,
                      headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})


POISON = [
    ("/completions", '{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}'),
    ("/completions", '{"model": "tiny", "prompt": ["\\udfff x"], "max_tokens": 2}'),
    ("/completions", '{"model": "\\ud800", "prompt": "hi", "max_tokens": 2}'),
    ("/completions", '{"model": "tiny", "prompt": "nul \\u0000 here", "max_tokens": 2, "user": "\\ud800"}'),
    ("/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
    ("/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
                          '"stop": ["\\ud800"]}'),
]


def test_poisoned_requests_are_answered_and_logged_with_everyone_else(teacher, tmp_path):
    """Attack 2 over HTTP: lone surrogates / NUL in free-text fields; no 500, no lost rows."""
    with live_server(teacher, tmp_path, max_tokens_cap=8) as srv:
        _, sec = srv.keys.create("mallory")
        statuses = []
        for path, raw in POISON:
            r = _post(srv, path, raw, sec)
            assert r.status_code < 500, (raw, r.status_code, r.text)
            statuses.append(r.status_code)
        for i in range(20):
            good = {"model": "tiny", "prompt": f"good {i}", "max_tokens": 1, "seed": i}
            r = _post(srv, "/completions", json.dumps(good), sec)
            assert r.status_code == 200
            statuses.append(200)
        srv.flush()
        log_url = srv.querylog_url
    rows = read_log(log_url)
    assert sorted(r["status"] for r in rows) == sorted(statuses)
    assert sum(isinstance(r["prompt"], str) and r["prompt"].startswith("good") for r in rows) == 20
    assert rows[0]["prompt"] == "\ud800"  # the JSON fields keep the exact request
    served = [r for r in rows if r["status"] == 200]
    assert len(served) == 20 and all(len(r["completion_ids"]) == r["tokens_out"] for r in served)  # ids served
    assert all(0 <= t < len(teacher.tokenizer) for r in served for t in r["completion_ids"])


def test_failing_log_makes_health_not_ok_and_refuses_work(teacher, tmp_path):
    """Attack 8: a log that cannot be written must not fail open while /health says ok."""
    with live_server(teacher, tmp_path, max_tokens_cap=8) as srv:
        _, sec = srv.keys.create("k")
        h = httpx.get(srv.url + "/health").json()
        assert h["status"] == "ok" and h["querylog"]["pending"] == 0 and h["querylog"]["max_pending"] > 0
        con = sqlite3.connect(srv.querylog_url)
        con.execute("DROP TABLE queries")  # the database now refuses every row
        con.commit()
        con.close()
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1})
        _post(srv, "/completions", body, sec)
        deadline = time.time() + 20  # the row is queued just after the response; its write then fails
        while (r := httpx.get(srv.url + "/health")).status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "degraded"
        assert r.json()["querylog"]["failing"] and r.json()["querylog"]["dropped"] >= 1
        r = _post(srv, "/completions", body, sec)
        assert r.status_code == 503 and "Retry-After" in r.headers
