"""serve against an adversary (issue 14, attacks 1, 4, 5, 6): a real uvicorn server on 127.0.0.1, tiny model.

1. a client that disconnects (stream or not) is charged exactly what it was sent, its row stops
   decoding, and its log row says `client_closed` with the partial completion;
4. bounded queue (503), per-key concurrency (429), a deadline (504), rows with distinct seeds and
   temperatures sharing a batch, and new requests joining a running batch;
5. refused requests do no tokenising and store no large prompts;
6. auth is a route dependency (holds under a root_path, answers before the body), docs off.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from potstill.guard.querylog import read_log
from potstill.guard.ratelimit import RateLimiter
from tests.guard_fixtures import live_server, one_torch_thread, tiny_teacher

CHAT = [{"role": "user", "content": "Name two animals."}]
LONG = 300  # tokens (the tiny model's context is 512)
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def teacher():
    with one_torch_thread():
        yield tiny_teacher()


def wait_rows(srv, n: int, timeout: float = 15.0) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        srv.flush()
        rows = read_log(srv.querylog_url)
        if len(rows) >= n or time.time() > deadline:
            return rows
        time.sleep(0.05)


def bucket(limiter: RateLimiter, key_id: str) -> float:
    """The key's token-bucket level (full before its first request)."""
    b = limiter._tokens.get(key_id)
    return b.level if b is not None else float(limiter.default_tpm)


@pytest.fixture(scope="module")
def long(teacher) -> tuple[int, str]:
    """A seed whose completion of PROMPT runs to LONG tokens (no EOS), and its text (the server's, seeded)."""
    from potstill.teachers.base import SamplingParams

    ids = teacher.tokenizer(PROMPT)["input_ids"]
    outs = teacher.complete_ids([ids] * 8, SamplingParams(max_new_tokens=LONG, temperature=1.0, top_logprobs=0),
                                seeds=list(range(8)))
    return next((s, o.text) for s, o in enumerate(outs) if len(o.completion_ids) == LONG)


# ---- 1. disconnects ---------------------------------------------------------------------------
def test_stream_disconnect_is_charged_stopped_and_logged(teacher, long, tmp_path):
    limiter = RateLimiter(rpm=None, tpm=1_000_000, clock=lambda: 0.0)  # frozen clock: no refill
    with live_server(teacher, tmp_path, limiter=limiter, max_tokens_cap=LONG) as srv:
        key_id, sec = srv.keys.create("leech")
        h = {"Authorization": f"Bearer {sec}"}
        seed, full = long
        stats = srv.app.state.service.batcher.stats
        level, decoded = bucket(limiter, key_id), stats.get("tokens", 0)
        got, chunks = "", 0
        body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 1.0, "seed": seed, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", srv.base + "/completions", json=body,
                                                            headers=h) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text = json.loads(line[6:])["choices"][0]["text"]
                    got += text
                    chunks += bool(text)
                    if chunks == 5:
                        break  # leaving the `with` closes the connection mid-stream
        row = wait_rows(srv, 1)[-1]
        time.sleep(0.3)
        charged = level - bucket(limiter, key_id)
        # charged exactly what the row says was sent, which is at least what the client read
        assert charged >= row["tokens_in"] + chunks, (charged, row["tokens_in"], chunks)
        assert charged == row["tokens_in"] + row["tokens_out"]
        assert chunks <= row["tokens_out"] < LONG
        assert row["error_type"] == "client_closed" and row["status"] == 200
        assert row["completion"].startswith(got) and full.startswith(row["completion"])
        assert stats["tokens"] - decoded < LONG  # the batcher stopped decoding the departed row


