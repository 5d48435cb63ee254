"""OpenAI-compatible server for a local teacher: API keys, rate limits, watermark, query log, batching.

    from potstill.guard.serve import ServeConfig, serve
    serve("embedded", ServeConfig(port=8000))       # `potstill serve embedded --port 8000`

Endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`. The official
`openai` client works unchanged (streaming, `logprobs`/`top_logprobs`, `seed`, `stop`).

A request passes, in order: `GuardMiddleware` (body over `max_body_bytes` -> 413; bearer key
missing/unknown/revoked -> 401; exactly one query-log row per request, whatever the outcome),
pydantic validation (-> 400 naming the field), server caps (`n`, `max_tokens`, context
length -> 400), the key's rate limits (-> 429 with `Retry-After`), then the `Batcher`
(`guard/batcher.py`), which decodes concurrent requests with compatible sampling params
together in a worker thread. The watermark (when configured) is the logits processor of every
batch: it shapes both the sampled tokens and the returned log-probs.

This file holds the config, the middleware and the routes; the request models, errors and
response shapes are in `guard/openai_api.py`. Their names are re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from potstill.errors import PotstillError
from potstill.guard.batcher import DONE, Batcher, Job
from potstill.guard.keys import KeyStore
from potstill.guard.middleware import GuardMiddleware
from potstill.guard.openai_api import (
    ERROR_SCHEMA,
    RESPONSES,
    SSE_DONE,
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    Detokenizer,
    RequestBase,
    Stop,
    StreamChunks,
    StreamOptions,
    TextPart,
    TokenText,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    safe_prefix,
    validation_error,
)
from potstill.guard.querylog import QueryLog
from potstill.guard.ratelimit import DEFAULT_RPM, DEFAULT_TPM, RateLimited, RateLimiter
from potstill.utils import potstill_home

__all__ = [
    "APIError", "Batcher", "ChatMessage", "ChatRequest", "CompletionRequest", "Detokenizer", "GuardMiddleware",
    "Job", "RequestBase", "ServeConfig", "Service", "Stop", "StreamOptions", "TextPart", "TokenText",
    "create_app", "safe_prefix", "serve",
]

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
    def check(self, req: RequestBase, top_k: int) -> None:
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

    async def admit(self, request: Request, req: RequestBase, prompt_ids: list[int], max_tokens: int | None,
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
        if not request.app.state.querylog.health()["ok"]:  # fail closed: no model work that cannot be logged
            raise APIError(503, "The query log is unavailable; try again later.", type="server_error",
                           code="log_unavailable", headers={"Retry-After": "5"})
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


def create_app(teacher, cfg: ServeConfig, *, keys: KeyStore | None = None, querylog: QueryLog | None = None,
               limiter: RateLimiter | None = None) -> FastAPI:
    """The FastAPI app serving `teacher` (an `HFTeacher`). Stores/limiter may be injected (tests)."""
    keys = keys or KeyStore(cfg.keys_url)
    querylog = querylog or QueryLog(cfg.querylog_url)
    querylog.record_server(cfg.public_dict())  # `monitor --throttle` starts from these limits
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
        return await _api_error(request, validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "invalid_request_error")
        return await _api_error(request, APIError(err.status_code, str(err.detail), kind, headers=err.headers))

    @app.get("/health", include_in_schema=False)
    async def health():
        qlog = querylog.health()  # a failing or full query log is not ok: evidence is being lost
        return JSONResponse({"status": "ok" if qlog["ok"] else "degraded", "querylog": qlog},
                            status_code=200 if qlog["ok"] else 503)

    def model_card() -> dict[str, Any]:
        return {"id": svc.name, "object": "model", "created": 0, "owned_by": "potstill"}

    @app.get("/v1/models", dependencies=bearer, responses={401: RESPONSES[401]})
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=bearer,
             responses={401: RESPONSES[401], 404: {"description": "No such model", "content": ERROR_SCHEMA}})
    async def model(model_id: str):
        if model_id != svc.name:
            raise APIError(404, f"The model '{model_id[:256]}' does not exist.", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=bearer, responses=RESPONSES)
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

    @app.post("/v1/completions", dependencies=bearer, responses=RESPONSES)
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
            try:
                prompt_ids = await anyio.to_thread.run_sync(lambda: list(teacher.tokenizer(prompt)["input_ids"]))
            except Exception as err:  # e.g. a lone surrogate the tokenizer cannot take
                raise APIError(400, f"Could not tokenize the prompt: {type(err).__name__}", param="prompt") from None
        else:
            prompt_ids = list(prompt)
            prompt_text = teacher.tokenizer.decode(prompt_ids) if all(t < svc.vocab for t in prompt_ids) else ""
        job, res = await svc.admit(request, req, prompt_ids, req.max_tokens, min(16, svc.cfg.max_tokens_cap), top_k)
        return await _respond(request, req, job, res, chat=False, prompt_text=prompt_text)

    # ---- responses ----------------------------------------------------------------------------
    async def _respond(request: Request, req: RequestBase, job: Job, res, chat: bool, prompt_text: str):
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
                row["completion"] = job.future.result().text if done else None
                row["completion_ids"] = list(job.future.result().completion_ids) if done else None
            lp = None
            if wants_lp:
                lp = chat_logprobs(svc.tokens, c) if chat else completion_logprobs(svc.tokens, c, len(prompt_text))
            return completion_body(head, c, chat=chat, logprobs=lp)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = StreamChunks(head, chat=chat, include_usage=include_usage)
        chunk = chunks.delta

        await svc.batcher.submit(job)

        async def events():
            used = 0
            try:
                if chat:
                    yield chunk(None, first=True)
                detok, streamed, sent = Detokenizer(teacher.tokenizer), "", ""
                while (item := await job.tokens.get()) is not DONE:
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
                    yield err.sse()
                    yield SSE_DONE
                    return
                used = len(c.completion_ids)
                row["completion"] = c.text
                row["completion_ids"] = list(c.completion_ids)
                if wants_lp:
                    detok = Detokenizer(teacher.tokenizer)
                    offset = len(prompt_text)
                    for i, tid in enumerate(c.completion_ids):
                        piece = detok.add([tid])
                        if len(sent) + len(piece) > len(c.text):
                            piece = c.text[len(sent):]
                        lp = (chat_logprobs(svc.tokens, c, i, i + 1) if chat
                              else completion_logprobs(svc.tokens, c, offset, i, i + 1))
                        offset += len(lp["tokens"][0]) if not chat else 0
                        yield chunk(piece, lp=lp)
                        sent += piece
                rest = c.text[len(sent):] if c.text.startswith(sent) else ""
                if rest:
                    yield chunk(rest)
                yield chunk(None, finish=c.finish_reason)
                if include_usage:
                    yield chunks.usage_chunk(c)
                yield SSE_DONE
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

    teacher = HFTeacher.load(model_spec, dtype="auto")  # bf16 where the CPU has it
    app = create_app(teacher, cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=30)
