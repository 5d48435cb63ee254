"""`potstill serve --upstream URL`: the guard in front of any OpenAI-compatible server, no model loaded here.

    from potstill.guard.gateway import create_gateway
    app = create_gateway(ServeConfig(upstream="http://10.0.0.5:8080/v1"))   # vLLM, llama.cpp, TGI, Ollama, ...

The same app skeleton as `potstill serve` (guard/app.py: keys from the headers before the body,
the middleware's one log row per request with the client address, /health) and the same
admission (guard/service.py: each key's log-prob allowance, also in llama.cpp/TGI/vLLM's own
fields, per-key concurrency, the in-flight bound, rate limits shared through the database) put
in front of `/v1/chat/completions`, `/v1/completions` and `/v1/models`, which are forwarded
(httpx, async) with the upstream's key (`ServeConfig.upstream_key_env`).

Metering without the model's tokenizer: a request is charged up front for `max_tokens` (set to
the server's cap when absent, so no upstream decodes unbounded) plus an estimate of its prompt
(UTF-8 bytes / 4 + 4 per message), then settled to what it used: the upstream's `usage` for a
whole answer; for a stream, the tokens in the events actually sent (guard/upstream.py,
`StreamMeter`), or the upstream's usage once the stream reached its end (the gateway asks for it
with `stream_options.include_usage` and drops that extra event if the client did not ask).
A client that leaves mid-stream is charged what was sent, its row says `client_closed` with the
partial completion, and the upstream connection is closed so the upstream stops decoding.
Upstream failures answer 502/503/504 (table in guard/upstream.py), never 500 or a hang: every
wait is bounded by `upstream_timeout_s` (connect, answer, each chunk) and by `request_timeout_s`.
Watermarking is the upstream's business; the log keeps every served completion for
`potstill detect --log-db` and the monitor.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from potstill.guard.app import (
    add_body_schemas,
    add_health_route,
    authenticator,
    base_app,
    body_schema,
    open_stores,
    parse_body,
    request_row,
)
from potstill.guard.keys import KeyStore
from potstill.guard.openai_api import (
    RESPONSES,
    SSE_DONE,
    APIError,
    ChatRequest,
    CompletionRequest,
    RequestBase,
)
from potstill.guard.querylog import QueryLog
from potstill.guard.serve_config import ServeConfig
from potstill.guard.service import Admission, Ticket, check_caps, check_key_logprobs, wait_or_leave
from potstill.guard.upstream import (
    StreamMeter,
    Upstream,
    bad_response,
    choice_text,
    first_choice,
    timed_out,
    transport_error,
    usage_of,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for /v1/completions (some upstreams would decode to the context's end)."""