def test_non_streaming_timeout_stops_decoding(teacher, long, tmp_path):
    limiter = RateLimiter(rpm=None, tpm=1_000_000, clock=lambda: 0.0)
    with live_server(teacher, tmp_path, limiter=limiter, max_tokens_cap=LONG) as srv:
        key_id, sec = srv.keys.create("impatient")
        seed = long[0]
        stats = srv.app.state.service.batcher.stats
        level, decoded = bucket(limiter, key_id), stats.get("tokens", 0)
        body = json.dumps({"prompt": PROMPT, "max_tokens": LONG, "temperature": 1.0, "seed": seed}).encode()
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # a client that gives up waiting
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {sec}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.time() + 20
            while stats["batches"] == 0 and time.time() < deadline:  # until its row is decoding
                time.sleep(0.005)
        row = wait_rows(srv, 1)[-1]
        time.sleep(0.3)
        assert row["error_type"] == "client_closed"
        assert stats["tokens"] - decoded < LONG
        assert level - bucket(limiter, key_id) == row["tokens_in"] + row["tokens_out"]


# ---- 5. limits before costly work ---------------------------------------------------------------
def test_refused_requests_do_no_costly_work_and_log_no_big_prompt(teacher, tmp_path, monkeypatch):
    calls = []
    real = teacher.encode_chat
    monkeypatch.setattr(teacher, "encode_chat", lambda m: calls.append(1) or real(m))
    big = [{"role": "user", "content": "word " * 190_000}]  # ~950 KB
    with live_server(teacher, tmp_path, max_body_bytes=1 << 20) as srv:
        _, sec = srv.keys.create("flood", rpm=1)
        url = srv.base + "/chat/completions"
        h = {"Authorization": f"Bearer {sec}"}
        assert httpx.post(url, json={"messages": CHAT, "max_tokens": 2}, headers=h, timeout=30).status_code == 200
        assert len(calls) == 1
        r = httpx.post(url, json={"messages": big, "max_tokens": 2}, headers=h, timeout=30)
        assert r.status_code == 429 and len(calls) == 1  # refused before the chat template ran
        assert httpx.post(url, json={"messages": big}, timeout=30).status_code == 401
        _, sec2 = srv.keys.create("bad")
        r = httpx.post(url, json={"messages": big, "n": 3}, headers={"Authorization": f"Bearer {sec2}"}, timeout=30)
        assert r.status_code == 400 and len(calls) == 1
        rows = wait_rows(srv, 4)
    refused = [r for r in rows if r["status"] >= 400]
    assert sorted(r["status"] for r in refused) == [400, 401, 429]
    for r in refused:
        assert len(json.dumps(r["prompt"])) < 4096, r["status"]
    stored = next(r["prompt"] for r in refused if r["status"] == 429)
    assert stored["truncated"] and stored["chars"] > 900_000 and len(stored["sha256"]) == 64


# ---- 6. auth ------------------------------------------------------------------------------------
def test_auth_holds_under_root_path_and_docs_are_off(teacher, tmp_path):
    with live_server(teacher, tmp_path, server_kwargs={"root_path": "/api"}) as srv:
        _, sec = srv.keys.create("ok")
        # a proxy strips "/api": uvicorn sees /v1/models as path "/api/v1/models" under root_path "/api"
        for path in ("/v1/models", "/v1/models/tiny"):
            assert httpx.get(srv.url + path, timeout=10).status_code == 401, path
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
        assert r.status_code == 401
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {sec}"}, timeout=10)
        assert r.status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(srv.url + path, timeout=10).status_code == 404, path
    with live_server(teacher, tmp_path / "docs", docs=True) as srv:
        assert httpx.get(srv.url + "/openapi.json", timeout=10).status_code == 200


def test_auth_answers_before_the_body_is_read(teacher, tmp_path):
    with live_server(teacher, tmp_path) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 500000\r\n\r\n{\"messages\": [")  # the body never comes
            s.settimeout(3)
            try:
                head = s.recv(4096)
            except TimeoutError:
                head = b""
        assert head.startswith(b"HTTP/1.1 401"), head[:80]


# ---- 4. backpressure and fairness ----------------------------------------------------------------
async def _burst(srv, sec: str, bodies: list[dict], timeout: float = 60) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=srv.base, timeout=timeout,
                                 headers={"Authorization": f"Bearer {sec}"}) as http:
        return await asyncio.wait_for(
            asyncio.gather(*[http.post("/completions", json=b) for b in bodies]), timeout)


