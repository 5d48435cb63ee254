"""The parts every guarded app shares (`potstill serve` with a local model, and the `--upstream` gateway).

An app is built in named steps:

    stores = open_stores(cfg)                          # keys, query log, rate limiter
    app = base_app(cfg, stores, lifespan)              # FastAPI, docs off, GuardMiddleware, error shapes
    keyed = [Depends(authenticator(stores.keys))]      # bearer key from the headers, before the body
    add_health_route(app, stores.querylog, lambda: {...})
    ... the completion routes (guard/serve.py or guard/gateway.py), each parsing its body with `parse_body`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from potstill.guard.keys import KeyStore
from potstill.guard.middleware import GuardMiddleware
from potstill.guard.openai_api import APIError, ChatRequest, CompletionRequest, RequestBase, validation_error
from potstill.guard.querylog import QueryLog
from potstill.guard.ratelimit import RateLimiter


@dataclass
class Stores:
    """What a guarded app keeps in databases: API keys, the query log, the rate limiter."""

    keys: KeyStore
    querylog: QueryLog
    limiter: Any  # RateLimiter (per process) or SharedRateLimiter (in the key store's database)


def open_stores(cfg, keys: KeyStore | None = None, querylog: QueryLog | None = None,
                limiter: Any = None) -> Stores:
    """The key store, query log (its server row recorded) and limiter of `cfg`, unless injected (tests)."""
    keys = keys or KeyStore(cfg.keys_url)
    querylog = querylog or QueryLog(cfg.querylog_url)
    querylog.record_server(cfg.public_dict())  # `monitor --throttle` starts from these limits
    if limiter is None:
        if cfg.shared_limits:
            from potstill.guard.sharedlimit import SharedRateLimiter

            limiter = SharedRateLimiter(keys.engine, cfg.default_rpm, cfg.default_tpm)
        else:
            limiter = RateLimiter(cfg.default_rpm, cfg.default_tpm)
    return Stores(keys, querylog, limiter)


def base_app(cfg, stores: Stores, lifespan, title: str) -> FastAPI:
    """FastAPI with docs off unless `cfg.docs`, the stores on `app.state`, the middleware and error shapes."""
    docs = {} if cfg.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title=title, version="1", lifespan=lifespan, **docs)
    app.state.keys, app.state.querylog, app.state.limiter = stores.keys, stores.querylog, stores.limiter
    app.add_middleware(GuardMiddleware, cfg=cfg, querylog=stores.querylog)
    install_error_handlers(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's shape, its type in the request's log row."""

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


def authenticator(keys: KeyStore) -> Callable:
    """The route dependency every /v1 route has: a live key from the headers, before the body is read."""
    bearer = HTTPBearer(auto_error=False)

    async def authenticate(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        secret = creds.credentials.strip() if creds is not None else ""
        if not secret:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        record = await anyio.to_thread.run_sync(keys.verify, secret)
        if record is None:
            raise APIError(401, "Invalid or revoked API key.", code="invalid_api_key")
        request.state.key = record
        request.state.qlog["key_id"] = record.key_id
        return record

    return authenticate


def add_health_route(app: FastAPI, querylog: QueryLog, load: Callable[[], dict[str, Any]]) -> None:
    """/health: 200 "ok", or 503 "degraded" while the query log fails or fills; `load()` adds queue state."""

    @app.get("/health", include_in_schema=False)
    async def health():
        qlog = querylog.health()  # a failing or full query log is not ok: evidence is being lost
        body = {"status": "ok" if qlog["ok"] else "degraded", "querylog": qlog, **load()}
        return JSONResponse(body, status_code=200 if qlog["ok"] else 503)


def parse_body(model: type[RequestBase]):
    """A dependency parsing the JSON body as `model` (400 naming the field); runs after `authenticate`.

    The parsed request keeps the raw JSON object as `request.state.body` (the gateway forwards it)."""

    async def parse(request: Request):
        raw = await request.body()  # capped at max_body_bytes by the middleware as it arrives
        try:
            # json.loads, not pydantic's parser: a lone surrogate is valid JSON text, and the request must
            # reach the route (and the log, as sent) to be refused there with a 400
            data = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"The body is not valid JSON: {str(err)[:200]}") from None
        try:
            parsed = model.model_validate(data)
        except ValidationError as err:
            raise validation_error(err.errors()) from None
        request.state.body = data
        return parsed

    return parse


def request_row(req: RequestBase, chat: bool) -> dict[str, Any]:
    """What the query log keeps of a parsed completion request: prompt, model, params, log-prob use."""
    if chat:
        return {"prompt": [m.model_dump(exclude_none=True) for m in req.messages], "model": req.model,
                "params": req.model_dump(exclude={"messages"}, exclude_none=True),
                "logprobs": bool(req.logprobs), "top_logprobs": req.top_logprobs}
    return {"prompt": req.prompt, "model": req.model, "params": req.model_dump(exclude={"prompt"}, exclude_none=True),
            "logprobs": req.logprobs is not None, "top_logprobs": req.logprobs}


def body_schema(model: type[RequestBase]) -> dict[str, Any]:
    """`openapi_extra` of a route whose body `parse_body` reads."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def add_body_schemas(app: FastAPI) -> None:
    """Put the request models (parsed by `parse_body`, not by FastAPI) into /openapi.json's components."""
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
