"""OpenAI-compatible server for a local teacher: API keys, rate limits, watermark, query log, batching.

    from potstill.guard.serve import ServeConfig, serve
    serve("embedded", ServeConfig(port=8000))       # `potstill serve embedded --port 8000`

Endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`. The official
`openai` client works unchanged (streaming, `logprobs`/`top_logprobs`, `seed`, `stop`).

A request passes, in order: `GuardMiddleware` (declared body over `max_body_bytes` -> 413 at
once, received bytes counted as they arrive; exactly one query-log row per request, whatever the
outcome; refused requests' prompts stored as a bounded prefix, length and sha256), the route's
`authenticate` dependency (bearer key from the headers, before any body byte is read ->
401), the body parsed by pydantic (-> 400 naming the field), server caps (`n`, `max_tokens`
-> 400), then `guard/service.py`: the key's concurrency cap, the pending-queue bound and rate
limits (429/503 with `Retry-After`) before any tokenising, the context length (400) after, then
the `Batcher` (`guard/batcher.py`), which decodes concurrent requests together in a worker
thread, with a deadline (`request_timeout_s`, 504). A client that leaves stops its row and is
charged what it was sent. The watermark (when configured) is the logits processor of every
batch: it shapes both the sampled tokens and the returned log-probs. /docs and /openapi.json
are off unless `docs=True`.

This file holds the config, the auth dependency and the routes; admission, metering and the
responses are in `guard/service.py`; the request models, errors and response shapes in
`guard/openai_api.py`. Their names are re-exported here.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from potstill.errors import PotstillError
from potstill.guard.batcher import Batcher, Job
from potstill.guard.keys import KeyStore
from potstill.guard.middleware import GuardMiddleware
from potstill.guard.openai_api import (
    ERROR_SCHEMA,
    RESPONSES,
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    Detokenizer,
    RequestBase,
    Stop,
    StreamOptions,
    TextPart,
    TokenText,
    safe_prefix,
    validation_error,
)
from potstill.guard.querylog import QueryLog
from potstill.guard.ratelimit import DEFAULT_RPM, DEFAULT_TPM, RateLimiter
from potstill.guard.service import Service, respond
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
    max_pending: int = 1024
    """Most requests waiting for a batch; above it new requests get 503 with `Retry-After`."""
    max_concurrent_per_key: int | None = 64
    """Most requests one key may have in flight (None = no cap); above it 429 with `Retry-After`."""
    request_timeout_s: float = 600.0
    """Deadline from admission to the last token: past it the row stops decoding and the request gets 504
    (a stream: an error event), charged for the tokens delivered."""
    docs: bool = False
    """Serve /docs, /redoc and /openapi.json (off: they describe the API to anyone)."""
    antidistill: Any = field(default=None, repr=False)
    """A `config.AntidistillConfig` (anti-distillation sampling, guard/antidistill.py), or None (off)."""

    def __post_init__(self) -> None:
        home = potstill_home() / "guard"
        self.keys_url = self.keys_url or str(home / "keys.db")
        self.querylog_url = self.querylog_url or str(home / "queries.db")
        for name in ("max_tokens_cap", "max_body_bytes", "max_batch_size", "max_batch_tokens", "max_pending",
                     "max_concurrent_per_key"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PotstillError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise PotstillError(f"port must be 0-65535, got {self.port}")
        if self.batch_window_ms < 0:
            raise PotstillError("batch_window_ms must be >= 0")
        if not self.request_timeout_s > 0:
            raise PotstillError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        for name in ("default_rpm", "default_tpm"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PotstillError(f"{name} must be >= 1 or None (unlimited)")

    def public_dict(self) -> dict[str, Any]:
        """The config without secrets (the watermark key never appears)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("watermark", "antidistill")}
        out["watermark"] = self.watermark.public_dict() if self.watermark is not None else None
        ad = self.antidistill
        out["antidistill"] = None if ad is None else {**asdict(ad), "top_logprobs": "tilted"}
        return out



