"""serve: the official openai client against a real uvicorn server on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import openai
import pytest

from potstill.guard.querylog import read_log
from potstill.guard.ratelimit import RateLimiter
from potstill.guard.serve import ServeConfig, safe_prefix
from potstill.guard.watermark import WatermarkConfig, detect_ids
from tests.guard_fixtures import WATERMARK_KEY, live_server, one_torch_thread, tiny_teacher

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def teacher():
    with one_torch_thread():
        yield tiny_teacher()


@pytest.fixture(scope="module")
def wm_cfg(teacher):
    return WatermarkConfig(key=WATERMARK_KEY, gamma=0.25, delta=4.0, vocab_size=len(teacher.tokenizer))


@pytest.fixture(scope="module")
def server(teacher, wm_cfg, tmp_path_factory):
    with live_server(teacher, tmp_path_factory.mktemp("serve"), watermark=wm_cfg, max_tokens_cap=64,
                     max_body_bytes=64_000) as srv:
        yield srv


@pytest.fixture(scope="module")
def secret(server):
    return server.keys.create("tester", max_top_logprobs=None)[1]  # the server's cap


@pytest.fixture(scope="module")
def client(server, secret):
    return openai.OpenAI(base_url=server.base, api_key=secret, max_retries=0, timeout=30)


def post(server, path, body, secret=None, **kw):
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(server.base + path, json=body, headers=headers, timeout=30, **kw)


# ---- the openai client ------------------------------------------------------------------------
def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "potstill"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, seed=1)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert c.logprobs is None


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=3,
                                       seed=2, temperature=0.7)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 3
        lps = [x.logprob for x in t.top_logprobs]
        assert lps == sorted(lps, reverse=True) and t.logprob <= lps[0] + 1e-6
    # without top_logprobs: the sampled token's log-prob only
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, logprobs=True)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)


def test_completions_string_and_token_prompts(client, teacher):
    r = client.completions.create(model="tiny", prompt="The capital of", max_tokens=5, logprobs=2, seed=3)
    c = r.choices[0]
    lp = c.logprobs
    n = r.usage.completion_tokens
    assert r.object == "text_completion" and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert all(1 <= len(d) <= 2 for d in lp.top_logprobs) and lp.text_offset[0] == len("The capital of")
    assert lp.text_offset == sorted(lp.text_offset)
    ids = teacher.tokenizer("The capital of")["input_ids"]
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=5, logprobs=2, seed=3)
    assert r2.choices[0].text == c.text and r2.usage.prompt_tokens == len(ids)
    r3 = client.completions.create(model="tiny", prompt=["The capital of"], max_tokens=5, seed=3)
    assert r3.choices[0].text == c.text


def test_seed_is_deterministic_and_independent_of_batching(client, server):
    kw = dict(model="tiny", messages=CHAT, max_tokens=10, temperature=1.0)
    solo = [client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(6)]
    assert len(set(solo)) > 1  # sampling happens

    async def burst():
        async with openai.AsyncOpenAI(base_url=server.base, api_key=client.api_key, max_retries=0) as ac:
            rs = await asyncio.gather(*[ac.chat.completions.create(seed=s % 6, **kw) for s in range(24)])
        return [r.choices[0].message.content for r in rs]

    before = dict(server.app.state.service.batcher.stats)
    together = asyncio.run(burst())
    after = server.app.state.service.batcher.stats
    assert together == [solo[s % 6] for s in range(24)]
    assert after["batches"] - before["batches"] < 24 and after["max_rows"] > 1  # they were batched


def test_mixed_max_tokens_in_one_batch(client, server):
    kw = dict(model="tiny", prompt="Numbers one two", temperature=1.0, seed=9)
    solo = {m: client.completions.create(max_tokens=m, **kw).choices[0] for m in (2, 7, 20)}

    async def burst():
        async with openai.AsyncOpenAI(base_url=server.base, api_key=client.api_key, max_retries=0) as ac:
            return await asyncio.gather(*[ac.completions.create(max_tokens=m, **kw) for m in (2, 7, 20) * 3])

    for r, m in zip(asyncio.run(burst()), (2, 7, 20) * 3, strict=True):
        c = r.choices[0]
        assert (c.text, c.finish_reason) == (solo[m].text, solo[m].finish_reason)
        assert r.usage.completion_tokens <= m


def test_stop_strings(client):
    base = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0).choices[0].text
    stop = base[len(base) // 2 : len(base) // 2 + 2]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == base[: base.find(stop)] and r.choices[0].finish_reason == "stop"
    assert safe_prefix("abcSTO", ("STOP",)) == "abc" and safe_prefix("aSTOPb", ("STOP", "x")) == "a"


def test_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", messages=CHAT, max_tokens=12, seed=5)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    # with log-probs: one chunk per token
    chunks = list(client.chat.completions.create(stream=True, logprobs=True, top_logprobs=2, **kw))
    toks = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(toks) == full.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content

    kw = dict(model="tiny", prompt="Write a short poem", max_tokens=12, seed=6)
    full = client.completions.create(**kw).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)) == full
    raw = httpx.post(f"{client.base_url}completions", json={**kw, "stream": True},
                     headers={"Authorization": f"Bearer {client.api_key}"}, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_watermark_is_applied(client, teacher, wm_cfg):
    texts = [client.completions.create(model="tiny", prompt="The", max_tokens=32, seed=100 + s).choices[0].text
             for s in range(8)]
    ids = [teacher.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    score = detect_ids(ids, wm_cfg)
    assert score.tokens_scored > 50 and score.p_value < 1e-6


# ---- errors -----------------------------------------------------------------------------------
def test_auth_errors(server, secret):
    bad = openai.OpenAI(base_url=server.base, api_key="psk-000000000000-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    r = post(server, "/chat/completions", {"messages": CHAT})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    key_id, sec = server.keys.create("to-revoke")
    assert post(server, "/chat/completions", {"messages": CHAT, "max_tokens": 1}, sec).status_code == 200
    server.keys.revoke(key_id)
    r = post(server, "/chat/completions", {"messages": CHAT, "max_tokens": 1}, sec)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert httpx.get(server.base + "/models", headers={"Authorization": "Basic xyz"}).status_code == 401


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": CHAT, "n": 2}, "n"),
        ({"messages": CHAT, "max_tokens": 65}, "max_tokens"),
        ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"messages": CHAT, "temperature": "hot"}, "temperature"),
        ({"messages": CHAT, "temperature": 3}, "temperature"),
        ({"messages": CHAT, "top_p": -1}, "top_p"),
        ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "x " * 3000}], "max_tokens": 8}, "messages"),
        ({"messages": CHAT, "logit_bias": {"5": 100}}, "logit_bias"),
        ({}, "messages"),
    ],
)
def test_chat_bad_requests_are_400(server, secret, body, param):
    r = post(server, "/chat/completions", body, secret)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": [10**6]},
        {"prompt": ["a", "b"]},
        {"prompt": [-1]},
        {"prompt": "x", "echo": True},
        {"prompt": "x", "best_of": 3},
        {"prompt": "x", "logprobs": 99},
        {"prompt": None},
        {"prompt": {"a": 1}},
    ],
)
def test_completion_bad_requests_are_400(server, secret, body):
    r = post(server, "/completions", body, secret)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_malformed_and_oversized_bodies(server, secret):
    h = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    r = httpx.post(server.base + "/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["message"]
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    r = httpx.post(server.base + "/chat/completions", content=big, headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds on the bytes actually received
        for _ in range(100):
            yield b"x" * 1000

    r = httpx.post(server.base + "/chat/completions", content=chunks(), headers=h)
    assert r.status_code == 413
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_rate_limit_maps_to_openai_error(server):
    key_id, sec = server.keys.create("slow", rpm=2)
    c = openai.OpenAI(base_url=server.base, api_key=sec, max_retries=0)
    for _ in range(2):
        c.completions.create(model="tiny", prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        c.completions.create(model="tiny", prompt="hi", max_tokens=1)
    retry = err.value.response.headers["retry-after"]
    assert retry.isdigit() and int(retry) >= 1
    assert err.value.body["code"] == "rate_limit_exceeded"
    server.keys.set_limits(key_id, rpm=1000, tpm=40)  # raising the limit applies at once; tpm now binds
    c.completions.create(model="tiny", prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError, match="Request too large"):
        c.completions.create(model="tiny", prompt="hi", max_tokens=60)


# ---- the query log and secrets ----------------------------------------------------------------
def test_every_request_logged_once_and_no_secret_leaks(teacher, wm_cfg, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    clock_limiter = RateLimiter(rpm=3, tpm=None)
    with live_server(teacher, tmp_path, limiter=clock_limiter, log_level="debug", watermark=wm_cfg,
                     max_tokens_cap=16) as srv:
        key_id, sec = srv.keys.create("audited", max_top_logprobs=None)
        c = openai.OpenAI(base_url=srv.base, api_key=sec, max_retries=0)
        sent = []
        c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2)
        sent.append(200)
        list(c.completions.create(model="tiny", prompt="Hi", max_tokens=4, stream=True))
        sent.append(200)
        assert post(srv, "/chat/completions", {"messages": CHAT, "max_tokens": 99}, sec).status_code == 400
        sent.append(400)
        assert post(srv, "/chat/completions", {"messages": CHAT}, sec).status_code == 200
        sent.append(200)
        assert post(srv, "/chat/completions", {"messages": CHAT}, sec).status_code == 429
        sent.append(429)
        assert post(srv, "/chat/completions", {"messages": CHAT}, sec + "x").status_code == 401
        sent.append(401)
        r = post(srv, "/models", {}, None)  # no such method: 405 (the route's key check never runs)
        assert r.status_code == 405
        sent.append(405)
        assert httpx.get(srv.url + "/health").status_code == 200
        sent.append(200)
        assert httpx.get(srv.url + "/nope").status_code == 404
        sent.append(404)
        big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
        assert post(srv, "/chat/completions", big, sec).status_code == 413
        sent.append(413)
        log_url = srv.querylog_url
    rows = read_log(log_url)
    assert sorted(r["status"] for r in rows) == sorted(sent)
    first = rows[0]
    assert first["key_id"] == key_id and first["endpoint"] == "/v1/chat/completions" and first["logprobs"] is True
    assert first["top_logprobs"] == 2 and first["prompt"] == CHAT and first["params"]["max_tokens"] == 4
    assert first["tokens_in"] > 0 and 0 < first["tokens_out"] <= 4 and first["latency_ms"] > 0
    assert first["error_type"] is None
    assert {r["error_type"] for r in rows if r["status"] == 429} == {"rate_limit_exceeded"}
    assert [r["key_id"] for r in rows if r["status"] in (401, 405)] == [None, None]
    # secrets appear nowhere: database files (WAL included), captured logs, stdout/stderr
    out, err = capfd.readouterr()
    blobs = [p.read_bytes() for p in tmp_path.iterdir() if p.is_file()]
    texts = [out, err, caplog.text] + [b.decode("latin-1") for b in blobs]
    for s in (sec, sec.split("-", 2)[2], WATERMARK_KEY):
        assert not any(s in t for t in texts)
    assert any(key_id in t for t in texts)  # the key id is what identifies a key


def test_serve_config():
    cfg = ServeConfig(watermark=WatermarkConfig(key=WATERMARK_KEY))
    assert cfg.keys_url.endswith("keys.db") and cfg.querylog_url.endswith("queries.db")
    assert WATERMARK_KEY not in repr(cfg) and WATERMARK_KEY not in json.dumps(cfg.public_dict())
    from potstill.errors import PotstillError

    with pytest.raises(PotstillError):
        ServeConfig(max_tokens_cap=0)


def test_querylog_wal_batching_and_close(tmp_path):
    from sqlalchemy import text

    from potstill.guard.querylog import QueryLog

    log = QueryLog(tmp_path / "q.db")
    with log.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    for i in range(1000):
        log.record({"key_id": f"k{i % 3}", "endpoint": "/v1/x", "status": 200, "prompt": [{"i": i}], "params": {}})
    log.flush()
    assert len(read_log(tmp_path / "q.db")) == 1000
    log.close()
    log.record({"status": 401})  # after close: written synchronously, still exactly once
    log.close()
    rows = read_log(f"sqlite:///{tmp_path / 'q.db'}")
    assert len(rows) == 1001 and rows[5]["prompt"] == [{"i": 5}] and rows[-1]["status"] == 401
    assert len(read_log(tmp_path / "q.db", key_id="k1")) == 333


@pytest.mark.parametrize("fast", [True, False])
def test_detokenizer_deltas_join_to_the_whole_text(fast):
    """Streamed deltas, one id at a time, join to decode(all ids): multi-byte characters split over byte-level
    tokens are held back until complete (no U+FFFD sent), special tokens skipped; DecodeStream or the window."""
    from potstill.guard.openai_api import Detokenizer
    from tests.tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    text = "Hello wörld 🙂 — naïve café, 日本語 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    detok = Detokenizer(tok)
    if not fast:
        detok.backend = None  # the fallback a slow tokenizer gets
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    assert len(ids) > len(text.encode()) // 2  # the tiny BPE splits the non-ASCII characters into byte tokens
