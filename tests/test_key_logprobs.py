"""Log-probs only for trusted keys (issue 14, attack 7's API policy), over real HTTP on 127.0.0.1.

Attack first: a key created without a log-prob allowance (new keys are text only) asks the served
API for log-probs in every form OpenAI has (chat `logprobs`/`top_logprobs`, completions `logprobs`,
streamed or not) and, through the gateway, in llama.cpp's own `n_probs`. Each is answered 403 in
OpenAI's shape before any work: never charged, logged once, and the gateway's upstream is never
asked. A trusted key gets up to its N; a key made before the allowance existed keeps the server's cap.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from potstill.guard.querylog import read_log
from potstill.guard.ratelimit import RateLimiter
from tests.fake_llamacpp import fake_llamacpp
from tests.guard_fixtures import live_gateway, live_server, one_torch_thread, tiny_teacher

CHAT = [{"role": "user", "content": "Name two animals"}]
TPM = 1_000_000
ASKS = {  # every way OpenAI's API asks for log-probs: (path, body)
    "chat-top": ("/chat/completions", {"messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 5}),
    "chat-sampled": ("/chat/completions", {"messages": CHAT, "max_tokens": 3, "logprobs": True}),
    "completions-top": ("/completions", {"prompt": "Once upon a time", "max_tokens": 3, "logprobs": 5}),
    "completions-sampled": ("/completions", {"prompt": "Once upon a time", "max_tokens": 3, "logprobs": 0}),
}


def _limited(srv, limiter: RateLimiter):
    srv.limiter = limiter
    return srv


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    limiter = RateLimiter(rpm=None, tpm=TPM, clock=lambda: 0.0)  # frozen clock: a bucket's level is exact
    with one_torch_thread(), live_server(tiny_teacher(), tmp_path_factory.mktemp("keylp"), limiter=limiter,
                                         max_tokens_cap=16) as srv:
        yield _limited(srv, limiter)


@pytest.fixture
def gateway(tmp_path):
    limiter = RateLimiter(rpm=None, tpm=TPM, clock=lambda: 0.0)
    with fake_llamacpp() as up, live_gateway(up.url + "/v1", tmp_path, limiter=limiter, max_tokens_cap=16) as gw:
        gw.upstream = up
        yield _limited(gw, limiter)


def post(srv, path: str, body: dict, secret: str) -> httpx.Response:
    return httpx.post(srv.base + path, json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=60)


def rows_of(srv, key_id: str, n: int, timeout: float = 10.0) -> list[dict]:
    """The key's log rows, once there are `n` (the row is written just after the response goes out)."""
    deadline = time.time() + timeout
    while True:
        srv.flush()
        rows = [r for r in read_log(srv.querylog_url) if r["key_id"] == key_id]
        if len(rows) >= n or time.time() > deadline:
            return rows
        time.sleep(0.05)


def assert_refused(srv, key_id: str, responses: list[httpx.Response], allowance: str) -> None:
    """Each response a 403 naming the allowance; the key never charged; one 403 log row per request."""
    for r in responses:
        assert r.status_code == 403, f"{r.status_code}: {r.text[:300]}"
        err = r.json()["error"]
        assert err["code"] == "logprobs_not_allowed" and allowance in err["message"], err
        assert err["param"] in ("logprobs", "top_logprobs", "n_probs") and err["type"] == "invalid_request_error"
    assert srv.limiter.level(key_id) is None  # refused before the limiter, so before any tokenising or decoding
    rows = rows_of(srv, key_id, len(responses))
    assert len(rows) == len(responses), rows
    assert all(r["status"] == 403 and r["error_type"] == "logprobs_not_allowed" and r["tokens_in"] is None
               and r["tokens_out"] is None and r["completion"] is None for r in rows), rows


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("ask", list(ASKS))
def test_text_only_key_reads_no_logprobs(served, ask, stream):
    """Attack: a key that was never granted log-probs asks for them (served 200 with them before)."""
    key_id, secret = served.keys.create(f"reader-{ask}-{stream}")  # a new key: text only by default
    path, body = ASKS[ask]
    assert_refused(served, key_id, [post(served, path, {**body, "stream": stream}, secret)], "text only")


def test_text_only_key_still_gets_text(served):
    key_id, secret = served.keys.create("writer")
    r = post(served, "/chat/completions", {"messages": CHAT, "max_tokens": 3, "top_logprobs": 0}, secret)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text[:300]
    assert served.limiter.level(key_id) < TPM  # charged as usual


def test_trusted_key_gets_its_allowance_and_no_more(served):
    key_id, secret = served.keys.create("trusted", max_top_logprobs=2)
    r = post(served, "/completions", {"prompt": "Once upon a time", "max_tokens": 3, "logprobs": 2}, secret)
    assert r.status_code == 200, r.text[:300]
    tops = [len(t) for t in r.json()["choices"][0]["logprobs"]["top_logprobs"]]  # {text: lp}: texts may collide
    assert tops and max(tops) == 2, r.text[:300]
    body = {"messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "stream": True}
    with httpx.stream("POST", served.base + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {secret}"}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    tops = [len(c["top_logprobs"]) for e in events if e["choices"] and e["choices"][0]["logprobs"]
            for c in e["choices"][0]["logprobs"]["content"]]
    assert s.status_code == 200 and tops and set(tops) == {2}, events
    rows_of(served, key_id, 2)  # both settled (a stream settles just after its last event)
    charged = served.limiter.level(key_id)
    over = post(served, "/chat/completions", {**body, "top_logprobs": 3, "stream": False}, secret)
    assert over.status_code == 403 and "at most 2 top log-probs" in over.json()["error"]["message"], over.text
    assert served.limiter.level(key_id) == charged  # the refused request cost nothing
    served.keys.set_max_top_logprobs(key_id, 0)  # withdrawn: the next request is text only
    again = post(served, "/completions", {"prompt": "Once", "max_tokens": 3, "logprobs": 1}, secret)
    assert again.status_code == 403 and "text only" in again.json()["error"]["message"]


def test_gateway_never_asks_the_upstream_for_a_text_only_keys_logprobs(gateway):
    """Attack through `serve --upstream`: OpenAI's fields and llama.cpp's own `n_probs`, streamed or not."""
    key_id, secret = gateway.keys.create("reader")
    asks = [ASKS["chat-top"][1] | {"stream": True}, ASKS["completions-sampled"][1],
            {"prompt": "Once upon a time", "max_tokens": 3, "n_probs": 5}]
    responses = [post(gateway, "/chat/completions" if "messages" in b else "/completions", b, secret) for b in asks]
    assert_refused(gateway, key_id, responses, "text only")
    assert gateway.upstream.requests == []  # nothing reached the model server
    _, trusted = gateway.keys.create("trusted", max_top_logprobs=2)
    ok = post(gateway, "/chat/completions", {"messages": CHAT, "max_tokens": 3, "logprobs": True,
                                             "top_logprobs": 2}, trusted)
    assert ok.status_code == 200 and gateway.upstream.requests[-1]["body"]["top_logprobs"] == 2, ok.text[:300]
    over = post(gateway, "/completions", {"prompt": "Once", "max_tokens": 3, "n_probs": 3}, trusted)
    assert over.status_code == 403 and over.json()["error"]["param"] == "n_probs"
    assert len(gateway.upstream.requests) == 1
