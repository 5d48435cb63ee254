"""Database engines for the guard's stores: a plain path means SQLite (WAL), anything else a SQLAlchemy URL.

`add_missing_columns` migrates a table made by an older potstill (keys, query log) at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Table, create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
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


def add_missing_columns(engine: Engine, table: Table) -> list[str]:
    """Add the columns of `table` an existing table made by an older potstill lacks (nullable, with their
    indexes); the names added. Another process adding the same column at the same time is not an error."""
    insp = inspect(engine)
    if not insp.has_table(table.name):
        return []
    have = {c["name"] for c in insp.get_columns(table.name)}
    missing = [c for c in table.columns if c.name not in have]
    for c in missing:
        try:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {c.name} "
                                  f"{c.type.compile(dialect=engine.dialect)}"))
        except DBAPIError:
            if c.name not in {x["name"] for x in inspect(engine).get_columns(table.name)}:
                raise  # not a race with another starting process: a real failure
    added = {c.name for c in missing}
    with engine.begin() as conn:
        for index in table.indexes:
            if {c.name for c in index.columns} <= added:
                index.create(conn, checkfirst=True)
    return sorted(added)
