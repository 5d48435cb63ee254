"""Per-key token buckets for requests/minute and tokens/minute.

Each key has two buckets whose capacity is its per-minute limit and which refill continuously
at limit/60 per second, so a key may burst up to one minute's allowance and then sustains its
limit. A request is charged 1 request and `prompt + max_tokens` tokens up front (both or
neither); when it finishes, `settle` refunds the tokens it did not generate. These buckets live
in this process; `sharedlimit.SharedRateLimiter` keeps the same buckets in a database, shared by
every worker and replica (`ServeConfig.shared_limits`, the default). Limits are read
per call, so a changed limit (`KeyStore.set_limits`, `monitor.throttle`) applies at once.

    limiter = RateLimiter(rpm=60, tpm=10_000, clock=fake_clock)
    res = limiter.acquire("k1", tokens=120)       # raises RateLimited(retry_after=...) when over
    limiter.settle(res, used_tokens=40)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_RPM = 600
"""Requests per minute for keys without their own limit (ServeConfig.default_rpm)."""
DEFAULT_TPM = 200_000
"""Tokens per minute for keys without their own limit (ServeConfig.default_tpm)."""


class RateLimited(Exception):
    """Over a limit: retry after `retry_after` whole seconds (>= 1)."""

    def __init__(self, message: str, retry_after: int, limit: str):
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit  # "requests" | "tokens"


def too_large(tokens: int, tpm: int) -> RateLimited:
    """A request that can never fit this key's tokens-per-minute limit."""
    return RateLimited(
        f"Request too large: it needs {tokens} tokens (prompt + max_tokens) but this key's "
        f"limit is {tpm} tokens per minute; lower max_tokens or shorten the prompt.",
        retry_after=60, limit="tokens")


def too_soon(kind: str, limit: int | None, wait: float) -> RateLimited:
    """Over the `kind` ("requests" | "tokens") limit for `wait` more seconds."""
    retry = max(1, math.ceil(wait)) if math.isfinite(wait) else 60
    return RateLimited(f"Rate limit reached for {kind} per minute (limit {limit}); retry in {retry} s.",
                       retry_after=retry, limit=kind)


class TokenBucket:
    """Capacity `capacity`, refilled at capacity/60 per second."""

    def __init__(self, capacity: float, now: float):
        self.capacity = float(capacity)
        self.level = float(capacity)
        self.updated = now

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def resize(self, capacity: float) -> None:
        """Change the limit: raising it adds the difference now; lowering it clamps the level."""
        capacity = float(capacity)
        self.level = min(self.level + max(0.0, capacity - self.capacity), capacity)
        self.capacity = capacity

    def wait(self, amount: float) -> float:
        """Seconds until `amount` is available (inf if it never fits)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)


@dataclass
class Reservation:
    """What one admitted request was charged."""

    key_id: str
    tokens: int
    settled: bool = False
    metered: bool = True
    """Whether a token bucket was charged (False: the key's tokens are unlimited)."""


class RateLimiter:
    """Thread-safe per-key request and token buckets. A limit of None means unlimited."""

    def __init__(self, rpm: int | None = None, tpm: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.default_rpm = rpm
        self.default_tpm = tpm
        self.clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def limits(self, rpm: int | None = None, tpm: int | None = None) -> tuple[int | None, int | None]:
        """A key's effective limits: its own where set, else the defaults."""
        return (rpm if rpm is not None else self.default_rpm, tpm if tpm is not None else self.default_tpm)

    def acquire(self, key_id: str, tokens: int, rpm: int | None = None, tpm: int | None = None) -> Reservation:
        """Charge one request and `tokens` tokens to `key_id`, or raise RateLimited."""
        rpm, tpm = self.limits(rpm, tpm)
        with self._lock:
            now = self.clock()
            req = self._bucket(self._requests, key_id, rpm, now)
            tok = self._bucket(self._tokens, key_id, tpm, now)
            if tok is not None and tokens > tok.capacity:
                raise too_large(tokens, tpm)
            wait_req = req.wait(1) if req is not None else 0.0
            wait_tok = tok.wait(tokens) if tok is not None else 0.0
            if wait_req > 0 or wait_tok > 0:
                kind, limit = ("requests", rpm) if wait_req >= wait_tok else ("tokens", tpm)
                raise too_soon(kind, limit, max(wait_req, wait_tok))
            if req is not None:
                req.level -= 1
            if tok is not None:
                tok.level -= tokens
        return Reservation(key_id, tokens)

    def resize(self, reservation: Reservation, tokens: int) -> None:
        """Change what `reservation` holds to `tokens` (once the prompt is tokenised), or raise RateLimited.

        Growing it needs the difference available now; on RateLimited the reservation is unchanged
        (the request stays counted; `settle` refunds its tokens).
        """
        with self._lock:
            extra = tokens - reservation.tokens
            tok = self._tokens.get(reservation.key_id)
            if tok is not None and not reservation.settled:
                tok.refill(self.clock())
                if extra > 0:
                    if tokens > tok.capacity:
                        raise too_large(tokens, int(tok.capacity))
                    wait = tok.wait(extra)
                    if wait > 0:
                        raise too_soon("tokens", int(tok.capacity), wait)
                tok.level = min(tok.capacity, tok.level - extra)
            reservation.tokens = tokens

    def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Refund the tokens charged up front but not used, or charge those used beyond it (a gateway's
        upstream may report more than was reserved; the level may go below 0). Once per reservation."""
        with self._lock:
            if reservation.settled:
                return
            reservation.settled = True
            refund = reservation.tokens - max(0, used_tokens)
            tok = self._tokens.get(reservation.key_id)
            if tok is not None and refund != 0:
                tok.refill(self.clock())
                tok.level = min(tok.capacity, tok.level + refund)

    def level(self, key_id: str, kind: str = "tokens") -> float | None:
        """The bucket's level now (None before the key's first metered request)."""
        with self._lock:
            bucket = (self._tokens if kind == "tokens" else self._requests).get(key_id)
            if bucket is None:
                return None
            bucket.refill(self.clock())
            return bucket.level

    def _bucket(self, buckets: dict[str, TokenBucket], key_id: str, limit: int | None, now: float):
        if limit is None:
            buckets.pop(key_id, None)
            return None
        bucket = buckets.get(key_id)
        if bucket is None:
            bucket = buckets[key_id] = TokenBucket(limit, now)
        elif bucket.capacity != limit:
            bucket.refill(now)
            bucket.resize(limit)
        bucket.refill(now)
        return bucket
