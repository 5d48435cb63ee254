"""The query log: one row per HTTP request the server answered, whatever its outcome.

Rows go through a bounded queue to one writer thread, which inserts them in batches (SQLAlchemy
Core), so the event loop never waits on the database. `flush()` waits for the queue to drain and
`close()` flushes and stops the writer; a row recorded after `close()` is written synchronously,
so every request is logged exactly once. A batch the database refuses is retried row by row:
text no database takes (lone surrogates; NUL, which PostgreSQL refuses) is escaped beforehand,
prompt/params are stored as ASCII JSON with the prompt's kind (chat/text/ids/batch), so one bad
row never drops others. Rows are hash-chained and checkpointed under the log key
(guard/logchain.py; `potstill log verify`). `health()` reports the queue depth and failures
(`/health`). A log made by an older potstill is migrated at start-up. SQLite files run in WAL
mode (readers such as `potstill monitor` never block the server); any SQLAlchemy URL works
(PostgreSQL at scale, tested against a real server).

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
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError

from potstill.errors import PotstillError
from potstill.guard.db import (  # re-exported: keys.py and tools import them from here
    add_missing_columns,
    db_url,
    make_engine,
)
from potstill.guard.logchain import GENESIS, checkpoint_mac, load_log_key, row_mac

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
    Column("completion_ids", Text),  # JSON: the token ids served (detection scores exactly these)
    Column("prompt_kind", String(16)),  # chat | text | ids | batch | json (see `prompt_kind`)
    Column("seq", BigInteger, unique=True, index=True),  # place in the hash chain (None: legacy rows)
    Column("mac", String(64)),  # HMAC chaining this row to the previous one (guard/logchain.py)
    Column("client", String(64), index=True),  # the client's IP address (X-Forwarded-For only from a trusted proxy)
)
log_head = Table(  # one row: the chain's head; writers lock it to append in order
    "log_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("mac", String(64), nullable=False),
)
servers = Table(  # each server start: its public config (limits), so tools such as `monitor` use them
    "log_servers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("config", Text, nullable=False),
)
checkpoints = Table(  # signed (seq, head mac) pairs: catch rows cut off the end of the log
    "log_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("head", String(64), nullable=False),
    Column("mac", String(64), nullable=False),
)

FIELDS = [c.name for c in queries.columns if c.name not in ("id", "seq", "mac")]  # `client`: ADDED_FIELDS
CHAINED = FIELDS
"""The fields each row's chain MAC covers (with its seq and the previous MAC)."""
_STOP = object()
_LENGTHS = {c.name: c.type.length for c in queries.columns if isinstance(c.type, String) and c.type.length}
_FLOATS = ("ts", "latency_ms")
_JSON = ("prompt", "params", "completion_ids")
_INTS = ("tokens_in", "tokens_out", "top_logprobs", "status")


def ensure_schema(engine: Engine) -> None:
    """Create the tables, or migrate a log from an older potstill (adds the missing nullable columns).

    A `queries` table that is not a potstill log (no ts/prompt/status) is refused with a one-line error.
    """
    insp = inspect(engine)
    if insp.has_table("queries"):
        have = {c["name"] for c in insp.get_columns("queries")}
        lacking = [n for n in ("id", "ts", "prompt", "status") if n not in have]
        if lacking:
            raise PotstillError(f"table 'queries' is not a potstill query log (no column {', '.join(lacking)}); "
                                "point --log-db at another database", where=engine.url.render_as_string())
        added = add_missing_columns(engine, queries)
        if added:
            log.warning("query log: migrated an older schema (added %s)", ", ".join(added))
    metadata.create_all(engine)
    try:
        with engine.begin() as conn:
            if conn.execute(select(log_head.c.id).where(log_head.c.id == 1)).first() is None:
                last = conn.execute(select(queries.c.seq, queries.c.mac).where(queries.c.seq.is_not(None))
                                    .order_by(queries.c.seq.desc()).limit(1)).first()
                seq, mac = (int(last.seq), last.mac) if last is not None else (0, GENESIS)
                conn.execute(insert(log_head).values(id=1, seq=seq, mac=mac))
    except IntegrityError:  # another process created the head first
        pass