def create_gateway(cfg: ServeConfig, *, keys: KeyStore | None = None, querylog: QueryLog | None = None,
                   limiter: Any = None) -> FastAPI:
    """The guarded gateway to `cfg.upstream`. Stores/limiter may be injected (tests)."""
    if not cfg.upstream:
        raise ValueError("create_gateway needs ServeConfig.upstream")
    stores = open_stores(cfg, keys, querylog, limiter)
    gate = Admission(cfg, stores.limiter)
    upstream = Upstream(cfg.upstream, os.environ.get(cfg.upstream_key_env) or None, cfg.upstream_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await upstream.aclose()
            stores.querylog.close()

    app = base_app(cfg, stores, lifespan, title="potstill gateway")
    app.state.gate, app.state.upstream = gate, upstream
    keyed = [Depends(authenticator(stores.keys))]
    add_health_route(app, stores.querylog, lambda: {"upstream": upstream.base, "in_flight": len(gate.open),
                                                    "max_pending": cfg.max_pending})

    @app.get("/v1/models", dependencies=keyed, responses={401: RESPONSES[401]})
    async def models():
        return await upstream.get_json("/models")

    @app.post("/v1/chat/completions", dependencies=keyed, responses=RESPONSES, openapi_extra=body_schema(ChatRequest))
    async def chat_completions(request: Request, req: ChatRequest = Depends(parse_body(ChatRequest))):
        return await forward(gate, upstream, request, req, chat=True)

    @app.post("/v1/completions", dependencies=keyed, responses=RESPONSES,
              openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request, req: CompletionRequest = Depends(parse_body(CompletionRequest))):
        return await forward(gate, upstream, request, req, chat=False)

    if cfg.docs:
        add_body_schemas(app)
    return app


def prompt_estimate(req: RequestBase, chat: bool) -> int:
    """Prompt tokens assumed before the upstream says: UTF-8 bytes / 4, + 4 per chat message."""
    if chat:
        return sum(4 + len(m.text().encode("utf-8", "surrogatepass")) // 4 for m in req.messages)
    prompt = req.prompt
    if isinstance(prompt, str):
        return 1 + len(prompt.encode("utf-8", "surrogatepass")) // 4
    if prompt and isinstance(prompt[0], str):
        return sum(1 + len(p.encode("utf-8", "surrogatepass")) // 4 for p in prompt)
    return sum(len(p) for p in prompt) if prompt and isinstance(prompt[0], list) else len(prompt)


async def forward(gate: Admission, upstream: Upstream, request: Request, req: RequestBase, *, chat: bool) -> Any:
    """Check, charge, forward; the upstream's answer (JSON or the SSE stream passed through)."""
    cfg = gate.cfg
    request.state.qlog.update(request_row(req, chat))
    check_key_logprobs(request, req, chat)  # the upstream is never asked for log-probs a key may not have
    top_k = ((req.top_logprobs or 0) if req.logprobs else 0) if chat else (req.logprobs or 0)
    max_tokens = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    check_caps(cfg, req, top_k, max_tokens)
    body = dict(request.state.body)
    if max_tokens is None:
        max_tokens = cfg.max_tokens_cap if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, cfg.max_tokens_cap)
        body["max_tokens"] = max_tokens
    estimate = prompt_estimate(req, chat)
    ticket = await gate.charge(request, estimate + max_tokens)
    ticket.started, ticket.text = True, ""
    deadline = time.monotonic() + cfg.request_timeout_s
    path = "/chat/completions" if chat else "/completions"
    if not req.stream:
        return await _whole(ticket, upstream, request, path, body, chat, estimate, deadline)
    client_usage = bool(req.stream_options and req.stream_options.include_usage)
    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    try:
        resp = await asyncio.wait_for(upstream.open_stream(path, body), max(0.0, deadline - time.monotonic()))
    except (TimeoutError, APIError) as err:
        ticket.close(None)  # refused before any token: nothing charged; the error names itself in the row
        raise (timed_out() if isinstance(err, TimeoutError) else err) from None

    async def close_upstream() -> None:
        await resp.aclose()  # the upstream stops decoding for a client that left

    request.state.cleanup.insert(0, close_upstream)
    return StreamingResponse(_relay(ticket, resp, chat, client_usage, estimate, deadline),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _whole(ticket: Ticket, upstream: Upstream, request: Request, path: str, body: dict, chat: bool,
                 estimate: int, deadline: float) -> Any:
    """A non-streamed answer: wait for the upstream (or the client leaving, or the deadline), settle, pass on."""
    call = asyncio.ensure_future(upstream.post_json(path, body))
    outcome = await wait_or_leave(request, call, max(0.0, deadline - time.monotonic()))
    if outcome != "done":  # the client left or the deadline passed: the prompt was sent, nothing delivered
        call.cancel()
        ticket.prompt_tokens = estimate
        if outcome == "gone":
            ticket.close("client_closed")
            return Response(status_code=499)
        ticket.close("deadline_exceeded")
        raise timed_out()
    try:
        data = call.result()
        choice = first_choice(data)
        if choice is None:
            raise bad_response("no choices")
    except APIError:
        ticket.close(None)  # the upstream failed or refused: nothing delivered, nothing charged
        raise
    usage = usage_of(data)
    ticket.text = choice_text(choice, chat)
    ticket.prompt_tokens, ticket.used = usage if usage else (estimate, ticket.max_tokens)  # no usage: the most
    ticket.row["tokens_in"], ticket.finished = ticket.prompt_tokens, True
    ticket.close(None)
    return JSONResponse(data)


async def _relay(ticket: Ticket, resp, chat: bool, client_usage: bool, estimate: int, deadline: float):
    """Pass the upstream's SSE events through one by one, metering each before it is sent."""
    meter = StreamMeter(chat)
    ticket.prompt_tokens = estimate
    error: APIError | None = None
    lines = resp.aiter_lines()
    try:
        try:
            while True:
                line = await _next_line(lines, deadline)
                if line is None:
                    raise bad_response("the stream ended before [DONE]")
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:`/`id:` fields
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = _event(data, meter)
                ticket.used, ticket.text = meter.tokens, meter.text
                if obj.get("choices") == [] and not client_usage:
                    continue  # the usage event the gateway asked for itself
                yield f"data: {data}\n\n"
        except APIError as err:
            error = err
            yield err.sse()
        if error is None and meter.usage is not None:  # reached the end: the upstream's own count
            ticket.prompt_tokens, ticket.used = meter.usage
        ticket.row["tokens_in"] = ticket.prompt_tokens
        yield SSE_DONE
        ticket.finished = True
    finally:
        if error is not None:
            ticket.row["error_type"] = error.log_type
        ticket.row.setdefault("tokens_in", ticket.prompt_tokens)
        ticket.close("client_closed")


async def _next_line(lines, deadline: float) -> str | None:
    """The upstream's next line (None at its end); 504 past the deadline, 502/503/504 when the read fails."""
    try:
        return await asyncio.wait_for(lines.__anext__(), max(0.0, deadline - time.monotonic()))
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise timed_out() from None
    except Exception as err:  # httpx: read timeout, connection cut, ...
        raise transport_error(err) from None


def _event(data: str, meter: StreamMeter) -> dict[str, Any]:
    """One upstream event, metered; 502 for one that is not a JSON chunk, or the upstream's error event."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise bad_response("a stream event that is not JSON") from None
    if not isinstance(obj, dict):
        raise bad_response("a stream event that is not a JSON object")
    if "error" in obj:
        raise APIError(502, str(obj["error"])[:500], type="server_error", code="upstream_error")
    meter.add(obj)
    return obj
