"""The HTTP teacher's transport: a private event loop, requests/s pacing, retries and a disk cache.

Requests go out from a private event loop on a daemon thread (`httpx.AsyncClient`, keep-alive across
calls), at most `concurrency` in flight for the whole teacher (whichever threads call it), optionally
paced by a requests/s token bucket. 429, 408, 5xx, timeouts and connection errors are retried with
exponential backoff and full jitter, honouring `Retry-After` (seconds or an HTTP date; also
`retry-after-ms`); any other 4xx fails at once with the server's own message. Successful responses
can be cached on disk (`ResponseCache`: one JSON file per request keyed by the sha256 of the canonical
request), so a resumed capture does not pay twice. What the responses mean is `http_dialects.py`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from potstill.errors import PotstillError
from potstill.utils import atomic_path, sha256_text

log = logging.getLogger("potstill.teachers.http")  # one logger for the HTTP teacher, whichever half speaks

ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}
RETRY_AFTER_MAX = 300.0  # never sleep longer than this on one Retry-After


def retryable(status: int) -> bool:
    """429 (rate limited), 408 (request timeout) and every 5xx are worth another try."""
    return status in (408, 429) or status >= 500


def retry_after_seconds(headers: httpx.Headers | dict, now: datetime | None = None) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    headers = httpx.Headers(headers)
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def redact_url(url: str) -> str:
    """The URL without user:password and query string (it may hold keys): safe for logs and manifests."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class ResponseCache:
    """Successful responses on disk, one JSON file {request, response} per canonical request."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @staticmethod
    def key(endpoint: str, body: dict) -> str:
        canonical = json.dumps({"endpoint": endpoint, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return sha256_text(canonical)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text())["response"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, body: dict, data: dict) -> None:
        with atomic_path(self.path(key)) as tmp:
            tmp.write_text(json.dumps({"request": body, "response": data}, ensure_ascii=False))


class _Runner:
    """A private event loop on a daemon thread, with the teacher's client and concurrency semaphore."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="potstill-http", daemon=True)
        self.thread.start()
        self.pid = os.getpid()
        self.client: httpx.AsyncClient | None = None
        self.sem: asyncio.Semaphore | None = None

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive() and not self.loop.is_closed()

    def run(self, coro):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def shutdown(self) -> None:
        if not self.alive():
            return

        async def _close():
            if self.client is not None:
                await self.client.aclose()
            self.loop.stop()

        if threading.current_thread() is self.thread:  # collected on its own loop: just stop it
            self.loop.call_soon(self.loop.stop)
            return
        asyncio.run_coroutine_threadsafe(_close(), self.loop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class _TokenBucket:
    """Requests/s pacing shared by every caller of one teacher (reservations: no thundering herd)."""

    def __init__(self, rate: float, burst: float = 1.0):
        self.rate = float(rate)
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def reserve(self) -> float:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= 1.0
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


def _no_count(key: str, n: int = 1) -> None:
    return None


class Transport:
    """POSTs JSON bodies to one OpenAI-compatible server: bounded, paced, retried, optionally cached.

    `root` is the base URL with credentials in its netloc (never logged), `url` the redacted endpoint
    URL used in messages; `count(stat, n)` tallies requests, retries and cache hits.
    """

    def __init__(self, root: str, query: str, url: str, *, api_key: str | None, concurrency: int, max_retries: int,
                 timeout: float, rate_limit_rps: float | None, backoff_base: float, backoff_max: float,
                 cache_dir: str | os.PathLike | None = None, count: Callable[..., None] = _no_count):
        self.root, self.query, self.url = root, query, url
        self.api_key = api_key
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None
        self.count = count
        self.bucket = _TokenBucket(rate_limit_rps) if rate_limit_rps else None
        self.runner: _Runner | None = None
        self._runner_lock = threading.Lock()
        self._finalizer = None

    # ---- request pieces ---------------------------------------------------------------------------
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def endpoint_url(self, suffix: str) -> str:
        return self.root + suffix + (f"?{self.query}" if self.query else "")

    def redact(self, text: str) -> str:
        if self.api_key:
            text = text.replace(self.api_key, "***")
        return text

    def error_message(self, resp: httpx.Response) -> str:
        """The server's own error message, on one line."""
        msg = None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict):
                msg = err.get("message") or err.get("msg")
            elif isinstance(err, str):
                msg = err
            msg = msg or data.get("detail") or data.get("message")
            if msg is not None and not isinstance(msg, str):
                msg = json.dumps(msg)
        if not msg:
            msg = resp.text or resp.reason_phrase or ""
        return self.redact(" ".join(str(msg).split()))[:300]

    def backoff(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.backoff_max, self.backoff_base * (2.0**attempt)))

    # ---- sending ----------------------------------------------------------------------------------
    async def post(self, client: httpx.AsyncClient, suffix: str, body: dict) -> dict:
        """One JSON response for `body`, retrying what is worth retrying; PotstillError otherwise."""
        url = self.endpoint_url(suffix)
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if self.bucket is not None:
                await self.bucket.acquire()
            self.count("requests")
            delay = None
            try:
                resp = await client.post(url, json=body)
            except httpx.TransportError as e:  # timeouts, refused/reset connections, protocol errors
                last = self.redact(f"{type(e).__name__}: {e}".strip().rstrip(":"))
            else:
                if resp.status_code < 300:
                    try:
                        data = resp.json()
                    except ValueError:
                        last = f"HTTP {resp.status_code} with a body that is not JSON"
                    else:
                        if isinstance(data, dict) and data.get("error") and not data.get("choices"):
                            raise PotstillError(f"{self.url}: server error: {self.error_message(resp)}")
                        return data
                elif retryable(resp.status_code):
                    last = f"HTTP {resp.status_code} ({self.error_message(resp)})"
                    ra = retry_after_seconds(resp.headers)
                    if ra is not None:
                        delay = min(ra, RETRY_AFTER_MAX) + random.uniform(0.0, 0.05 * min(ra, RETRY_AFTER_MAX))
                else:
                    raise PotstillError(f"{self.url}: HTTP {resp.status_code}: {self.error_message(resp)}")
            if attempt == self.max_retries:
                break
            delay = self.backoff(attempt) if delay is None else delay
            self.count("retries")
            log.info("%s: %s; retry %d/%d in %.2fs", self.url, last, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
        raise PotstillError(f"{self.url}: gave up after {self.max_retries + 1} attempts (max_retries={self.max_retries}); last: {last}")

    async def one(self, endpoint: str, body: dict, check: Callable[[dict], Any]) -> dict:
        """The response for `body` from the cache, else from the server (`check`ed, then cached)."""
        key = ResponseCache.key(endpoint, body)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            self.count("cache_hits")
            return cached
        runner = self.runner
        assert runner is not None and runner.sem is not None and runner.client is not None
        async with runner.sem:
            data = await self.post(runner.client, ENDPOINTS[endpoint], body)
        try:
            check(data)
        except ValueError as e:
            raise PotstillError(f"{self.url}: unexpected response ({e}): {self.redact(json.dumps(data)[:200])}") from None
        if self.cache is not None:
            self.cache.put(key, body, data)
        return data

    # ---- the loop the sync API runs on ------------------------------------------------------------
    def get_runner(self, owner: object) -> _Runner:
        """The live loop (a new one after close or fork), stopped when `owner` is collected."""
        with self._runner_lock:
            if self.runner is None or not self.runner.alive():
                self.runner = _Runner()
                self._finalizer = weakref.finalize(owner, _Runner.shutdown, self.runner)
            return self.runner

    async def client(self) -> httpx.AsyncClient:
        """The loop's client and semaphore, created on first use (on the loop itself)."""
        runner = self.runner
        assert runner is not None
        if runner.client is None:
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            runner.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), limits=limits, headers=self.headers())
            runner.sem = asyncio.Semaphore(self.concurrency)
        return runner.client

    def close(self) -> None:
        with self._runner_lock:
            if self._finalizer is not None:
                self._finalizer()
            self.runner = None
            self._finalizer = None
