"""A small, configurable fake OpenAI-compatible server for the HTTP teacher's tests.

It is a real uvicorn server on 127.0.0.1 (random port, in a daemon thread) that answers
`POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models` with the response shapes of
the real servers, which cannot run here:

    mode                  shape
    openai-chat           choices[0].logprobs.content[i] = {token, logprob, bytes, top_logprobs: [...]};
                          partial UTF-8 tokens written "bytes:\\xc3" as OpenAI does
    openai-completions    choices[0].logprobs = {tokens, token_logprobs, top_logprobs: [{tok: lp}], text_offset};
                          the sampled token is in the dict even when it is not in the top-k (k+1 entries)
    vllm                  chat shape; "token_id:N" strings with return_tokens_as_token_ids, `token_ids` and
                          `prompt_token_ids` with return_token_ids, EOS token included when include_eos
    llamacpp              chat shape with `id` on every entry (b4380+); `prob`/`top_probs` with post_sampling_probs
    llamacpp-legacy       no choice logprobs; top-level completion_probabilities = [{content, probs: [{tok_str, prob}]}]
    ollama-no-logprobs    chat shape without any logprobs (Ollama before 0.12.11)

Completions are deterministic: the reply text is `reply(body)` (default: a sentence naming the
request's seed), tokenised with the given tokenizer; `truth[seed]` records the ids, sampled log-probs
and the top-k entries a correct client can recover, and `lost`, how many it cannot (the bogus
entries, and in the lossy modes the partial-UTF-8 tokens that were sent decoded as "\ufffd").
Failures are scheduled by request arrival order: `failures=[(429, {"Retry-After": "1"}), 503,
("sleep", 1.0), ...]`, or `always_status=503`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

BOGUS = "\u2603not-a-token\u2603"


def _byte_decoder() -> dict[str, int]:
    from potstill.utils import bytes_to_unicode as _bytes_to_unicode

    return {c: b for b, c in _bytes_to_unicode().items()}


class FakeOpenAIServer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.special = set(tokenizer.all_special_ids)
        self.byte_decoder = _byte_decoder()
        self.app = self._build_app()
        self.server = None
        self.thread = None
        self.port = None
        self.reset()

    # ---- configuration --------------------------------------------------------------------------
    def reset(
        self,
        mode: str = "openai-chat",
        *,
        failures: list | tuple = (),
        always_status: int | None = None,
        delay: float = 0.0,
        api_key: str | None = None,
        max_top: int | None = None,
        reply: Callable[[dict], str] | None = None,
        models: tuple[str, ...] = ("fake-model",),
        bogus_topk_every: int = 0,
        include_eos: bool | str = False,
        raw_vocab_tokens: bool = False,
    ) -> FakeOpenAIServer:
        # a previous test's request still being answered (its client gave up) would skew the in-flight count
        deadline = time.monotonic() + 15
        while getattr(self, "in_flight", 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.mode = mode
        self.failures = list(failures)
        self.always_status = always_status
        self.delay = delay
        self.api_key = api_key
        self.max_top = max_top
        self.reply = reply or (lambda body: f"The capital of France is Paris, number {body.get('seed', 0) % 1000}.")
        self.models = models
        self.bogus_topk_every = bogus_topk_every
        self.include_eos = include_eos
        self.raw_vocab_tokens = raw_vocab_tokens
        self.requests: list[dict[str, Any]] = []
        self.truth: dict[int, dict[str, Any]] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def completion_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("completions")]

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> FakeOpenAIServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)

    # ---- the app ----------------------------------------------------------------------------------
    def _build_app(self):
        app = FastAPI()

        def error(status: int, message: str, headers: dict | None = None):
            if status == 502:  # a proxy in front of the server: not JSON
                return PlainTextResponse("<html>502 Bad Gateway</html>", status_code=status, headers=headers)
            kind = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
            return JSONResponse(body, status_code=status, headers=headers)

        async def handle(request: Request, kind: str):
            body = await request.json()
            n = len(self.requests)
            self.requests.append(
                {"path": request.url.path, "body": body, "authorization": request.headers.get("authorization"), "t": time.monotonic()}
            )
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                    provided = (request.headers.get("authorization") or "").removeprefix("Bearer ")
                    return error(401, f"Incorrect API key provided: {provided}. You can find your API key at https://example.invalid.")
                if n < len(self.failures):
                    f = self.failures[n]
                    if isinstance(f, tuple) and f[0] == "sleep":
                        await asyncio.sleep(f[1])
                    elif f is not None:
                        status, headers = (f, None) if isinstance(f, int) else f
                        message = "Rate limit reached, retry later" if status == 429 else f"failure {status}\non two lines"
                        return error(status, message, headers)
                if self.always_status:
                    return error(self.always_status, "the server is overloaded")
                return JSONResponse(self.respond(kind, body))
            finally:
                self.in_flight -= 1

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await handle(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, "completions")

        @app.get("/v1/models")
        async def models(request: Request):
            self.requests.append({"path": request.url.path, "body": None, "authorization": request.headers.get("authorization"), "t": time.monotonic()})
            return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]}

        return app

    # ---- token forms --------------------------------------------------------------------------------
    def true_bytes(self, tid: int) -> bytes:
        form = self.tokenizer.convert_ids_to_tokens(tid)
        if tid in self.special:
            return form.encode()
        return bytes(self.byte_decoder[c] for c in form)

    def clean(self, tid: int) -> bool:
        """Whether the token is valid UTF-8 on its own (else decoding it alone loses its bytes)."""
        try:
            self.true_bytes(tid).decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def decoded(self, tid: int) -> str:
        """What vLLM/llama.cpp send as the token: the token decoded on its own (lossy for partial UTF-8)."""
        return self.tokenizer.decode([tid])

    def openai_token(self, tid: int) -> str:
        raw = self.true_bytes(tid)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    # ---- completions ----------------------------------------------------------------------------------
    def _alternatives(self, s: int, n: int) -> list[int]:
        out, j = [], 1
        while len(out) < n:
            c = (s * 7 + 13 * j) % self.vocab_size
            j += 1
            if c != s and c not in out:
                out.append(c)
        return out

    def respond(self, kind: str, body: dict) -> dict:
        mode = self.mode
        text = self.reply(body)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = int(body.get("max_tokens") or 16)
        finish = "length" if len(ids) > max_tokens else "stop"
        ids = ids[:max_tokens]
        text = self.tokenizer.decode(ids)
        if kind == "chat":
            k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
        else:
            k = body.get("logprobs")
            k = None if k is None else int(k)
        if mode == "llamacpp-legacy":
            k = body.get("n_probs")
        if mode == "ollama-no-logprobs":
            k = None
        kk = None if k is None else (min(k, self.max_top) if self.max_top is not None else k)
        seq = list(ids) + ([self.tokenizer.eos_token_id] if self.include_eos and finish == "stop" else [])

        # per position: the sampled id and its log-prob, the top-k (id, log-prob) the server reports
        positions = []
        truth = {"ids": list(ids), "sampled": [], "topk": [], "finish_reason": finish, "text": text, "lost": 0}
        lossy = (mode == "vllm" and not body.get("return_tokens_as_token_ids")) or mode == "llamacpp-legacy"
        for t, s in enumerate(seq):
            outside = kind == "completions" and mode == "openai-completions" and t % 2 == 1
            alts = self._alternatives(s, kk or 0)
            if outside:  # the sampled token is not among the top-k; the dict still lists it
                top = [(a, -0.2 - r) for r, a in enumerate(alts)]
                sampled_lp = -9.0
            else:
                top = ([(s, -0.2)] + [(a, -1.2 - r) for r, a in enumerate(alts)])[: kk or 0]
                sampled_lp = -0.2
            bogus = (
                bool(self.bogus_topk_every) and t % self.bogus_topk_every == 0 and len(top) > 1 and mode != "llamacpp"
            )
            positions.append((s, sampled_lp, top, bogus))
            if t < len(ids):
                kept = top[:-1] if bogus else top
                lost = int(bogus)
                if lossy:  # partial UTF-8 tokens decode to "\ufffd": no client can map them back
                    clean = [(a, v) for a, v in kept if self.clean(a)]
                    lost += len(kept) - len(clean)
                    kept = clean
                truth["sampled"].append(sampled_lp)
                truth["topk"].append(kept)
                truth["lost"] += lost
        self.truth[int(body.get("seed", 0))] = truth

        created = int(time.time())
        if kind == "chat" or mode in ("llamacpp", "llamacpp-legacy"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
        resp: dict[str, Any] = {
            "id": f"cmpl-{len(self.requests)}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created,
            "model": body.get("model", "gpt-3.5-turbo"),
            "choices": [choice],
            "usage": {"prompt_tokens": 7, "completion_tokens": len(ids), "total_tokens": 7 + len(ids)},
        }
        if kk is None:
            if mode == "ollama-no-logprobs":
                resp["system_fingerprint"] = "fp_ollama"
            elif mode != "llamacpp-legacy":
                choice["logprobs"] = None
            return resp

        if mode in ("openai-chat", "vllm", "llamacpp") and (kind == "chat" or mode == "llamacpp"):
            choice["logprobs"] = {"content": [self._content_entry(s, lp, top, bogus, body) for s, lp, top, bogus in positions]}
            if kind == "chat":
                choice["logprobs"]["refusal"] = None
            if mode == "vllm":
                choice["stop_reason"] = None
                resp["prompt_logprobs"] = None
                if body.get("return_token_ids"):
                    choice["token_ids"] = seq
                    resp["prompt_token_ids"] = [1, 5, 6, 7]
            if mode == "llamacpp":
                resp["system_fingerprint"] = "b5000-deadbeef"
                resp["timings"] = {"prompt_n": 7, "predicted_n": len(seq)}
        elif mode == "llamacpp-legacy":
            choice["logprobs"] = None
            resp["completion_probabilities"] = [
                {
                    "content": self.decoded(s),
                    "probs": [{"tok_str": BOGUS if bogus and i == len(top) - 1 else self.decoded(a), "prob": _exp(v)} for i, (a, v) in enumerate(top)],
                }
                for s, _, top, bogus in positions
            ]
        else:  # completions (OpenAI legacy / vLLM)
            tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
            for s, lp, top, bogus in positions:
                tok = self.tokenizer.convert_ids_to_tokens(s) if self.raw_vocab_tokens else self.openai_token(s)
                entries = {}
                for i, (a, v) in enumerate(top):
                    name = self.tokenizer.convert_ids_to_tokens(a) if self.raw_vocab_tokens else self.openai_token(a)
                    entries[BOGUS if bogus and i == len(top) - 1 else name] = v
                entries.setdefault(tok, lp)
                tokens.append(tok)
                token_lps.append(lp)
                tops.append(entries)
                offsets.append(offset)
                offset += len(tok)
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
        return resp

    def _content_entry(self, s: int, lp: float, top: list, bogus: bool, body: dict) -> dict:
        mode = self.mode

        def one(tid: int, logprob: float, fake: bool = False) -> dict:
            if mode == "vllm":
                token = f"token_id:{tid}" if body.get("return_tokens_as_token_ids") else self.decoded(tid)
                if self.include_eos == "empty" and tid == self.tokenizer.eos_token_id and not fake:
                    token = ""  # older vLLM: special tokens decoded with skip_special_tokens
                if fake:
                    token = BOGUS
                return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
            if mode == "llamacpp":
                entry = {"id": tid, "token": self.decoded(tid), "bytes": list(self.true_bytes(tid))}
                if body.get("post_sampling_probs"):
                    entry["prob"] = _exp(logprob)
                else:
                    entry["logprob"] = logprob
                return entry
            if fake:
                return {"token": BOGUS, "logprob": logprob, "bytes": list(BOGUS.encode())}
            return {"token": self.openai_token(tid), "logprob": logprob, "bytes": list(self.true_bytes(tid))}

        entry = one(s, lp)
        alts = [one(a, v, fake=bogus and i == len(top) - 1) for i, (a, v) in enumerate(top)]
        entry["top_probs" if mode == "llamacpp" and body.get("post_sampling_probs") else "top_logprobs"] = alts
        return entry


def _exp(x: float) -> float:
    import math

    return math.exp(x)