def prompt_kind(prompt: Any) -> str | None:
    """chat (messages), text (a string), ids (token ids), batch (several prompts), json (anything else)."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, list):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return "ids"
        if all(isinstance(m, dict) for m in prompt):
            return "chat"
        if all(isinstance(p, (str, list)) for p in prompt):
            return "batch"
    return "json"


def _clean(value: str, limit: int | None) -> str:
    """Text any database stores: lone surrogates and NUL escaped (backslash form), cut to the column."""
    if "\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return value[:limit] if limit else value


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    """The row as it will be stored: JSON (ASCII) prompt/params, clean strings, exact number types."""
    out = {f: row.get(f) for f in FIELDS}
    if out["ts"] is None:
        out["ts"] = time.time()
    if out["prompt_kind"] is None:
        out["prompt_kind"] = prompt_kind(out["prompt"])
    for f in _JSON:
        if out[f] is not None:
            out[f] = json.dumps(out[f], ensure_ascii=True, default=str)
    for f, v in out.items():
        if isinstance(v, str) and f not in _JSON:
            out[f] = _clean(v, _LENGTHS.get(f))
        elif v is not None and f in _FLOATS:
            out[f] = float(v)
        elif v is not None and f in _INTS:
            out[f] = int(v)
    if out["logprobs"] is not None:
        out["logprobs"] = bool(out["logprobs"])
    return out


class QueryLog:
    """Asynchronous, exactly-once, hash-chained writer of query-log rows.

    `key` is the log key (see guard/logchain.py; None -> $POTSTILL_LOG_KEY or the home key file).
    At most `max_pending` rows wait in memory; beyond that a row is dropped and counted, and
    `health()` says so. `health()["ok"]` is False while writes fail or the queue is over 80 % full.
    """

    def __init__(self, url: str | Path, batch_size: int = 512, key=None, max_pending: int = 10_000,
                 checkpoint_every: int = 1000, checkpoint_seconds: float = 60.0):
        from potstill.guard.keymat import Secret

        self.url = db_url(url)
        self._key = key if isinstance(key, Secret) else load_log_key(key)
        self.engine = make_engine(self.url)
        ensure_schema(self.engine)
        self.batch_size, self.max_pending = batch_size, max_pending
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, checkpoint_seconds
        self._ckpt_seq, self._ckpt_time, self._head_seq = 0, time.monotonic(), 0
        self.written = self.dropped = self._in_flight = 0
        self.failing, self.last_error = False, None
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="potstill-querylog", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"QueryLog({make_url(self.url).render_as_string(hide_password=True)!r})"

    def record(self, row: dict[str, Any]) -> None:
        """Queue one row (fields as in the `queries` table; prompt/params may be objects)."""
        row = _normalise(row)
        with self._lock:
            if not self._closed:
                try:
                    self._queue.put_nowait(row)
                except queue.Full:
                    self.dropped += 1
                    if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8, ...: visible, not a flood
                        log.error("query log: queue full (%d rows); %d rows dropped so far", self.max_pending,
                                  self.dropped)
                return
        self._write([row])

    def record_server(self, config: dict[str, Any]) -> None:
        """Store a server's public config (no secrets), e.g. its default limits, at start-up."""
        with self.engine.begin() as conn:
            conn.execute(insert(servers).values(ts=time.time(), config=json.dumps(config, default=str)))

    def health(self) -> dict[str, Any]:
        """State for /health: ok, queued and in-flight rows, capacity, written/dropped counts, the last error."""
        pending = self._queue.qsize()
        alive = self._thread.is_alive() or self._closed
        ok = alive and not self.failing and pending < 0.8 * self.max_pending
        return {"ok": ok, "pending": pending, "in_flight": self._in_flight, "max_pending": self.max_pending,
                "written": self.written,
                "dropped": self.dropped, "failing": self.failing, "last_error": self.last_error}

    def flush(self) -> None:
        """Block until every row recorded so far is in the database (or dropped and counted)."""
        self._queue.join()

    def close(self) -> None:
        """Flush, write a final checkpoint and stop the writer thread (idempotent)."""
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
            self._in_flight = len(batch)
            try:
                if batch:
                    self._write(batch)
                if stop and self._head_seq > self._ckpt_seq:
                    self._attempt(lambda conn: self._checkpoint(conn, *self._head(conn)), tries=3)
            finally:
                self._in_flight = 0
                for _ in range(len(batch) if item is not _STOP else 1):
                    self._queue.task_done()
            if stop:
                return

    # ---- writing ------------------------------------------------------------------------------
    def _head(self, conn) -> tuple[int, str]:
        conn.execute(update(log_head).where(log_head.c.id == 1).values(seq=log_head.c.seq))  # the write lock
        head = conn.execute(select(log_head.c.seq, log_head.c.mac).where(log_head.c.id == 1)).one()
        return int(head.seq), head.mac

    def _checkpoint(self, conn, seq: int, mac: str) -> None:
        ts = time.time()
        conn.execute(insert(checkpoints).values(ts=ts, seq=seq, head=mac, mac=checkpoint_mac(self._key, seq, mac, ts)))
        log.info("query log checkpoint: seq %d head %s", seq, mac)
        self._ckpt_seq, self._ckpt_time = seq, time.monotonic()

    def _append(self, conn, rows: list[dict[str, Any]]) -> None:
        seq, mac = self._head(conn)
        chained = []
        for r in rows:
            seq += 1
            mac = row_mac(self._key, seq, mac, r, CHAINED)
            chained.append({**r, "seq": seq, "mac": mac})
        conn.execute(insert(queries), chained)
        conn.execute(update(log_head).where(log_head.c.id == 1).values(seq=seq, mac=mac))
        if seq - self._ckpt_seq >= self.checkpoint_every or time.monotonic() - self._ckpt_time >= self.checkpoint_seconds:
            self._checkpoint(conn, seq, mac)
        self._head_seq = seq

    def _attempt(self, fn, tries: int) -> Exception | None:
        for attempt in range(tries):
            try:
                with self.engine.begin() as conn:
                    fn(conn)
                return None
            except Exception as err:  # a locked or unreachable database, or a row it refuses
                if attempt == tries - 1:
                    return err
                time.sleep(0.05 * 2**attempt)
        return None

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows; a batch that fails is retried row by row, so one bad row never takes others along."""
        err = self._attempt(lambda conn: self._append(conn, rows), tries=5 if len(rows) > 1 else 2)
        if err is not None and len(rows) > 1:
            for r in rows:
                self._write([r])
            return
        if err is not None:
            escaped = {k: (json.dumps(v)[1:-1] if isinstance(v, str) and k not in _JSON else v)
                       for k, v in rows[0].items()}
            err = self._attempt(lambda conn: self._append(conn, [escaped]), tries=1)
        if err is None:
            self.written += len(rows)
            self.failing = False
            return
        self.dropped += len(rows)
        self.failing, self.last_error = True, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        log.error("query log: dropped %d row(s): %s", len(rows), self.last_error)


def read_log(
    url: str | Path, since: float | None = None, until: float | None = None, key_id: str | None = None
) -> list[dict[str, Any]]:
    """All rows (oldest first) as dicts, `prompt`, `params` and `completion_ids` decoded from JSON."""
    engine = make_engine(url)
    try:
        ensure_schema(engine)
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
        for f in _JSON:
            if r[f] is not None:
                try:
                    r[f] = json.loads(r[f])
                except ValueError:  # a legacy raw string (or a tampered row: `log verify` names it)
                    pass
    return rows


def server_config(url: str | Path) -> dict[str, Any] | None:
    """The public config of the last server that wrote to this log, or None."""
    engine = make_engine(url)
    try:
        ensure_schema(engine)
        with engine.connect() as conn:
            row = conn.execute(select(servers.c.config).order_by(servers.c.id.desc()).limit(1)).first()
    finally:
        engine.dispose()
    return json.loads(row.config) if row is not None else None
