"""The guard's ASGI middleware: body-size cap (413), one query-log row per request, refused prompts bounded.

It runs before FastAPI parses anything. A declared Content-Length over `max_body_bytes` is
refused at once; otherwise the body's bytes are counted as the app reads them, and the read
that passes the cap raises a 413. Nothing here reads the body or checks keys: authentication is
a route dependency that reads only the headers (guard/serve.py), so a request without a valid
key is answered 401 before its body is read. After the app returns, the request's cleanups run
(settling a ticket whose stream was cut, guard/service.py) and its row is recorded; the prompt
of a refused request (status >= 400) is stored as a bounded prefix with its length and sha256.

Each row records the client's address (`client_address`): the TCP peer, unless the peer is one
of `cfg.trusted_proxies`, in which case X-Forwarded-For is walked from the right past trusted
proxies to the first address they vouch for. A client that sends its own X-Forwarded-For
directly, or through a trusted proxy that appends to it, cannot choose the logged address.
uvicorn's own proxy-header rewriting is off (`uvicorn_options`), so the peer seen here is the
socket's.
"""

from __future__ import annotations

import hashlib
import inspect
import ipaddress
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import anyio

from potstill.guard.openai_api import APIError
from potstill.guard.querylog import QueryLog

log = logging.getLogger("potstill.guard.serve")

REFUSED_PROMPT_CHARS = 1024
"""Most prompt characters kept in the log row of a refused request."""


def bounded_prompt(prompt: Any, limit: int = REFUSED_PROMPT_CHARS) -> Any:
    """`prompt` itself when short, else {"truncated", "prefix", "chars", "sha256"} of its JSON text."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, default=str)
    if len(text) <= limit:
        return prompt
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return {"truncated": True, "prefix": text[:limit], "chars": len(text), "sha256": digest}


def uvicorn_options() -> dict[str, Any]:
    """uvicorn settings every guarded app runs with: the peer address untouched (the middleware decides
    whom to believe, from `trusted_proxies`), no Server header."""
    return {"proxy_headers": False, "server_header": False}


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def client_address(scope, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """The client's IP: the peer, or (peer a trusted proxy) the rightmost X-Forwarded-For entry that is not one."""
    peer = (scope.get("client") or (None,))[0]
    addr = _ip(peer) if peer else None
    if addr is None:
        return peer[:64] if peer else None
    hops = [h for k, v in scope.get("headers") or [] if k == b"x-forwarded-for"
            for h in v.decode("latin-1").split(",")]
    while any(addr in net for net in trusted) and hops:
        prior = _ip(hops.pop())
        if prior is None:  # garbage in the chain: believe no further than the last trusted hop
            break
        addr = prior
    return str(addr)


class GuardMiddleware:
    """Pure ASGI middleware: 413 on the body's size; one query-log row per request."""

    def __init__(self, app, cfg, querylog: QueryLog):
        self.app, self.cfg, self.querylog = app, cfg, querylog
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in getattr(cfg, "trusted_proxies", ())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"ts": time.time(), "method": scope["method"], "endpoint": scope["path"][:256],
                               "client": client_address(scope, self.trusted)}
        state = scope.setdefault("state", {})
        state["qlog"] = row
        started = False

        async def send_logged(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                row["status"] = msg["status"]
            await send(msg)

        limit = self.cfg.max_body_bytes
        too_big = APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
        received = 0

        async def capped():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise too_big
            return msg

        try:
            early = self._screen(scope, limit, too_big)
            if early is not None:
                row["error_type"] = early.log_type
                await early.response()(scope, receive, send_logged)
                return
            await self.app(scope, capped, send_logged)
        except Exception as err:
            log.exception("unhandled %s on %s %s", type(err).__name__, scope["method"], scope["path"][:256])
            row["error_type"] = "server_error"
            if started:
                raise
            await APIError(500, "internal server error", "server_error").response()(scope, receive, send_logged)
        finally:
            for cleanup in state.pop("cleanup", ()):
                done = cleanup()
                if inspect.isawaitable(done):  # e.g. the gateway closing its upstream stream
                    with anyio.CancelScope(shield=True):
                        await done
            row.setdefault("status", 499)
            if row["status"] >= 400 and row.get("prompt") is not None:
                row["prompt"] = bounded_prompt(row["prompt"])
            row["latency_ms"] = (time.perf_counter() - t0) * 1000
            self.querylog.record(row)

    @staticmethod
    def _screen(scope, limit: int, too_big: APIError) -> APIError | None:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is None:
            return None
        try:
            return too_big if int(declared) > limit else None
        except ValueError:
            return APIError(400, "invalid Content-Length header")
