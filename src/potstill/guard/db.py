"""Database engines for the guard's stores: a plain path means SQLite (WAL), anything else a SQLAlchemy URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

from potstill.errors import PotstillError


def is_url(spec: str | Path) -> bool:
    """Whether `spec` is a SQLAlchemy URL (else a plain SQLite file path)."""
    return "://" in str(spec)


def home_db(name: str) -> str:
    """$POTSTILL_HOME/guard/<name>: where `potstill serve` keeps a store it was not told about."""
    from potstill.utils import potstill_home

    return str(potstill_home() / "guard" / name)


def existing_db(spec: str | Path | None, name: str = "queries.db", what: str = "query log") -> str:
    """`spec` (default: the home store `name`) for reading; a plain path that is not there is a one-line error."""
    spec = str(spec) if spec else home_db(name)
    if not is_url(spec) and not Path(spec).exists():
        raise PotstillError(f"no {what} here", where=spec)
    return spec


def db_url(spec: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a plain file path (-> SQLite)."""
    spec = str(spec)
    if is_url(spec):
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
