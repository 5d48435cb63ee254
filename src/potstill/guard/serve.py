"""OpenAI-compatible server for a local teacher: API keys, rate limits, watermark, query log, batching.

    from potstill.guard.serve import ServeConfig, serve
    serve("embedded", ServeConfig(port=8000))       # `potstill serve embedded --port 8000`

Endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`. The official
`openai` client works unchanged (streaming, `logprobs`/`top_logprobs`, `seed`, `stop`).

A request passes, in order: `GuardMiddleware` (declared body over `max_body_bytes` -> 413 at
once, received bytes counted as they arrive; exactly one query-log row per request, whatever the
outcome; refused requests' prompts stored as a bounded prefix, length and sha256), the route's
`authenticate` dependency (bearer key from the headers, before any body byte is read ->
401), the body parsed by pydantic (-> 400 naming the field), the key's log-prob allowance (-> 403),
server caps (`n`, `max_tokens` -> 400), then `guard/service.py`: the key's concurrency cap, the
pending-queue bound and rate limits (429/503 with `Retry-After`) before any tokenising, the context length (400) after, then
the `Batcher` (`guard/batcher.py`), which decodes concurrent requests together in a worker
thread, with a deadline (`request_timeout_s`, 504). A client that leaves stops its row and is
charged what it was sent. The watermark and anti-distillation sampling (each when configured) are
the logits processor of every batch: they shape both the sampled tokens and the returned log-probs. /docs and /openapi.json
are off unless `docs=True`.

This file builds the app in named steps (`create_app`) and holds its completion routes; the
config is `guard/serve_config.py`, the steps every guarded app shares (stores, middleware, auth,
errors, /health) are `guard/app.py`; admission, metering and the responses are in
`guard/service.py`; the request models, errors and response shapes in `guard/openai_api.py`.
Their names are re-exported here. With `ServeConfig.upstream` set, `serve` runs the gateway
(`guard/gateway.py`) instead of loading a model.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request

from potstill.guard.app import (
    Stores,
    add_body_schemas,
    add_health_route,
    authenticator,
    base_app,
    body_schema,
    open_stores,
    parse_body,
    request_row,
)
from potstill.guard.batcher import Batcher, Job
from potstill.guard.keys import KeyStore
from potstill.guard.middleware import GuardMiddleware, uvicorn_options
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
)
from potstill.guard.querylog import QueryLog
from potstill.guard.serve_config import ServeConfig
from potstill.guard.service import Service, check_key_logprobs, respond

__all__ = [
    "APIError", "Batcher", "ChatMessage", "ChatRequest", "CompletionRequest", "Detokenizer", "GuardMiddleware",
    "Job", "RequestBase", "ServeConfig", "Service", "Stop", "StreamOptions", "TextPart", "TokenText",
    "create_app", "safe_prefix", "serve",
]

log = logging.getLogger(__name__)


# ---- the app, in named steps ------------------------------------------------------------------
def create_app(teacher, cfg: ServeConfig, *, keys: KeyStore | None = None, querylog: QueryLog | None = None,
               limiter: Any = None) -> FastAPI:
    """The FastAPI app serving `teacher` (an `HFTeacher`). Stores/limiter may be injected (tests)."""
    stores = open_stores(cfg, keys, querylog, limiter)
    svc = Service(teacher, cfg, stores.limiter, *sampling_processors(cfg, teacher))
    app = base_app(cfg, stores, batcher_lifespan(svc, stores), title="potstill serve")
    app.state.service = svc
    keyed = [Depends(authenticator(stores.keys))]
    add_health_route(app, stores.querylog, lambda: {"queued": svc.queued(), "max_pending": cfg.max_pending,
                                                    "in_flight": len(svc.open)})
    add_model_routes(app, svc.name, keyed)
    add_chat_route(app, svc, keyed)
    add_completions_route(app, svc, keyed)
    if cfg.docs:
        add_body_schemas(app)
    return app


def watermark_processors(cfg: ServeConfig):
    """(the watermark's logits processor, its report processor for served log-probs), or (None, None)."""
    if cfg.watermark is None:
        return None, None
    from potstill.guard.watermark import Watermark

    wm = Watermark(cfg.watermark)
    return wm.logits_processor, wm.report_processor()


def sampling_processors(cfg: ServeConfig, teacher):
    """(logits processor sampled from, report processor for the served log-probs): the watermark's pair, with
    the anti-distillation tilt (when configured) applied first in both, computed once per step."""
    processor, report = watermark_processors(cfg)
    if cfg.antidistill is None or not cfg.antidistill.antidistill > 0:
        return processor, report
    from potstill.guard.antidistill import AntidistillProcessor
    from potstill.lm.sampling import chain_processors

    tilt = AntidistillProcessor.load(cfg.antidistill, teacher)
    step: dict = {}

    def tilted(contexts, logits):  # the sampling side: computes the tilt and remembers it for the report
        base = logits.clone()
        out = tilt(contexts, logits)
        step["delta"] = out - base
        return out

    def tilted_report(contexts, logits):  # the served log-probs: the same tilt, never the clean distribution
        return logits + step["delta"]

    # with no watermark the report is the sampled (tilted) distribution itself: no report processor needed
    return (chain_processors(tilted, processor),
            chain_processors(tilted_report, report) if report is not None else None)


def batcher_lifespan(svc: Service, stores: Stores):
    """Start the batcher with the app; on shutdown stop it, then flush and close the query log."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.batcher.start()
        log.info("serving %s (watermark %s)", svc.name, "on" if svc.batcher.processor else "off")
        try:
            yield
        finally:
            await svc.batcher.stop()
            stores.querylog.close()

    return lifespan


def add_model_routes(app: FastAPI, name: str, keyed: list) -> None:
    """/v1/models and /v1/models/{id}: the one model served."""

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "potstill"}

    @app.get("/v1/models", dependencies=keyed, responses={401: RESPONSES[401]})
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=keyed,
             responses={401: RESPONSES[401], 404: {"description": "No such model", "content": ERROR_SCHEMA}})
    async def model(model_id: str):
        if model_id != name:
            raise APIError(404, f"The model '{model_id[:256]}' does not exist.", code="model_not_found")
        return model_card()


def add_chat_route(app: FastAPI, svc: Service, keyed: list) -> None:
    """POST /v1/chat/completions: checks, charge, chat template, admit, decode."""
    teacher, cfg = svc.teacher, svc.cfg

    @app.post("/v1/chat/completions", dependencies=keyed, responses=RESPONSES, openapi_extra=body_schema(ChatRequest))
    async def chat_completions(request: Request, req: ChatRequest = Depends(parse_body(ChatRequest))):
        request.state.qlog.update(request_row(req, chat=True))
        check_key_logprobs(request, req, chat=True)
        top_k = (req.top_logprobs or 0) if req.logprobs else 0
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true.", param="top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        svc.check(req, top_k, max_tokens)
        ticket = await svc.charge(request, max_tokens or cfg.max_tokens_cap)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = await anyio.to_thread.run_sync(teacher.encode_chat, messages)
        except Exception as err:
            raise APIError(400, f"Could not apply the chat template: {type(err).__name__}: {str(err)[:200]}",
                           param="messages") from None
        await svc.admit(ticket, req, prompt_ids, max_tokens, top_k)
        return await respond(svc, request, req, ticket, chat=True, prompt_text="")


def add_completions_route(app: FastAPI, svc: Service, keyed: list) -> None:
    """POST /v1/completions: checks, charge, tokenise (or take the ids), admit, decode."""
    teacher, cfg = svc.teacher, svc.cfg

    @app.post("/v1/completions", dependencies=keyed, responses=RESPONSES,
              openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request, req: CompletionRequest = Depends(parse_body(CompletionRequest))):
        request.state.qlog.update(request_row(req, chat=False))
        check_key_logprobs(request, req, chat=False)
        top_k = req.logprobs or 0
        svc.check(req, top_k, req.max_tokens)
        prompt = req.prompt
        if prompt and isinstance(prompt[0], (str, list)) and not isinstance(prompt, str):
            if len(prompt) != 1:
                raise APIError(400, "Only one prompt per request is supported.", param="prompt")
            prompt = prompt[0]
        if not isinstance(prompt, str) and any(t >= svc.vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be < {svc.vocab}.", param="prompt")
        ticket = await svc.charge(request, req.max_tokens or min(16, cfg.max_tokens_cap))
        if isinstance(prompt, str):
            prompt_text = prompt
            try:
                prompt_ids = await anyio.to_thread.run_sync(lambda: list(teacher.tokenizer(prompt)["input_ids"]))
            except Exception as err:  # e.g. a lone surrogate the tokenizer cannot take
                raise APIError(400, f"Could not tokenize the prompt: {type(err).__name__}", param="prompt") from None
        else:
            prompt_ids = list(prompt)
            prompt_text = teacher.tokenizer.decode(prompt_ids)
        await svc.admit(ticket, req, prompt_ids, req.max_tokens, top_k)
        return await respond(svc, request, req, ticket, chat=False, prompt_text=prompt_text)


def serve(model_spec: str | None, cfg: ServeConfig) -> None:
    """Serve `model_spec` ("embedded", a model dir or .gguf), or with `cfg.upstream` the gateway, until
    interrupted."""
    import uvicorn

    if cfg.upstream:
        from potstill.guard.gateway import create_gateway

        app = create_gateway(cfg)
    else:
        from potstill.teachers.hf import HFTeacher

        teacher = HFTeacher.load(model_spec, dtype="auto")  # bf16 where the CPU has it
        app = create_app(teacher, cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=30,
                **uvicorn_options())
