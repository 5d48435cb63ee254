"""The guard's ASGI middleware: body-size cap (413), bearer API keys (401), one query-log row per request.

It runs before FastAPI parses anything, so refused requests cost no model work and are still logged
with their status, latency and key (see guard/serve.py for the whole request path).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio

from potstill.guard.keys import KeyStore
from potstill.guard.openai_api import APIError
from potstill.guard.querylog import QueryLog

log = logging.getLogger("potstill.guard.serve")


class GuardMiddleware:
    """Pure ASGI middleware: 413 / 401 before the app runs; one query-log row per request."""

    def __init__(self, app, cfg, keys: KeyStore, querylog: QueryLog):
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
