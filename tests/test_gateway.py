"""`potstill serve --upstream`: the guard in front of a llama.cpp-style server (tests/fake_llamacpp.py), 127.0.0.1.

Real HTTP both sides (uvicorn gateway in a thread, a scripted llama.cpp server in another): forwarding,
streams passed through chunk by chunk, metering from what was delivered (a client that leaves is
charged what was sent and the upstream connection is closed), and every upstream failure mapped to
502/503/504 -- never a 500 or a hang -- with exactly one log row per request.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from potstill.guard.querylog import read_log
from potstill.guard.ratelimit import RateLimiter
from tests.fake_llamacpp import fake_llamacpp
from tests.guard_fixtures import free_port, live_gateway

CHAT = [{"role": "user", "content": "Name two animals please"}]  # 4 words -> 4 prompt tokens upstream
TPM = 1_000_000


@pytest.fixture
def upstream():
    with fake_llamacpp() as srv:
        yield srv


@pytest.fixture
def gw(upstream, tmp_path, monkeypatch):
    """A gateway (frozen-clock limiter: bucket levels are exact) in front of the fake, and a key's headers."""
    monkeypatch.setenv("POTSTILL_UPSTREAM_KEY", "sk-upstream-secret")
    limiter = RateLimiter(rpm=None, tpm=TPM, clock=lambda: 0.0)
    with live_gateway(upstream.url + "/v1", tmp_path, limiter=limiter, max_tokens_cap=256,
                      upstream_timeout_s=1.0) as srv:
        key_id, secret = srv.keys.create("user")
        srv.key_id, srv.h, srv.limiter = key_id, {"Authorization": f"Bearer {secret}"}, limiter
        yield srv