# ---- the app ---------------------------------------------------------------------------------
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
    if cfg.antidistill is not None and cfg.antidistill.antidistill > 0:  # both tilts in one sampler
        from potstill.guard.antidistill import AntidistillProcessor
        from potstill.lm.sampling import chain_processors

        processor = chain_processors(AntidistillProcessor.load(cfg.antidistill, teacher), processor)
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

    docs = {} if cfg.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="potstill serve", version="1", lifespan=lifespan, **docs)
    app.state.service, app.state.keys, app.state.querylog, app.state.limiter = svc, keys, querylog, limiter
    app.add_middleware(GuardMiddleware, cfg=cfg, querylog=querylog)
    bearer = HTTPBearer(auto_error=False)

    async def authenticate(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """The route dependency every /v1 route has: a live key from the headers, before the body is read."""
        secret = creds.credentials.strip() if creds is not None else ""
        if not secret:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        record = await anyio.to_thread.run_sync(keys.verify, secret)
        if record is None:
            raise APIError(401, "Invalid or revoked API key.", code="invalid_api_key")
        request.state.key = record
        request.state.qlog["key_id"] = record.key_id
        return record

    keyed = [Depends(authenticate)]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        request.state.qlog["error_type"] = err.log_type
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return await _api_error(request, validation_error(err.errors()))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, err: ClientDisconnect):
        request.state.qlog["error_type"] = "client_closed"
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "invalid_request_error")
        return await _api_error(request, APIError(err.status_code, str(err.detail), kind, headers=err.headers))

    @app.get("/health", include_in_schema=False)
    async def health():
        qlog = querylog.health()  # a failing or full query log is not ok: evidence is being lost
        body = {"status": "ok" if qlog["ok"] else "degraded", "querylog": qlog, "queued": svc.queued(),
                "max_pending": cfg.max_pending, "in_flight": len(svc.open)}
        return JSONResponse(body, status_code=200 if qlog["ok"] else 503)

    def model_card() -> dict[str, Any]:
        return {"id": svc.name, "object": "model", "created": 0, "owned_by": "potstill"}

    @app.get("/v1/models", dependencies=keyed, responses={401: RESPONSES[401]})
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=keyed,
             responses={401: RESPONSES[401], 404: {"description": "No such model", "content": ERROR_SCHEMA}})
    async def model(model_id: str):
        if model_id != svc.name:
            raise APIError(404, f"The model '{model_id[:256]}' does not exist.", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=keyed, responses=RESPONSES, openapi_extra=_body(ChatRequest))
    async def chat_completions(request: Request, req: ChatRequest = Depends(_parse(ChatRequest))):
        row = request.state.qlog
        top_k = (req.top_logprobs or 0) if req.logprobs else 0
        row.update(prompt=[m.model_dump(exclude_none=True) for m in req.messages], model=req.model,
                   params=req.model_dump(exclude={"messages"}, exclude_none=True),
                   logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true.", param="top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        svc.check(req, top_k, max_tokens)
        ticket = svc.charge(request, max_tokens or cfg.max_tokens_cap)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = await anyio.to_thread.run_sync(teacher.encode_chat, messages)
        except Exception as err:
            raise APIError(400, f"Could not apply the chat template: {type(err).__name__}: {str(err)[:200]}",
                           param="messages") from None
        svc.admit(ticket, req, prompt_ids, max_tokens, top_k)
        return await respond(svc, request, req, ticket, chat=True, prompt_text="")

    @app.post("/v1/completions", dependencies=keyed, responses=RESPONSES, openapi_extra=_body(CompletionRequest))
    async def completions(request: Request, req: CompletionRequest = Depends(_parse(CompletionRequest))):
        row = request.state.qlog
        top_k = req.logprobs or 0
        row.update(prompt=req.prompt, model=req.model, params=req.model_dump(exclude={"prompt"}, exclude_none=True),
                   logprobs=req.logprobs is not None, top_logprobs=req.logprobs)
        svc.check(req, top_k, req.max_tokens)
        prompt = req.prompt
        if prompt and isinstance(prompt[0], (str, list)) and not isinstance(prompt, str):
            if len(prompt) != 1:
                raise APIError(400, "Only one prompt per request is supported.", param="prompt")
            prompt = prompt[0]
        if not isinstance(prompt, str) and any(t >= svc.vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be < {svc.vocab}.", param="prompt")
        ticket = svc.charge(request, req.max_tokens or min(16, cfg.max_tokens_cap))
        if isinstance(prompt, str):
            prompt_text = prompt
            try:
                prompt_ids = await anyio.to_thread.run_sync(lambda: list(teacher.tokenizer(prompt)["input_ids"]))
            except Exception as err:  # e.g. a lone surrogate the tokenizer cannot take
                raise APIError(400, f"Could not tokenize the prompt: {type(err).__name__}", param="prompt") from None
        else:
            prompt_ids = list(prompt)
            prompt_text = teacher.tokenizer.decode(prompt_ids)
        svc.admit(ticket, req, prompt_ids, req.max_tokens, top_k)
        return await respond(svc, request, req, ticket, chat=False, prompt_text=prompt_text)

    if cfg.docs:
        _add_body_schemas(app)
    return app


def _parse(model: type[RequestBase]):
    """A dependency parsing the JSON body as `model` (400 naming the field); runs after `authenticate`."""

    async def parse(request: Request):
        raw = await request.body()  # capped at max_body_bytes by the middleware as it arrives
        try:
            # json.loads, not pydantic's parser: a lone surrogate is valid JSON text, and the request must
            # reach the route (and the log, as sent) to be refused there with a 400
            data = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"The body is not valid JSON: {str(err)[:200]}") from None
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise validation_error(err.errors()) from None

    return parse


def _body(model: type[RequestBase]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _add_body_schemas(app: FastAPI) -> None:
    """Put the request models (parsed by `_parse`, not by FastAPI) into /openapi.json's components."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in (ChatRequest, CompletionRequest):
                js = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[m.__name__] = js
        return app.openapi_schema

    app.openapi = openapi


def serve(model_spec: str, cfg: ServeConfig) -> None:
    """Load `model_spec` ("embedded", a model dir or .gguf) and serve it until interrupted."""
    import uvicorn

    from potstill.teachers.hf import HFTeacher

    teacher = HFTeacher.load(model_spec, dtype="auto")  # bf16 where the CPU has it
    app = create_app(teacher, cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=30)
