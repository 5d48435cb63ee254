"""HTTPTeacher against a real uvicorn server on 127.0.0.1 that answers in each real server's shape."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import numpy as np
import pytest

from potstill.errors import PotstillError
from potstill.teachers.base import SamplingParams, load_teacher
from potstill.teachers.http import HTTPTeacher, retry_after_seconds
from tests.http_fixtures import FakeOpenAIServer

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
FAST = {"backoff_base": 0.01, "backoff_max": 0.05}


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    srv = FakeOpenAIServer(tiny_tokenizer).start()
    yield srv
    srv.stop()


@pytest.fixture
def fake(server):
    return server.reset()


@pytest.fixture
def make(fake):
    made = []

    def _make(url=None, **kwargs):
        kwargs.setdefault("model", "fake-model")
        kwargs.setdefault("api_key_env", None)
        t = HTTPTeacher(url or fake.url, **{**FAST, **kwargs})
        made.append(t)
        return t

    yield _make
    for t in made:
        t.close()


def params(k=5, max_new_tokens=32, **kw):
    return SamplingParams(max_new_tokens=max_new_tokens, top_logprobs=k, temperature=0.7, top_p=0.9, **kw)


def check_against_truth(c, truth, k):
    """The parsed completion equals what the server meant to send (top-k padded with (0, -inf))."""
    assert c.completion_ids == truth["ids"]
    assert c.text == truth["text"]
    assert c.finish_reason == truth["finish_reason"]
    t = len(truth["ids"])
    np.testing.assert_allclose(c.sampled_logprob, truth["sampled"], rtol=1e-6)
    assert c.sampled_logprob.dtype == np.float32 and c.sampled_logprob.shape == (t,)
    assert c.topk_ids.shape == (t, k) and c.topk_ids.dtype == np.int64
    assert c.topk_logprobs.shape == (t, k) and c.topk_logprobs.dtype == np.float32
    for i, row in enumerate(truth["topk"]):
        row = sorted(row, key=lambda x: -x[1])[:k]
        ids = [a for a, _ in row] + [0] * (k - len(row))
        lps = [v for _, v in row] + [-math.inf] * (k - len(row))
        assert c.topk_ids[i].tolist() == ids, i
        np.testing.assert_allclose(c.topk_logprobs[i], lps, rtol=1e-5)


# ---- response shapes --------------------------------------------------------------------------------
def test_openai_chat_shape_maps_tokens_through_the_tokenizer(fake, make, tiny_tokenizer):
    # "café" ends in two partial-UTF-8 byte tokens, which OpenAI writes as "bytes:\xc3" + a bytes field
    fake.reset("openai-chat", reply=lambda b: f"Paris is the capital of France, café {b['seed']}.")
    teacher = make(tokenizer=tiny_tokenizer)
    p = params(k=5, stop=["###"])
    outs = teacher.complete([PROMPT, PROMPT, [{"role": "user", "content": "hi"}]], p, seeds=[11, 12, 13])
    for seed, c in zip([11, 12, 13], outs, strict=True):
        check_against_truth(c, fake.truth[seed], 5)
        assert "caf" in c.text
    body = fake.requests[0]["body"]
    assert body["model"] == "fake-model" and body["messages"] in (PROMPT, [{"role": "user", "content": "hi"}])
    assert body["max_tokens"] == 32 and body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["stop"] == ["###"]
    assert sorted(r["body"]["seed"] for r in fake.requests) == [11, 12, 13]
    assert outs[0].prompt_ids == teacher.encode_chat(PROMPT) and outs[0].prompt_ids
    assert teacher.stats["token_map_mismatches"] == 0 and teacher.stats["token_lookups"] > 0
    assert teacher.stats["token_map_mismatch_rate"] == 0.0 and teacher.text_only is False
    assert teacher.stats["tokens"] == sum(len(c.completion_ids) for c in outs)


def test_length_finish_and_cap_on_top_logprobs(fake, make, tiny_tokenizer):
    teacher = make(tokenizer=tiny_tokenizer, max_top_logprobs=3)
    (c,) = teacher.complete([PROMPT], params(k=6, max_new_tokens=4), seeds=[5])
    assert fake.requests[0]["body"]["top_logprobs"] == 3  # min(k, max_top_logprobs)
    assert c.finish_reason == "length" and len(c.completion_ids) == 4
    check_against_truth(c, fake.truth[5], 6)  # [T, k] as asked; the columns the server cannot give are (0, -inf)
    assert np.isneginf(c.topk_logprobs[:, 3:]).all()


@pytest.mark.parametrize("raw_vocab_tokens", [False, True], ids=["decoded-tokens", "vocab-form-tokens"])
def test_openai_completions_shape(fake, make, tiny_tokenizer, raw_vocab_tokens):
    # odd positions: the sampled token is outside the top-k but still in the dict (k + 1 entries)
    fake.reset("openai-completions", raw_vocab_tokens=raw_vocab_tokens)
    teacher = make(tokenizer=tiny_tokenizer, endpoint="completions")
    outs = teacher.complete([PROMPT, PROMPT], params(k=4), seeds=[21, 22])
    for seed, c in zip([21, 22], outs, strict=True):
        check_against_truth(c, fake.truth[seed], 4)
    body = fake.requests[0]["body"]
    assert fake.requests[0]["path"] == "/v1/completions" and "messages" not in body
    assert body["prompt"] == tiny_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert body["logprobs"] == 4  # the completions API takes an int
    assert outs[0].prompt_ids == teacher.encode_chat(PROMPT)
    assert np.isclose(outs[0].sampled_logprob[1], -9.0)  # not in the top-k, yet its own log-prob is kept
    assert teacher.stats["token_map_mismatches"] == 0


def test_vllm_token_id_strings_token_ids_and_eos(fake, make, tiny_tokenizer):
    fake.reset("vllm", include_eos=True)
    extra = {"return_tokens_as_token_ids": True, "return_token_ids": True}
    teacher = make(tokenizer=tiny_tokenizer, extra_body=extra)
    (c,) = teacher.complete([PROMPT], params(k=5), seeds=[31])
    body = fake.requests[0]["body"]
    assert body["return_tokens_as_token_ids"] is True and body["return_token_ids"] is True
    check_against_truth(c, fake.truth[31], 5)  # the trailing EOS the server sent is not part of the completion
    assert c.prompt_ids == [1, 5, 6, 7]  # the server's own prompt ids beat the local template
    assert teacher.stats["token_lookups"] == 0  # every id came from "token_id:N", nothing to map


@pytest.mark.parametrize("eos", [True, "empty"], ids=["eos-as-text", "eos-as-empty-string"])
def test_vllm_trailing_stop_token_is_dropped(fake, make, tiny_tokenizer, eos):
    fake.reset("vllm", include_eos=eos)
    teacher = make(tokenizer=tiny_tokenizer)
    (c,) = teacher.complete([PROMPT], params(k=3, max_new_tokens=64), seeds=[34])
    assert c.finish_reason == "stop" and c.completion_ids == fake.truth[34]["ids"]
    assert tiny_tokenizer.eos_token_id not in c.completion_ids


def test_vllm_token_id_strings_need_no_tokenizer(fake, make):
    fake.reset("vllm")
    teacher = make(extra_body={"return_tokens_as_token_ids": True})
    (c,) = teacher.complete([PROMPT], params(k=3), seeds=[32])
    check_against_truth(c, fake.truth[32], 3)
    assert c.prompt_ids == [] and teacher.text_only is False


def test_vllm_decoded_tokens_map_and_lossy_ones_are_counted(fake, make, tiny_tokenizer):
    # plain vLLM: decoded token text, bytes = that text's UTF-8: alternatives that are partial UTF-8
    # come back as "\ufffd" and cannot be mapped (use return_tokens_as_token_ids to avoid that)
    fake.reset("vllm")
    teacher = make(tokenizer=tiny_tokenizer)
    (c,) = teacher.complete([PROMPT], params(k=5), seeds=[33])
    check_against_truth(c, fake.truth[33], 5)
    assert teacher.stats["token_map_mismatches"] == fake.truth[33]["lost"] > 0


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("post_sampling", [False, True], ids=["logprob", "post_sampling_probs"])
def test_llamacpp_shape_with_ids(fake, make, endpoint, post_sampling):
    fake.reset("llamacpp")
    extra = {"post_sampling_probs": True} if post_sampling else None
    teacher = make(endpoint=endpoint, extra_body=extra)  # no tokenizer: llama.cpp sends ids
    (c,) = teacher.complete([PROMPT], params(k=4), seeds=[41])
    check_against_truth(c, fake.truth[41], 4)
    assert teacher.stats["token_lookups"] == 0


def test_llamacpp_legacy_completion_probabilities(fake, make, tiny_tokenizer):
    fake.reset("llamacpp-legacy")
    teacher = make(tokenizer=tiny_tokenizer, extra_body={"n_probs": 4})
    (c,) = teacher.complete([PROMPT], params(k=4), seeds=[42])
    check_against_truth(c, fake.truth[42], 4)
    assert teacher.stats["token_map_mismatches"] == fake.truth[42]["lost"]


def test_ollama_without_logprobs_is_text_only(fake, make, tiny_tokenizer):
    fake.reset("ollama-no-logprobs")
    teacher = make(tokenizer=tiny_tokenizer)
    (c,) = teacher.complete([PROMPT], params(k=5), seeds=[51])
    assert c.text == fake.truth[51]["text"] and c.finish_reason == "stop"
    assert c.completion_ids == tiny_tokenizer.encode(c.text, add_special_tokens=False)
    assert c.sampled_logprob is None and c.topk_ids is None and c.topk_logprobs is None
    assert teacher.text_only is True and teacher.stats["text_only_completions"] == 1
    assert c.prompt_ids == teacher.encode_chat(PROMPT)


def test_token_strings_without_tokenizer_are_text_only(fake, make, caplog):
    teacher = make()
    with caplog.at_level(logging.WARNING, logger="potstill.teachers.http"):
        (c,) = teacher.complete([PROMPT], params(k=5), seeds=[52])
    assert c.completion_ids == [] and c.topk_ids is None and c.sampled_logprob is None
    assert c.text == fake.truth[52]["text"] and teacher.text_only is True
    assert "tokenizer" in caplog.text


def test_server_without_top_logprobs_is_text_only_but_keeps_sampled(fake, make, tiny_tokenizer):
    fake.reset("openai-chat", max_top=0)  # the server ignores top_logprobs
    teacher = make(tokenizer=tiny_tokenizer)
    (c,) = teacher.complete([PROMPT], params(k=5), seeds=[53])
    assert c.topk_ids is None and c.topk_logprobs is None and teacher.text_only is True
    assert c.completion_ids == fake.truth[53]["ids"]
    np.testing.assert_allclose(c.sampled_logprob, fake.truth[53]["sampled"])
    # k = 0 asked: no top-k is expected, so that is not text-only
    other = make(tokenizer=tiny_tokenizer)
    (c0,) = other.complete([PROMPT], params(k=0), seeds=[54])
    assert c0.topk_ids is None and c0.sampled_logprob is not None and other.text_only is False


@pytest.mark.parametrize("mode", ["openai-chat", "vllm", "openai-completions", "llamacpp-legacy"])
def test_unmappable_topk_entries_are_dropped_and_counted(fake, make, tiny_tokenizer, mode):
    fake.reset(mode, bogus_topk_every=2)
    endpoint = "completions" if mode == "openai-completions" else "chat"
    teacher = make(tokenizer=tiny_tokenizer, endpoint=endpoint, extra_body={"n_probs": 4} if "legacy" in mode else None)
    (c,) = teacher.complete([PROMPT], params(k=4), seeds=[61])
    truth = fake.truth[61]
    check_against_truth(c, truth, 4)  # truth omits the bogus entry: that row is padded with (0, -inf)
    n_bogus = len(range(0, len(truth["ids"]), 2))
    assert teacher.stats["token_map_mismatches"] == truth["lost"] >= n_bogus
    rate = teacher.stats["token_map_mismatch_rate"]
    assert rate == pytest.approx(truth["lost"] / teacher.stats["token_lookups"]) and 0 < rate < 0.5


# ---- retries, errors, limits --------------------------------------------------------------------------
def test_retry_after_is_honoured_then_503_then_ok(fake, make, tiny_tokenizer):
    fake.reset(failures=[(429, {"Retry-After": "1"}), (429, {"Retry-After": "1"}), 503])
    teacher = make(tokenizer=tiny_tokenizer, concurrency=1)
    t0 = time.monotonic()
    (c,) = teacher.complete([PROMPT], params(k=3), seeds=[71])
    elapsed = time.monotonic() - t0
    assert elapsed >= 2.0  # two Retry-After: 1
    gaps = [b["t"] - a["t"] for a, b in zip(fake.requests, fake.requests[1:], strict=False)]
    assert gaps[0] >= 0.99 and gaps[1] >= 0.99 and gaps[2] < 0.5  # the 503 had no Retry-After: short backoff
    assert teacher.stats["retries"] == 3 and teacher.stats["requests"] == 4
    check_against_truth(c, fake.truth[71], 3)


def test_retry_after_header_forms():
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert retry_after_seconds({"Retry-After": "7"}) == 7.0
    assert retry_after_seconds({"Retry-After": "1.5"}) == 1.5
    assert retry_after_seconds({"Retry-After": format_datetime(now + timedelta(seconds=30), usegmt=True)}, now=now) == 30.0
    assert retry_after_seconds({"Retry-After": format_datetime(now - timedelta(seconds=30), usegmt=True)}, now=now) == 0.0
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert retry_after_seconds({"Retry-After": "soon"}) is None and retry_after_seconds({}) is None


def test_timeouts_and_non_json_5xx_are_retried(fake, make):
    fake.reset("llamacpp", failures=[502, ("sleep", 1.0)])
    teacher = make(timeout=0.3, concurrency=1)
    (c,) = teacher.complete([PROMPT], params(k=2), seeds=[72])
    check_against_truth(c, fake.truth[72], 2)
    assert teacher.stats["retries"] == 2 and len(fake.completion_requests) == 3


def test_permanent_failure_gives_up_after_max_retries(fake, make):
    fake.reset(always_status=503)
    teacher = make(max_retries=3)
    with pytest.raises(PotstillError) as err:
        teacher.complete([PROMPT], params(), seeds=[73])
    msg = str(err.value)
    assert fake.url + "/chat/completions" in msg and "HTTP 503" in msg and "4 attempts" in msg
    assert "overloaded" in msg and "\n" not in msg
    assert len(fake.completion_requests) == 4 and teacher.stats["retries"] == 3


def test_other_4xx_fails_at_once_with_the_servers_message(fake, make):
    fake.reset(failures=[400])
    teacher = make(max_retries=5)
    with pytest.raises(PotstillError) as err:
        teacher.complete([PROMPT], params(), seeds=[74])
    assert "HTTP 400" in str(err.value) and "failure 400 on two lines" in str(err.value)
    assert "\n" not in str(err.value)
    assert len(fake.completion_requests) == 1 and teacher.stats["retries"] == 0


def test_connection_errors_are_retried_then_reported(make):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    teacher = make(f"http://127.0.0.1:{port}/v1", max_retries=2)
    with pytest.raises(PotstillError, match=r"gave up after 3 attempts.*ConnectError"):
        teacher.complete([PROMPT], params(), seeds=[75])
    assert teacher.stats["requests"] == 3


def test_concurrency_is_bounded_across_calls_and_threads(fake, make):
    fake.reset("llamacpp", delay=0.4)
    teacher = make(concurrency=3)
    teacher.complete([PROMPT] * 9, params(k=2), seeds=list(range(100, 109)))
    assert fake.max_in_flight == 3
    fake.reset("llamacpp", delay=0.4)
    results = {}

    def run(i):
        results[i] = teacher.complete([PROMPT] * 4, params(k=2), seeds=[200 + 10 * i + j for j in range(4)])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.max_in_flight == 3 and len(fake.completion_requests) == 8  # one bound for the whole teacher
    for i in range(2):
        for j, c in enumerate(results[i]):
            assert c.completion_ids == fake.truth[200 + 10 * i + j]["ids"]  # answers stay in prompt order


def test_client_side_rate_limit(fake, make):
    fake.reset("llamacpp")
    teacher = make(concurrency=8, rate_limit_rps=10)
    teacher.complete([PROMPT] * 6, params(k=1), seeds=list(range(300, 306)))
    arrivals = sorted(r["t"] for r in fake.completion_requests)
    assert arrivals[-1] - arrivals[0] >= 0.45  # 6 requests at 10/s: >= 0.5 s apart end to end


def test_cache_hits_cost_no_request_and_survive_a_restart(fake, make, tiny_tokenizer, tmp_path):
    teacher = make(tokenizer=tiny_tokenizer, cache_dir=tmp_path / "cache")
    prompts = [PROMPT, [{"role": "user", "content": "hi"}]]
    first = teacher.complete(prompts, params(k=3), seeds=[81, 82])
    assert len(fake.completion_requests) == 2 and len(list((tmp_path / "cache").rglob("*.json"))) == 2
    second = teacher.complete(prompts, params(k=3), seeds=[81, 82])
    assert len(fake.completion_requests) == 2 and teacher.stats["cache_hits"] == 2
    for a, b in zip(first, second, strict=True):
        assert a.completion_ids == b.completion_ids and np.array_equal(a.topk_logprobs, b.topk_logprobs)
    resumed = make(tokenizer=tiny_tokenizer, cache_dir=tmp_path / "cache")  # a new process, same cache
    resumed.complete(prompts[:1], params(k=3), seeds=[81])
    assert len(fake.completion_requests) == 2 and resumed.stats["cache_hits"] == 1
    resumed.complete(prompts[:1], params(k=3), seeds=[83])  # another seed is another request
    assert len(fake.completion_requests) == 3
    stored = json.loads(next((tmp_path / "cache").rglob("*.json")).read_text())
    assert set(stored) == {"request", "response"} and "authorization" not in json.dumps(stored).lower()


def test_api_key_sent_as_bearer_and_never_leaked(fake, make, monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("POTSTILL_TEST_KEY", secret)
    fake.reset("llamacpp", api_key=secret)
    teacher = make(api_key_env="POTSTILL_TEST_KEY")
    with caplog.at_level(logging.DEBUG):
        teacher.complete([PROMPT], params(k=1), seeds=[91])
    assert fake.requests[-1]["authorization"] == f"Bearer {secret}"
    assert secret not in repr(teacher) and secret not in json.dumps(teacher.identity())

    fake.reset("llamacpp", api_key="sk-the-right-one")  # it echoes the key it got, as OpenAI does
    with caplog.at_level(logging.DEBUG), pytest.raises(PotstillError) as err:
        teacher.complete([PROMPT], params(k=1), seeds=[92])
    assert "HTTP 401" in str(err.value) and "Incorrect API key provided" in str(err.value)
    assert secret not in str(err.value) and "***" in str(err.value)
    assert secret not in caplog.text


def test_identity_and_model_discovery(fake, make, tiny_tokenizer):
    from potstill.teachers.hf import tokenizer_hash

    fake.reset(models=("served-model",))
    teacher = make(f"http://user:hunter2@127.0.0.1:{fake.port}/v1?api-key=hunter2", model=None, tokenizer=tiny_tokenizer)
    ident = teacher.identity()
    assert ident["name"] == "served-model" and ident["backend"] == "http" and ident["weights_sha256"] is None
    assert ident["base_url"] == fake.url and "hunter2" not in json.dumps(ident)
    assert ident["tokenizer_sha256"] == tokenizer_hash(tiny_tokenizer) and ident["vocab_size"] == len(tiny_tokenizer)
    teacher.complete([PROMPT], params(k=1), seeds=[93])
    assert fake.completion_requests[-1]["body"]["model"] == "served-model"

    fake.reset(models=("a", "b"))
    with pytest.raises(PotstillError, match="pass model="):
        make(model=None).complete([PROMPT], params(k=1), seeds=[94])
    plain = make(fake.url + "/chat/completions")  # a full endpoint URL works too
    assert plain.identity()["tokenizer_sha256"] is None and plain.endpoint == "chat"


def test_sync_api_from_threads_and_inside_a_running_loop(fake, make, tiny_tokenizer):
    fake.reset("llamacpp")
    teacher = make()
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("c", teacher.complete([PROMPT], params(k=2), seeds=[95])))
    th.start()
    th.join()
    assert out["c"][0].completion_ids == fake.truth[95]["ids"]

    async def inside():
        sync = teacher.complete([PROMPT], params(k=2), seeds=[96])  # blocks this loop, does not deadlock
        asynchronous = await teacher.acomplete([PROMPT], params(k=2), seeds=[97])
        return sync[0], asynchronous[0]

    a, b = asyncio.run(inside())
    assert a.completion_ids == fake.truth[96]["ids"] and b.completion_ids == fake.truth[97]["ids"]


def test_load_teacher_routes_urls_and_default_seeds(fake, tiny_tokenizer):
    teacher = load_teacher(fake.url, model="fake-model", tokenizer=tiny_tokenizer, api_key_env=None)
    try:
        assert isinstance(teacher, HTTPTeacher)
        outs = teacher.complete([PROMPT, PROMPT], params(k=2))
        seeds = [r["body"]["seed"] for r in fake.completion_requests]
        assert len(set(seeds)) == 2 and all(0 <= s < 2**31 for s in seeds)
        assert outs[0].completion_ids != outs[1].completion_ids or seeds[0] == seeds[1]
    finally:
        teacher.close()