def rows_of(srv, n: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        srv.flush()
        rows = sorted(read_log(srv.querylog_url), key=lambda r: r["id"])
        if len(rows) >= n or time.time() > deadline:
            return rows
        time.sleep(0.05)


def charged(srv) -> float:
    level = srv.limiter.level(srv.key_id)
    return 0.0 if level is None else TPM - level


def events(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def test_chat_forwarded_metered_and_logged(gw, upstream):
    with httpx.Client(timeout=30) as http:
        r = http.post(gw.base + "/chat/completions", headers=gw.h, json={"model": "m", "messages": CHAT})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == " ".join(f"w{i}" for i in range(256))
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 256, "total_tokens": 260}
        sent = upstream.requests[-1]
        assert sent["body"]["max_tokens"] == 256  # absent -> the server's cap: no unbounded decode upstream
        assert sent["auth"] == "Bearer sk-upstream-secret" and sent["body"]["messages"] == CHAT
        n = len(upstream.requests)
        assert http.post(gw.base + "/chat/completions", json={"messages": CHAT}).status_code == 401
        assert http.post(gw.base + "/completions", headers=gw.h,
                         json={"prompt": "x", "max_tokens": 257}).status_code == 400  # over the cap
        assert http.get(gw.base + "/models", headers=gw.h).json()["data"][0]["id"] == "llama.gguf"
        assert len(upstream.requests) == n  # refused requests never reach the upstream
    assert charged(gw) == 260  # settled to the upstream's usage
    rows = rows_of(gw, 4)
    ok = rows[0]
    assert (ok["status"], ok["key_id"], ok["tokens_in"], ok["tokens_out"]) == (200, gw.key_id, 4, 256)
    assert ok["completion"].startswith("w0 w1") and ok["prompt"] == CHAT and ok["client"] == "127.0.0.1"
    assert [r["status"] for r in rows] == [200, 401, 400, 200]


def test_stream_passed_through_chunk_by_chunk(gw, upstream):
    with httpx.Client(timeout=30) as http:
        body = {"prompt": "once upon a time", "max_tokens": 20, "stream": True}
        with http.stream("POST", gw.base + "/completions", headers=gw.h, json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            got = events(r.iter_lines())
        assert got[-1] == "[DONE]" and all(ev["object"] == "text_completion" for ev in got[:-1])
        assert "".join(ev["choices"][0]["text"] for ev in got[:-1]) == " ".join(f"w{i}" for i in range(20))
        assert len(got) == 22 and all(ev["choices"] for ev in got[:-1])  # 20 words, the finish chunk; no usage
        assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}  # asked for the meter
        body = {"messages": CHAT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", gw.base + "/chat/completions", headers=gw.h, json=body) as r:
            got = events(r.iter_lines())
        assert got[-2]["choices"] == [] and got[-2]["usage"]["completion_tokens"] == 5  # the client asked for it
    assert charged(gw) == (4 + 20) + (4 + 5)
    rows = rows_of(gw, 2)
    assert [(r["tokens_in"], r["tokens_out"], r["error_type"]) for r in rows] == [(4, 20, None), (4, 5, None)]


def test_client_leaving_mid_stream_is_charged_what_was_sent_and_the_upstream_stops(gw, upstream):
    upstream.delay_s = 0.02
    read = ""
    body = {"prompt": "go", "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", gw.base + "/completions", headers=gw.h,
                                                        json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                read += json.loads(line[6:])["choices"][0]["text"]
                if read.count("w") >= 5:
                    break  # leave: the connection is closed without reading on
    row = rows_of(gw, 1)[0]
    assert row["error_type"] == "client_closed" and row["status"] == 200
    assert 5 <= row["tokens_out"] < 100, row["tokens_out"]
    assert row["completion"].startswith(read) and row["completion"].count("w") == row["tokens_out"]
    assert charged(gw) == 1 + len("go") // 4 + row["tokens_out"]  # the prompt estimate + what was sent
    deadline = time.time() + 10
    while not upstream.closed_early and time.time() < deadline:
        time.sleep(0.05)
    assert upstream.closed_early and upstream.closed_early[0] < 150  # the upstream saw the gateway hang up


@pytest.mark.parametrize("mode, stream, status, error_type", [
    ("hang", False, 504, "upstream_timeout"),
    ("hang", True, 504, "upstream_timeout"),
    ("garbage", False, 502, "upstream_bad_response"),
    ("error500", False, 502, "upstream_bad_response"),
    ("busy", True, 503, "upstream_overloaded"),
])
def test_upstream_failures_are_502_503_504_never_500_or_a_hang(gw, upstream, mode, stream, status, error_type):
    upstream.mode = mode
    t0 = time.perf_counter()
    with httpx.Client(timeout=30) as http:
        r = http.post(gw.base + "/chat/completions", headers=gw.h,
                      json={"messages": CHAT, "max_tokens": 8, "stream": stream})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == error_type
    assert time.perf_counter() - t0 < 10  # upstream_timeout_s = 1
    if status == 503:
        assert int(r.headers["Retry-After"]) >= 1
    row = rows_of(gw, 1)[0]
    assert (row["status"], row["error_type"]) == (status, error_type)
    assert charged(gw) == 0  # nothing delivered, nothing charged
    assert gw.app.state.gate.open == set() and gw.app.state.gate.inflight == {}


@pytest.mark.parametrize("mode", ["garbage", "cut"])
def test_a_stream_that_goes_bad_ends_with_an_error_event(gw, upstream, mode):
    upstream.mode = mode
    with httpx.Client(timeout=30) as http, http.stream("POST", gw.base + "/completions", headers=gw.h,
                                                        json={"prompt": "go", "max_tokens": 50, "stream": True}) as r:
        got = events(r.iter_lines())
    assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == "upstream_bad_response"
    assert [ev["choices"][0]["text"] for ev in got[:-2]] == ["w0", " w1", " w2"]
    row = rows_of(gw, 1)[0]
    assert (row["error_type"], row["tokens_out"], row["completion"]) == ("upstream_bad_response", 3, "w0 w1 w2")
    assert charged(gw) == 1 + 3  # what was sent


def test_upstream_refusing_connections_is_503(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with live_gateway(dead, tmp_path, upstream_timeout_s=2.0) as gw, httpx.Client(timeout=30) as http:
        _, secret = gw.keys.create("user")
        for stream in (False, True):
            r = http.post(gw.base + "/completions", headers={"Authorization": f"Bearer {secret}"},
                          json={"prompt": "hi", "max_tokens": 4, "stream": stream})
            assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable", r.text
            assert r.headers["Retry-After"] == "5"
        assert http.get(gw.url + "/health").json()["upstream"] == dead + "/v1"
        rows = rows_of(gw, 3)
    assert [(r["endpoint"], r["status"], r["error_type"]) for r in rows] == [
        ("/v1/completions", 503, "upstream_unavailable")] * 2 + [("/health", 200, None)]


def test_rate_limit_applies_before_the_upstream(upstream, tmp_path):
    with live_gateway(upstream.url, tmp_path) as gw, httpx.Client(timeout=30) as http:
        _, secret = gw.keys.create("small", rpm=2)
        h = {"Authorization": f"Bearer {secret}"}
        codes = [http.post(gw.base + "/completions", headers=h, json={"prompt": "hi", "max_tokens": 2}).status_code
                 for _ in range(4)]
    assert codes == [200, 200, 429, 429] and len(upstream.requests) == 2
