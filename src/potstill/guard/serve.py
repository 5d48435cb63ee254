"""OpenAI-compatible server for a local teacher: API keys, rate limits, watermark, query log, batching.

    from potstill.guard.serve import ServeConfig, serve
    serve("embedded", ServeConfig(port=8000))       # `potstill serve embedded --port 8000`

Endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`. The official
`openai` client works unchanged (streaming, `logprobs`/`top_logprobs`, `seed`, `stop`).

A request passes, in order: `GuardMiddleware` (body over `max_body_bytes` -> 413; bearer key
missing/unknown/revoked -> 401; exactly one query-log row per request, whatever the outcome),
pydantic validation (-> 400 naming the field), server caps (`n`, `max_tokens`, context
length -> 400), the key's rate limits (-> 429 with `Retry-After`), then the `Batcher`: it
collects concurrent requests for `batch_window_ms` (and while a batch is decoding), groups
those with compatible sampling params and decodes each group with one `complete_ids` call in
a worker thread, so the event loop stays free. Each row samples from its own seed, so a
completion does not depend on which batch it joined. The watermark (when configured) is the
logits processor of every batch: it shapes both the sampled tokens and the returned log-probs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from potstill.errors import PotstillError
from potstill.guard.keys import KeyStore
from potstill.guard.querylog import QueryLog
from potstill.guard.ratelimit import DEFAULT_RPM, DEFAULT_TPM, RateLimited, RateLimiter
from potstill.teachers.base import Completion, SamplingParams
from potstill.utils import potstill_home

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """How `potstill serve` runs. URLs may also be plain SQLite file paths."""

    host: str = "127.0.0.1"
    """Interface to bind (0.0.0.0 to accept connections from other machines)."""
    port: int = 8000
    """TCP port."""
    keys_url: str | None = None
    """API-key store (SQLAlchemy URL or SQLite path); None -> $POTSTILL_HOME/guard/keys.db."""
    querylog_url: str | None = None
    """Query log (SQLAlchemy URL or SQLite path, WAL); None -> $POTSTILL_HOME/guard/queries.db."""
    watermark: Any = field(default=None, repr=False)
    """A `guard.watermark.WatermarkConfig`, or None for no watermark (off unless a key is given)."""
    max_tokens_cap: int = 1024
    """Largest `max_tokens` a request may ask for (400 above it)."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes (413 above it, by Content-Length or by the bytes received)."""
    default_rpm: int | None = DEFAULT_RPM
    """Requests per minute for keys without their own limit (None = unlimited)."""
    default_tpm: int | None = DEFAULT_TPM
    """Tokens (prompt + max_tokens) per minute for keys without their own limit (None = unlimited)."""
    model_name: str | None = None
    """Model id reported by /v1/models and in responses; None -> the teacher's name."""
    batch_window_ms: float = 5.0
    """How long the batcher waits for more requests before decoding a batch."""
    max_batch_size: int = 32
    """Most requests decoded together."""
    max_batch_tokens: int = 65_536
    """Most prompt + max_tokens tokens in one batch (bounds KV-cache memory)."""
    max_top_logprobs: int = 20
    """Largest `top_logprobs` (chat) / `logprobs` (completions) a request may ask for."""

    def __post_init__(self) -> None:
        home = potstill_home() / "guard"
        self.keys_url = self.keys_url or str(home / "keys.db")
        self.querylog_url = self.querylog_url or str(home / "queries.db")
        for name in ("max_tokens_cap", "max_body_bytes", "max_batch_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise PotstillError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise PotstillError(f"port must be 0-65535, got {self.port}")
        if self.batch_window_ms < 0:
            raise PotstillError("batch_window_ms must be >= 0")
        for name in ("default_rpm", "default_tpm"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PotstillError(f"{name} must be >= 1 or None (unlimited)")

    def public_dict(self) -> dict[str, Any]:
        """The config without secrets (the watermark key never appears)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "watermark"}
        out["watermark"] = self.watermark.public_dict() if self.watermark is not None else None
        return out


# ---- request models ---------------------------------------------------------------------------
Stop = Annotated[str, StringConstraints(max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool | None = False


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # JSON types as the schema says

    model: str | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=2**31)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # JSON types as the schema says

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Base):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=1000)


class CompletionRequest(_Base):
    """POST /v1/completions (one prompt: a string or a list of token ids)."""

    prompt: str | list[Annotated[int, Field(ge=0, le=2**31)]] | list[str] | list[list[Annotated[int, Field(ge=0, le=2**31)]]]
    logprobs: int | None = Field(None, ge=0, le=1000)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    @property
    def log_type(self) -> str:
        return self.code or self.type


_ERROR_SCHEMA = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "object"}}}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "JSON, or SSE when stream=true"},
    **{s: {"description": d, "content": _ERROR_SCHEMA} for s, d in [
        (400, "Invalid request"), (401, "Missing, unknown or revoked API key"), (413, "Body too large"),
        (429, "Rate limit reached (see Retry-After)"),
    ]},
}


# ---- token text for log-probs -----------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: printable char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenText:
    """The bytes and display string of each token id (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = decoder is not None and "ByteLevel" in type(decoder).__name__
        self.byte_decoder = _byte_decoder()
        self._cache: dict[int, bytes] = {}

    def bytes(self, tid: int) -> bytes:
        b = self._cache.get(tid)
        if b is None:
            b = self._cache[tid] = self._bytes(int(tid))
        return b

    def _bytes(self, tid: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(tid)
        if isinstance(piece, str):
            if self.byte_level and all(c in self.byte_decoder for c in piece):
                return bytes(self.byte_decoder[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            if not self.byte_level:
                return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([tid]).encode()

    def text(self, tid: int) -> str:
        return self.bytes(tid).decode("utf-8", errors="replace")


def _lp(x: float) -> float:
    """A JSON-safe log-prob (OpenAI reports -9999.0 for impossible tokens)."""
    x = float(x)
    return x if math.isfinite(x) and x > -9999.0 else -9999.0


# ---- incremental detokenizer (streaming) -------------------------------------------------------
class Detokenizer:
    """Text deltas from a growing id list, decoding only a short window (vLLM-style offsets)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, new: list[int]) -> str:
        self.ids.extend(new)
        dec = self.tokenizer.decode
        prefix_text = dec(self.ids[self.prefix : self.read], skip_special_tokens=True)
        new_text = dec(self.ids[self.prefix :], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


def safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` that can be sent: before any stop string and any partial stop suffix."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                cut = min(cut, len(text) - k)
                break
    return text[:cut]


# ---- batcher ----------------------------------------------------------------------------------
_DONE = object()


@dataclass(eq=False)
class Job:
    """One admitted request waiting for (or in) a batch."""

    prompt_ids: list[int]
    max_tokens: int
    top_k: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int
    future: asyncio.Future
    tokens: asyncio.Queue | None = None  # streaming: lists of new token ids, then _DONE
    abandoned: bool = False
    submitted: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> tuple:
        # rows share one SamplingParams; max_tokens may differ (rows are cut to their own
        # length afterwards) except with stop strings, whose trimming cannot be undone.
        return (self.temperature, self.top_p, self.stop, self.max_tokens if self.stop else None)


class _Tap:
    """Logits processor wrapper that sees each row's tokens as they are generated.

    complete_ids passes one context list object per row (prompt + tokens so far) at every step;
    the first time a list is seen it is matched to the first unmatched job with that prompt
    (rows enter in order), then by identity. It streams new tokens to the event loop and records
    which rows ran past their own max_tokens (-> finish_reason "length").
    """

    def __init__(self, jobs: list[Job], inner, loop: asyncio.AbstractEventLoop):
        self.jobs, self.inner, self.loop = jobs, inner, loop
        self.rows: dict[int, int] = {}
        self.unmatched = list(range(len(jobs)))
        self.sent = [len(j.prompt_ids) for j in jobs]
        self.reached = [False] * len(jobs)

    def _row(self, ctx: list[int]) -> int | None:
        b = self.rows.get(id(ctx))
        if b is None:
            for j, cand in enumerate(self.unmatched):
                p = self.jobs[cand].prompt_ids
                if len(ctx) >= len(p) and ctx[: len(p)] == p:
                    b = self.rows[id(ctx)] = self.unmatched.pop(j)
                    break
        return b

    def __call__(self, contexts, logits):
        for ctx in contexts:
            b = self._row(ctx)
            if b is None:
                continue
            job = self.jobs[b]
            end = len(job.prompt_ids) + job.max_tokens
            if len(ctx) >= end:
                self.reached[b] = True
            if job.tokens is not None and self.sent[b] < min(len(ctx), end):
                new = ctx[self.sent[b] : min(len(ctx), end)]
                self.sent[b] += len(new)
                self.loop.call_soon_threadsafe(job.tokens.put_nowait, new)
        return logits if self.inner is None else self.inner(contexts, logits)


class Batcher:
    """Collects concurrent jobs and decodes compatible ones together in one worker thread."""

    def __init__(self, teacher, cfg: ServeConfig, processor=None):
        self.teacher, self.cfg, self.processor = teacher, cfg, processor
        self.pending: deque[Job] = deque()
        self.stats = {"batches": 0, "rows": 0, "max_rows": 0}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="potstill-decode")

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self.pending:
            self._finish(job, error=APIError(503, "server shutting down", "server_error"))
        self.pending.clear()
        self._executor.shutdown(wait=True)

    async def submit(self, job: Job) -> None:
        self.start()
        self.pending.append(job)
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            wait = self.cfg.batch_window_ms / 1000 - (time.monotonic() - self.pending[0].submitted)
            if wait > 0 and len(self.pending) < self.cfg.max_batch_size:
                await asyncio.sleep(wait)
            batch = self._take()
            if not batch:
                continue
            self.stats["batches"] += 1
            self.stats["rows"] += len(batch)
            self.stats["max_rows"] = max(self.stats["max_rows"], len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._decode, batch, loop)
            except Exception as err:  # a decoding failure fails this batch, not the server
                log.exception("decode failed for a batch of %d", len(batch))
                for job in batch:
                    self._finish(job, error=APIError(500, f"decoding failed: {type(err).__name__}", "server_error"))
                continue
            for job, res in zip(batch, results, strict=True):
                self._finish(job, result=res)

    def _take(self) -> list[Job]:
        live = [j for j in self.pending if not (j.abandoned or j.future.cancelled())]
        if not live:
            self.pending.clear()
            return []
        key = live[0].group
        batch, rest, budget = [], deque(), 0
        for j in live:
            cost = len(j.prompt_ids) + j.max_tokens
            fits = not batch or (len(batch) < self.cfg.max_batch_size and budget + cost <= self.cfg.max_batch_tokens)
            if j.group == key and fits:
                batch.append(j)
                budget += cost
            else:
                rest.append(j)
        self.pending = rest
        return batch

    def _decode(self, batch: list[Job], loop) -> list[Completion]:
        first = batch[0]
        params = SamplingParams(
            max_new_tokens=max(j.max_tokens for j in batch),
            temperature=first.temperature,
            top_p=first.top_p,
            top_logprobs=max(j.top_k for j in batch),
            stop=list(first.stop),
        )
        tap = _Tap(batch, self.processor, loop)
        outs = self.teacher.complete_ids(
            [j.prompt_ids for j in batch], params, seeds=[j.seed for j in batch], logits_processor=tap
        )
        return [self._fit(o, j, tap.reached[b]) for b, (o, j) in enumerate(zip(outs, batch, strict=True))]

    def _fit(self, c: Completion, job: Job, reached: bool) -> Completion:
        """Cut a row decoded under the batch's params down to its own max_tokens and top-k."""
        ids, text, finish = c.completion_ids, c.text, c.finish_reason
        if reached and not job.stop:
            finish = "length"
            if len(ids) > job.max_tokens:
                ids = ids[: job.max_tokens]
                text = self.teacher.tokenizer.decode(ids, skip_special_tokens=True)
        t, k = len(ids), job.top_k
        return Completion(
            prompt_ids=c.prompt_ids,
            completion_ids=ids,
            text=text,
            finish_reason=finish,
            sampled_logprob=None if c.sampled_logprob is None else c.sampled_logprob[:t],
            topk_ids=c.topk_ids[:t, :k] if k and c.topk_ids is not None else None,
            topk_logprobs=c.topk_logprobs[:t, :k] if k and c.topk_logprobs is not None else None,
        )

    @staticmethod
    def _finish(job: Job, result: Completion | None = None, error: Exception | None = None) -> None:
        if not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        if job.tokens is not None:
            job.tokens.put_nowait(_DONE)


# ---- middleware: body cap, auth, query log ----------------------------------------------------
class GuardMiddleware:
    """Pure ASGI middleware: 413 / 401 before the app runs; one query-log row per request."""

    def __init__(self, app, cfg: ServeConfig, keys: KeyStore, querylog: QueryLog):
        self.app, self.cfg, self.keys, self.querylog = app, cfg, keys, querylog

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"ts": time.time(), "method": scope["method"], "endpoint": scope["path"][:256]}
        scope.setdefault("state", {})["qlog"] = row
        started = False

        async def send_logged(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                row["status"] = msg["status"]
            await send(msg)

        try:
            early, body = await self._screen(scope, receive, row)
            if early is not None:
                row["error_type"] = early.log_type
                await early.response()(scope, receive, send_logged)
                return
            if body is None:  # client went away while sending the body
                row.setdefault("status", 499)
                row["error_type"] = "client_closed"
                return
            delivered = False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_logged)
        except Exception as err:
            log.exception("unhandled %s on %s %s", type(err).__name__, scope["method"], scope["path"][:256])
            row["error_type"] = "server_error"
            if started:
                raise
            await APIError(500, "internal server error", "server_error").response()(scope, receive, send_logged)
        finally:
            row.setdefault("status", 499)
            row["latency_ms"] = (time.perf_counter() - t0) * 1000
            self.querylog.record(row)

    async def _screen(self, scope, receive, row) -> tuple[APIError | None, bytes | None]:
        limit = self.cfg.max_body_bytes
        headers = dict(scope.get("headers") or [])
        too_big = APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    return too_big, b""
            except ValueError:
                return APIError(400, "invalid Content-Length header"), b""
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None, None
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > limit:
                return too_big, b""
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        if scope["path"].startswith("/v1/"):
            err = await self._authenticate(scope, headers, row)
            if err is not None:
                return err, b""
        return None, b"".join(chunks)

    async def _authenticate(self, scope, headers, row) -> APIError | None:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, secret = auth.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        record = await anyio.to_thread.run_sync(self.keys.verify, secret)
        if record is None:
            return APIError(401, "Invalid or revoked API key.", code="invalid_api_key")
        scope["state"]["key"] = record
        row["key_id"] = record.key_id
        return None


# ---- the app ---------------------------------------------------------------------------------
class Service:
    """What the routes share: the teacher, limits, batcher and token texts."""

    def __init__(self, teacher, cfg: ServeConfig, limiter: RateLimiter, processor):
        self.teacher, self.cfg, self.limiter = teacher, cfg, limiter
        self.name = cfg.model_name or teacher.name
        self.batcher = Batcher(teacher, cfg, processor)
        self.tokens = TokenText(teacher.tokenizer)
        config = teacher.model.config
        self.context = int(getattr(config, "max_position_embeddings", None) or 2048)
        self.vocab = int(getattr(config, "vocab_size", None) or len(teacher.tokenizer))
        tok = teacher.tokenizer
        self.start_id = next(i for i in (tok.bos_token_id, tok.eos_token_id, teacher.pad_id) if i is not None)

    # the request checks shared by both endpoints
    def check(self, req: _Base, top_k: int) -> None:
        if (req.n or 1) != 1:
            raise APIError(400, "Only n=1 is supported.", param="n")
        if getattr(req, "best_of", None) not in (None, 1):
            raise APIError(400, "Only best_of=1 is supported.", param="best_of")
        if getattr(req, "echo", False):
            raise APIError(400, "echo is not supported.", param="echo")
        if getattr(req, "suffix", None):
            raise APIError(400, "suffix is not supported.", param="suffix")
        for p in ("presence_penalty", "frequency_penalty"):
            if getattr(req, p):
                raise APIError(400, f"{p} is not supported (must be 0).", param=p)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported.", param="logit_bias")
        if top_k > self.cfg.max_top_logprobs:
            raise APIError(400, f"top_logprobs must be <= {self.cfg.max_top_logprobs}.", param="top_logprobs")

    async def admit(self, request: Request, req: _Base, prompt_ids: list[int], max_tokens: int | None,
                    default_max: int, top_k: int) -> tuple[Job, Any]:
        row = request.state.qlog
        cap = self.cfg.max_tokens_cap
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's cap of {cap}.", param="max_tokens")
        if not prompt_ids:
            prompt_ids = [self.start_id]
        if any(t >= self.vocab for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be < {self.vocab}.", param="prompt")
        room = self.context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = min(default_max, room)
        if max_tokens < 1 or len(prompt_ids) + max_tokens > self.context:
            raise APIError(
                400,
                f"This model's context is {self.context} tokens; the prompt has {len(prompt_ids)} and "
                f"max_tokens is {max(max_tokens, 0)}.",
                param="messages" if isinstance(req, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        row["tokens_in"] = len(prompt_ids)
        key = request.state.key
        try:
            reservation = self.limiter.acquire(key.key_id, len(prompt_ids) + max_tokens, key.rpm, key.tpm)
        except RateLimited as err:
            raise APIError(429, str(err), type=err.limit, code="rate_limit_exceeded",
                           headers={"Retry-After": str(err.retry_after)}) from None
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        top_p = 1.0 if req.top_p is None else max(float(req.top_p), 1e-9)
        seed = secrets.randbits(63) if req.seed is None else req.seed & ((1 << 63) - 1)
        loop = asyncio.get_running_loop()
        job = Job(prompt_ids, max_tokens, top_k, temperature, top_p, req.stops(), seed, loop.create_future(),
                  tokens=asyncio.Queue() if req.stream else None)
        return job, reservation


def _usage(c: Completion) -> dict[str, int]:
    p, o = len(c.prompt_ids), len(c.completion_ids)
    return {"prompt_tokens": p, "completion_tokens": o, "total_tokens": p + o}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(teacher, cfg: ServeConfig, *, keys: KeyStore | None = None, querylog: QueryLog | None = None,
               limiter: RateLimiter | None = None) -> FastAPI:
    """The FastAPI app serving `teacher` (an `HFTeacher`). Stores/limiter may be injected (tests)."""
    keys = keys or KeyStore(cfg.keys_url)
    querylog = querylog or QueryLog(cfg.querylog_url)
    limiter = limiter or RateLimiter(cfg.default_rpm, cfg.default_tpm)
    processor = None
    if cfg.watermark is not None:
        from potstill.guard.watermark import Watermark

        processor = Watermark(cfg.watermark).logits_processor
    svc = Service(teacher, cfg, limiter, processor)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.batcher.start()
        log.info("serving %s (watermark %s)", svc.name, "on" if processor else "off")
        try:
            yield
        finally:
            await svc.batcher.stop()
            querylog.close()

    app = FastAPI(title="potstill serve", version="1", lifespan=lifespan)
    app.state.service, app.state.keys, app.state.querylog, app.state.limiter = svc, keys, querylog, limiter
    app.add_middleware(GuardMiddleware, cfg=cfg, keys=keys, querylog=querylog)
    bearer = [Depends(HTTPBearer(auto_error=False))]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        request.state.qlog["error_type"] = err.log_type
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        def where(loc) -> str:  # drop "body" and pydantic's union-branch tags ("constrained-str", ...)
            return ".".join(str(x) for x in loc if isinstance(x, int) or (x != "body" and str(x).isidentifier()))

        errors = err.errors()
        parts = list(dict.fromkeys(f"{where(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors))
        parts = parts[:3]
        param = where(errors[0].get("loc", ())) or None if errors else None
        return await _api_error(request, APIError(400, "Invalid request: " + "; ".join(parts), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "invalid_request_error")
        return await _api_error(request, APIError(err.status_code, str(err.detail), kind, headers=err.headers))

    @app.get("/health", include_in_schema=False)
    async def health():
        return {"status": "ok"}

    def model_card() -> dict[str, Any]:
        return {"id": svc.name, "object": "model", "created": 0, "owned_by": "potstill"}

    @app.get("/v1/models", dependencies=bearer, responses={401: _RESPONSES[401]})
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=bearer,
             responses={401: _RESPONSES[401], 404: {"description": "No such model", "content": _ERROR_SCHEMA}})
    async def model(model_id: str):
        if model_id != svc.name:
            raise APIError(404, f"The model '{model_id[:256]}' does not exist.", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=bearer, responses=_RESPONSES)
    async def chat_completions(req: ChatRequest, request: Request):
        row = request.state.qlog
        top_k = (req.top_logprobs or 0) if req.logprobs else 0
        row.update(prompt=[m.model_dump(exclude_none=True) for m in req.messages], model=req.model,
                   params=req.model_dump(exclude={"messages"}, exclude_none=True),
                   logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true.", param="top_logprobs")
        svc.check(req, top_k)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = await anyio.to_thread.run_sync(teacher.encode_chat, messages)
        except Exception as err:
            raise APIError(400, f"Could not apply the chat template: {type(err).__name__}: {str(err)[:200]}",
                           param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        job, res = await svc.admit(request, req, prompt_ids, max_tokens, svc.cfg.max_tokens_cap, top_k)
        return await _respond(request, req, job, res, chat=True, prompt_text="")

    @app.post("/v1/completions", dependencies=bearer, responses=_RESPONSES)
    async def completions(req: CompletionRequest, request: Request):
        row = request.state.qlog
        top_k = req.logprobs or 0
        row.update(prompt=req.prompt, model=req.model, params=req.model_dump(exclude={"prompt"}, exclude_none=True),
                   logprobs=req.logprobs is not None, top_logprobs=req.logprobs)
        svc.check(req, top_k)
        prompt = req.prompt
        if prompt and isinstance(prompt[0], (str, list)) and not isinstance(prompt, str):
            if len(prompt) != 1:
                raise APIError(400, "Only one prompt per request is supported.", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_text = prompt
            prompt_ids = await anyio.to_thread.run_sync(lambda: list(teacher.tokenizer(prompt)["input_ids"]))
        else:
            prompt_ids = list(prompt)
            prompt_text = teacher.tokenizer.decode(prompt_ids) if all(t < svc.vocab for t in prompt_ids) else ""
        job, res = await svc.admit(request, req, prompt_ids, req.max_tokens, min(16, svc.cfg.max_tokens_cap), top_k)
        return await _respond(request, req, job, res, chat=False, prompt_text=prompt_text)

    # ---- responses ----------------------------------------------------------------------------
    def chat_logprobs(c: Completion, lo: int = 0, hi: int | None = None) -> dict[str, Any]:
        tt, content = svc.tokens, []
        hi = len(c.completion_ids) if hi is None else hi
        for i in range(lo, hi):
            tid = c.completion_ids[i]
            tops = []
            if c.topk_ids is not None:
                tops = [{"token": tt.text(t), "logprob": _lp(lp), "bytes": list(tt.bytes(t))}
                        for t, lp in zip(c.topk_ids[i].tolist(), c.topk_logprobs[i].tolist(), strict=True)]
            content.append({"token": tt.text(tid), "logprob": _lp(c.sampled_logprob[i]),
                            "bytes": list(tt.bytes(tid)), "top_logprobs": tops})
        return {"content": content, "refusal": None}

    def completion_logprobs(c: Completion, offset: int, lo: int = 0, hi: int | None = None) -> dict[str, Any]:
        tt = svc.tokens
        hi = len(c.completion_ids) if hi is None else hi
        tokens, lps, tops, offsets = [], [], [], []
        for i in range(lo, hi):
            tid = c.completion_ids[i]
            offsets.append(offset)
            tokens.append(tt.text(tid))
            offset += len(tokens[-1])
            lps.append(_lp(c.sampled_logprob[i]))
            if c.topk_ids is not None:
                tops.append({tt.text(t): _lp(lp) for t, lp in zip(c.topk_ids[i].tolist(), c.topk_logprobs[i].tolist(), strict=True)})
            else:
                tops.append({})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _respond(request: Request, req: _Base, job: Job, res, chat: bool, prompt_text: str):
        row = request.state.qlog
        wants_lp = bool(req.logprobs) if chat else req.logprobs is not None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": svc.name, "system_fingerprint": None}
        if not req.stream:
            try:
                await svc.batcher.submit(job)
                c = await job.future
            finally:
                done = job.future.done() and not job.future.cancelled() and job.future.exception() is None
                used = len(job.future.result().completion_ids) if done else 0
                svc.limiter.settle(res, len(job.prompt_ids) + used)
                row["tokens_out"] = used
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": c.text, "refusal": None},
                          "logprobs": chat_logprobs(c) if wants_lp else None, "finish_reason": c.finish_reason}
                return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(c)}
            choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                      "logprobs": completion_logprobs(c, len(prompt_text)) if wants_lp else None}
            return {**head, "object": "text_completion", "choices": [choice], "usage": _usage(c)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, lp: Any = None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
            return _sse({**head, "object": obj, "choices": [choice], **({"usage": None} if include_usage else {})})

        await svc.batcher.submit(job)

        async def events():
            used = 0
            try:
                if chat:
                    yield chunk(None, first=True)
                detok, streamed, sent = Detokenizer(teacher.tokenizer), "", ""
                while (item := await job.tokens.get()) is not _DONE:
                    if wants_lp:
                        continue  # log-prob chunks are built from the finished completion below
                    streamed += detok.add(item)
                    safe = safe_prefix(streamed, job.stop)
                    if len(safe) > len(sent):
                        yield chunk(safe[len(sent):])
                        sent = safe
                try:
                    c = job.future.result()
                except APIError as err:
                    yield _sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
                    yield "data: [DONE]\n\n"
                    return
                used = len(c.completion_ids)
                if wants_lp:
                    detok = Detokenizer(teacher.tokenizer)
                    offset = len(prompt_text)
                    for i, tid in enumerate(c.completion_ids):
                        piece = detok.add([tid])
                        if len(sent) + len(piece) > len(c.text):
                            piece = c.text[len(sent):]
                        lp = chat_logprobs(c, i, i + 1) if chat else completion_logprobs(c, offset, i, i + 1)
                        offset += len(lp["tokens"][0]) if not chat else 0
                        yield chunk(piece, lp=lp)
                        sent += piece
                rest = c.text[len(sent):] if c.text.startswith(sent) else ""
                if rest:
                    yield chunk(rest)
                yield chunk(None, finish=c.finish_reason)
                if include_usage:
                    yield _sse({**head, "object": obj, "choices": [], "usage": _usage(c)})
                yield "data: [DONE]\n\n"
            finally:
                if not job.future.done():
                    job.abandoned = True
                svc.limiter.settle(res, len(job.prompt_ids) + used)
                row["tokens_out"] = used

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def serve(model_spec: str, cfg: ServeConfig) -> None:
    """Load `model_spec` ("embedded", a model dir or .gguf) and serve it until interrupted."""
    import uvicorn

    from potstill.teachers.hf import HFTeacher

    teacher = HFTeacher.load(model_spec)
    app = create_app(teacher, cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=30)