def test_distinct_seeds_and_temperatures_share_a_batch(teacher, tmp_path):
    with live_server(teacher, tmp_path, default_rpm=None, default_tpm=None, batch_window_ms=50) as srv:
        _, sec = srv.keys.create("fair")
        bodies = [{"prompt": f"Numbers {i}", "max_tokens": 12, "seed": 100 + i, "temperature": 0.5 + 0.1 * i,
                   "top_p": 0.9 if i % 2 else 1.0} for i in range(8)]
        alone = [r.json()["choices"][0]["text"] for b in bodies for r in asyncio.run(_burst(srv, sec, [b]))]
        stats = srv.app.state.service.batcher.stats
        before = dict(stats)
        together = [r.json()["choices"][0]["text"] for r in asyncio.run(_burst(srv, sec, bodies))]
        assert together == alone
        assert stats["batches"] - before["batches"] < len(bodies) and stats["max_rows"] > 1


def test_bounded_queue_concurrency_cap_and_deadline(teacher, long, tmp_path):
    body = {"prompt": PROMPT, "max_tokens": 100, "temperature": 1.0, "seed": long[0]}  # no EOS before 100
    with live_server(teacher, tmp_path, default_rpm=None, default_tpm=None, max_tokens_cap=LONG,
                     max_concurrent_per_key=2) as srv:
        _, sec = srv.keys.create("greedy")
        statuses = [r.status_code for r in asyncio.run(_burst(srv, sec, [body] * 6))]
        assert sorted(statuses) == [200, 200, 429, 429, 429, 429], statuses
    with live_server(teacher, tmp_path / "queue", default_rpm=None, default_tpm=None, max_tokens_cap=LONG,
                     max_pending=3, max_batch_size=1) as srv:
        secs = [srv.keys.create(f"u{i}")[1] for i in range(8)]

        async def all_keys():
            return await asyncio.gather(*[_burst(srv, s, [body]) for s in secs])

        rs = [r for group in asyncio.run(all_keys()) for r in group]
        statuses = [r.status_code for r in rs]
        assert set(statuses) == {200, 503}, statuses
        for r in rs:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["message"]
    with live_server(teacher, tmp_path / "late", default_rpm=None, default_tpm=None, max_tokens_cap=LONG,
                     request_timeout_s=0.05) as srv:
        _, sec = srv.keys.create("late")
        for stream in (False, True):
            r = asyncio.run(_burst(srv, sec, [{**body, "max_tokens": LONG, "stream": stream}]))[0]
            assert r.status_code == 504 if not stream else "deadline" in r.text, r.text[:200]


def test_new_requests_join_a_running_batch(teacher, long, tmp_path):
    with live_server(teacher, tmp_path, default_rpm=None, default_tpm=None, max_tokens_cap=LONG) as srv:
        _, sec = srv.keys.create("joiner")
        h = {"Authorization": f"Bearer {sec}"}
        seed, full = long
        short = {"prompt": "Numbers 3", "max_tokens": 8, "seed": 7, "temperature": 0.8, "top_p": 0.9}
        alone = httpx.post(srv.base + "/completions", json=short, headers=h, timeout=30).json()["choices"][0]["text"]
        stats = srv.app.state.service.batcher.stats

        async def scenario():
            async with httpx.AsyncClient(base_url=srv.base, headers=h, timeout=60) as http:
                body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 1.0, "seed": seed}
                long = asyncio.ensure_future(http.post("/completions", json=body))
                while stats["batches"] == before["batches"] and not long.done():
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # the long row is decoding
                r = await http.post("/completions", json=short)
                return r, long.done(), await long

        before = dict(stats)
        r, long_done, rl = asyncio.run(scenario())
        assert r.json()["choices"][0]["text"] == alone and rl.json()["choices"][0]["text"] == full
        assert not long_done  # the short request did not wait for the long one
        assert stats["batches"] - before["batches"] == 1 and stats["joined"] - before["joined"] == 1
