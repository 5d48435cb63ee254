"""Rate limits shared by every worker and replica: the token buckets of `ratelimit.py`, kept in the database.

With `RateLimiter` each process has its own buckets, so N workers (or replicas, or a restart)
give a key N times its limit. `SharedRateLimiter` keeps each bucket as a row of `rate_buckets`
in the key store's database (SQLite or PostgreSQL) and changes it with one conditional UPDATE
per bucket, inside one transaction per call:

    UPDATE rate_buckets SET level = refilled - :amount, updated = :now
     WHERE key_id = :k AND kind = :kind AND refilled >= :amount

where `refilled` is the level refilled up to now, computed in SQL. The database serialises
concurrent writers (SQLite's write lock, PostgreSQL's row lock, which re-checks the WHERE after
a concurrent commit), so no two processes can spend the same allowance. Acquiring charges the
request bucket and then the token bucket; if either does not fit, the transaction rolls back
(both or neither). Time is wall-clock seconds (`time.time`), the same in every process on a
machine; replicas on several machines need synchronised clocks (NTP), and a clock behind a
bucket's last update only stops its refill. Same interface and semantics as `RateLimiter`.

    limiter = SharedRateLimiter(make_engine("keys.db"), rpm=60, tpm=10_000)
    res = limiter.acquire("k1", tokens=120)       # RateLimited(retry_after=...) when over
    limiter.settle(res, used_tokens=40)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from sqlalchemy import Column, Float, MetaData, String, Table, text
from sqlalchemy.engine import Connection, Engine

from potstill.guard.ratelimit import Reservation, too_large, too_soon

metadata = MetaData()
buckets = Table(
    "rate_buckets",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("kind", String(8), primary_key=True),  # requests | tokens
    Column("capacity", Float, nullable=False),  # the per-minute limit; refills at capacity/60 per second
    Column("level", Float, nullable=False),  # may go below 0 when a request used more than it reserved
    Column("updated", Float, nullable=False),  # unix seconds of the last refill
)


# Plain SQL (prepared once; SQLite and PostgreSQL both take it): `level` refilled up to :now, never above
# capacity; a clock behind the bucket's last update adds nothing.
_ELAPSED = "(CASE WHEN updated < :now THEN :now - updated ELSE 0.0 END)"
_GROWN = f"(level + {_ELAPSED} * capacity / 60.0)"
_REFILLED = f"(CASE WHEN {_GROWN} > capacity THEN capacity ELSE {_GROWN} END)"
_LATER = "(CASE WHEN updated < :now THEN :now ELSE updated END)"
_WHERE = "key_id = :key_id AND kind = :kind"
_SQL = {
    "take": text(f"UPDATE rate_buckets SET level = {_REFILLED} - :amount, updated = {_LATER} "
                 f"WHERE {_WHERE} AND {_REFILLED} >= :amount"),
    "give": text(f"UPDATE rate_buckets SET level = CASE WHEN {_REFILLED} + :amount > capacity THEN capacity "
                 f"ELSE {_REFILLED} + :amount END, updated = {_LATER} WHERE {_WHERE}"),
    # a changed limit: raised -> the difference is available now; lowered -> the level is clamped
    "resize": text(f"UPDATE rate_buckets SET level = CASE WHEN capacity < :limit THEN {_REFILLED} + :limit - capacity "
                   f"WHEN {_REFILLED} > :limit THEN :limit ELSE {_REFILLED} END, capacity = :limit, "
                   f"updated = {_LATER} WHERE {_WHERE} AND capacity <> :limit"),
    "state": text(f"SELECT {_REFILLED}, capacity FROM rate_buckets WHERE {_WHERE}"),
    "create": text("INSERT INTO rate_buckets (key_id, kind, capacity, level, updated) VALUES "
                   "(:key_id, :kind, :limit, :limit, :now) ON CONFLICT DO NOTHING"),
    "create_portable": text("INSERT INTO rate_buckets (key_id, kind, capacity, level, updated) SELECT "
                            ":key_id, :kind, :limit, :limit, :now WHERE NOT EXISTS "
                            f"(SELECT 1 FROM rate_buckets WHERE {_WHERE})"),
}


class SharedRateLimiter:
    """Per-key request and token buckets in a SQL database. A limit of None means unlimited."""

    blocking = True
    """Calls wait on the database: the server makes them from a worker thread."""

    def __init__(self, engine: Engine, rpm: int | None = None, tpm: int | None = None,
                 clock: Callable[[], float] = time.time):
        self.engine, self.default_rpm, self.default_tpm, self.clock = engine, rpm, tpm, clock
        metadata.create_all(engine)

    def limits(self, rpm: int | None = None, tpm: int | None = None) -> tuple[int | None, int | None]:
        """A key's effective limits: its own where set, else the defaults."""
        return (rpm if rpm is not None else self.default_rpm, tpm if tpm is not None else self.default_tpm)

    def acquire(self, key_id: str, tokens: int, rpm: int | None = None, tpm: int | None = None) -> Reservation:
        """Charge one request and `tokens` tokens to `key_id`, or raise RateLimited."""
        rpm, tpm = self.limits(rpm, tpm)
        if tpm is not None and tokens > tpm:
            raise too_large(tokens, tpm)
        if rpm is None and tpm is None:
            return Reservation(key_id, tokens, metered=False)  # unlimited: no database work
        now = self.clock()
        with self.engine.begin() as conn:
            took = [self._take(conn, key_id, kind, limit, amount, now)
                    for kind, limit, amount in (("requests", rpm, 1), ("tokens", tpm, tokens)) if limit is not None]
            if not all(took):
                waits = {kind: self._wait(conn, key_id, kind, amount, now)
                         for kind, limit, amount in (("requests", rpm, 1), ("tokens", tpm, tokens))
                         if limit is not None}
                kind = max(waits, key=waits.get)
                conn.rollback()  # both or neither
                raise too_soon(kind, rpm if kind == "requests" else tpm, waits[kind])
        return Reservation(key_id, tokens, metered=tpm is not None)

    def resize(self, reservation: Reservation, tokens: int) -> None:
        """Change what `reservation` holds to `tokens`, or raise RateLimited (the reservation unchanged)."""
        extra = tokens - reservation.tokens
        if reservation.metered and not reservation.settled and extra != 0:
            now = self.clock()
            with self.engine.begin() as conn:
                if extra > 0:
                    capacity = self._capacity(conn, reservation.key_id, now)
                    if capacity is not None and tokens > capacity:
                        raise too_large(tokens, int(capacity))
                    if not self._take(conn, reservation.key_id, "tokens", None, extra, now):
                        wait = self._wait(conn, reservation.key_id, "tokens", extra, now)
                        raise too_soon("tokens", int(capacity or 0), wait)
                else:
                    self._give(conn, reservation.key_id, -extra, now)
        reservation.tokens = tokens

    def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Refund the tokens charged but not used, or charge those used beyond it (once per reservation)."""
        if reservation.settled:
            return
        reservation.settled = True
        refund = reservation.tokens - max(0, used_tokens)
        if reservation.metered and refund != 0:
            with self.engine.begin() as conn:
                self._give(conn, reservation.key_id, refund, self.clock())

    def level(self, key_id: str, kind: str = "tokens") -> float | None:
        """The bucket's level now (None before the key's first metered request)."""
        with self.engine.connect() as conn:
            state = self._state(conn, key_id, kind, self.clock())
        return None if state is None else state[0]

    # ---- one bucket, inside the caller's transaction -----------------------------------------
    def _take(self, conn: Connection, key_id: str, kind: str, limit: int | None, amount: float, now: float) -> bool:
        """Take `amount` if the refilled level has it (creating/resizing the bucket to `limit` first)."""
        if limit is not None:  # the first statement writes: SQLite takes its write lock here, before any read
            create = "create" if conn.dialect.name in ("sqlite", "postgresql") else "create_portable"
            args = {"key_id": key_id, "kind": kind, "limit": float(limit), "now": now}
            conn.execute(_SQL[create], args)
            conn.execute(_SQL["resize"], args)
        n = conn.execute(_SQL["take"], {"key_id": key_id, "kind": kind, "amount": amount, "now": now}).rowcount
        return n == 1 or (limit is None and self._state(conn, key_id, kind, now) is None)

    def _give(self, conn: Connection, key_id: str, amount: float, now: float) -> None:
        """Add `amount` (negative: charge it, the level may go below 0), never above capacity."""
        conn.execute(_SQL["give"], {"key_id": key_id, "kind": "tokens", "amount": amount, "now": now})

    @staticmethod
    def _state(conn: Connection, key_id: str, kind: str, now: float) -> tuple[float, float] | None:
        row = conn.execute(_SQL["state"], {"key_id": key_id, "kind": kind, "now": now}).first()
        return None if row is None else (float(row[0]), float(row[1]))

    def _capacity(self, conn: Connection, key_id: str, now: float) -> float | None:
        state = self._state(conn, key_id, "tokens", now)
        return None if state is None else state[1]

    def _wait(self, conn: Connection, key_id: str, kind: str, amount: float, now: float) -> float:
        state = self._state(conn, key_id, kind, now)
        if state is None:
            return 0.0
        level, capacity = state
        if amount > capacity:
            return math.inf
        return max(0.0, (amount - level) / (capacity / 60.0))
