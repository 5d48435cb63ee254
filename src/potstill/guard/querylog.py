"""The query log: one row per HTTP request the server answered, whatever its outcome.

Rows go through a queue to one writer thread, which inserts them in batches (SQLAlchemy Core),
so the event loop never waits on the database. `flush()` waits for the queue to drain and
`close()` flushes and stops the writer; a row recorded after `close()` is written
synchronously, so every request is logged exactly once. SQLite files run in WAL mode (readers
such as `potstill monitor` never block the server); any SQLAlchemy URL works (PostgreSQL at
scale).

    log = QueryLog("sqlite:///queries.db")      # or a plain path
    log.record({"key_id": "k1", "endpoint": "/v1/chat/completions", "status": 200, ...})
    log.close()
    rows = read_log("queries.db")                # list of dicts, prompt/params decoded
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

metadata = MetaData()
queries = Table(
    "queries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False, index=True),  # unix seconds when the request arrived
    Column("key_id", String(64), index=True),  # None when no valid key was presented
    Column("method", String(16)),
    Column("endpoint", String(256)),
    Column("model", String(256)),
    Column("prompt", Text),  # JSON: chat messages, a prompt string or a token-id list
    Column("params", Text),  # JSON: sampling params as requested
    Column("tokens_in", Integer),
    Column("tokens_out", Integer),
    Column("logprobs", Boolean),
    Column("top_logprobs", Integer),
    Column("latency_ms", Float),
    Column("status", Integer, index=True),
    Column("error_type", String(64)),
    Column("completion", Text),  # the text served (evidence for `potstill detect --log-db`)
)

FIELDS = [c.name for c in queries.columns if c.name != "id"]
_STOP = object()


def db_url(spec: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a plain file path (-> SQLite)."""
    spec = str(spec)
    if "://" in spec:
        return spec
    return f"sqlite:///{Path(spec).expanduser().resolve()}"


def make_engine(spec: str | Path) -> Engine:
    """An engine for `spec`; SQLite gets WAL, a busy timeout and cross-thread connections."""
    url = make_url(db_url(spec))
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    memory = url.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    if memory:
        kwargs["poolclass"] = StaticPool
    else:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    out = {f: row.get(f) for f in FIELDS}
    if out["ts"] is None:
        out["ts"] = time.time()
    for f in ("prompt", "params"):
        if out[f] is not None and not isinstance(out[f], str):
            out[f] = json.dumps(out[f], ensure_ascii=False, default=str)
    if out["logprobs"] is not None:
        out["logprobs"] = bool(out["logprobs"])
    return out


class QueryLog:
    """Asynchronous, exactly-once writer of query-log rows."""

    def __init__(self, url: str | Path, batch_size: int = 512):
        self.url = db_url(url)
        self.engine = make_engine(self.url)
        metadata.create_all(self.engine)
        self.batch_size = batch_size
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="potstill-querylog", daemon=True)
        self._thread.start()

    def record(self, row: dict[str, Any]) -> None:
        """Queue one row (fields as in the `queries` table; prompt/params may be objects)."""
        row = _normalise(row)
        with self._lock:
            if not self._closed:
                self._queue.put(row)
                return
        self._write([row])

    def flush(self) -> None:
        """Block until every row recorded so far is in the database."""
        self._queue.join()

    def close(self) -> None:
        """Flush and stop the writer thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch, stop = ([], True) if item is _STOP else ([item], False)
            while not stop and len(batch) < self.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    self._queue.task_done()
                    break
                batch.append(nxt)
            try:
                if batch:
                    self._write(batch)
            finally:
                for _ in range(len(batch) if item is not _STOP else 1):
                    self._queue.task_done()
            if stop:
                return

    def _write(self, rows: list[dict[str, Any]]) -> None:
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(queries), rows)
                return
            except Exception as err:  # a locked or unreachable database: retry, then report
                if attempt == 4:
                    log.error("query log: dropped %d rows after 5 attempts: %s", len(rows), type(err).__name__)
                    return
                time.sleep(0.05 * 2**attempt)


def read_log(
    url: str | Path, since: float | None = None, until: float | None = None, key_id: str | None = None
) -> list[dict[str, Any]]:
    """All rows (oldest first) as dicts, `prompt` and `params` decoded from JSON."""
    engine = make_engine(url)
    try:
        metadata.create_all(engine)
        stmt = select(queries).order_by(queries.c.id)
        if since is not None:
            stmt = stmt.where(queries.c.ts >= since)
        if until is not None:
            stmt = stmt.where(queries.c.ts < until)
        if key_id is not None:
            stmt = stmt.where(queries.c.key_id == key_id)
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
    finally:
        engine.dispose()
    for r in rows:
        for f in ("prompt", "params"):
            if r[f] is not None:
                try:
                    r[f] = json.loads(r[f])
                except ValueError:
                    pass
    return rows
