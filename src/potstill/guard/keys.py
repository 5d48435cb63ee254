"""API keys for `potstill serve`: created once, stored hashed, verified in constant time.

A secret looks like `psk-<key_id>-<43 random chars>` (256 bits). Only its sha256 is stored; the
secret itself is returned once by `create` and never logged. The key id inside it is public: it
names the key in the query log, in limits and in monitor reports. Per-key limits (`rpm`, `tpm`)
override the server defaults when set; `None` means "use the server default".

Log-probs are per key too (`max_top_logprobs`): 0 (`TEXT_ONLY`, the default for new keys) means
the key gets text only, N >= 1 that it may ask for log-probs with up to N top alternatives, None the
server's cap (`ServeConfig.max_top_logprobs`). A request asking for more is refused with 403 before
any work (guard/service.py). A key store made by an older potstill gains the column at start-up;
its keys read None, so they keep the log-probs they had.

    store = KeyStore("keys.db")                 # SQLite path or any SQLAlchemy URL
    key_id, secret = store.create("alice", rpm=60)
    store.verify(secret)                        # -> KeyRecord, or None (unknown/revoked/malformed)
    store.revoke(key_id)
    store.set_max_top_logprobs(key_id, 20)      # a trusted key: log-probs with up to 20 alternatives
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, insert, select, update

from potstill.errors import PotstillError
from potstill.guard.db import add_missing_columns
from potstill.guard.querylog import db_url, make_engine
from potstill.guard.serve_config import TEXT_ONLY

log = logging.getLogger(__name__)

PREFIX = "psk"

metadata = MetaData()
api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_top_logprobs", Integer),  # None: the server's cap (keys made before this column existed)
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored (never the secret)."""

    key_id: str
    name: str
    rpm: int | None
    """Requests per minute; None -> the server default."""
    tpm: int | None
    """Tokens (prompt + completion) per minute; None -> the server default."""
    created_at: float
    revoked_at: float | None
    max_top_logprobs: int | None = None
    """Most top log-probs a request may ask for: 0 = text only (no log-probs); None -> the server's cap."""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(secret: str) -> str | None:
    """The key id embedded in a well-formed secret, else None."""
    parts = secret.split("-", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or len(parts[1]) > 32:
        return None
    return parts[1]


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise PotstillError(f"{name} must be a positive integer or unset, got {value!r}")


def _check_top(value: int | None) -> None:
    if value is not None and (type(value) is not int or value < 0):
        raise PotstillError(f"max_top_logprobs must be an integer >= 0 (0: text only) or unset, got {value!r}")


_DUMMY_HASH = _hash("potstill-no-such-key")


class KeyStore:
    """Hashed API keys in a SQL database (a SQLite path or any SQLAlchemy URL)."""

    def __init__(self, url: str | Path):
        self.url = db_url(url)
        self.engine = make_engine(self.url)
        added = add_missing_columns(self.engine, api_keys)
        if added:
            log.warning("key store: migrated an older schema (added %s; its keys keep the server's log-prob "
                        "cap)", ", ".join(added))
        metadata.create_all(self.engine)

    def create(self, name: str, rpm: int | None = None, tpm: int | None = None,
               max_top_logprobs: int | None = TEXT_ONLY) -> tuple[str, str]:
        """A new key: returns (key_id, secret). The secret is shown only here. Text only unless
        `max_top_logprobs` grants log-probs (N alternatives; None: the server's cap)."""
        if not name or len(name) > 256:
            raise PotstillError("key name must be 1-256 characters")
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        _check_top(max_top_logprobs)
        key_id = secrets.token_hex(6)
        secret = f"{PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
        with self.engine.begin() as conn:
            conn.execute(
                insert(api_keys).values(
                    key_id=key_id, name=name, secret_sha256=_hash(secret), rpm=rpm, tpm=tpm,
                    max_top_logprobs=max_top_logprobs, created_at=time.time()
                )
            )
        return key_id, secret

    def get(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return _record(row) if row is not None else None

    def list(self, include_revoked: bool = True) -> list[KeyRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        records = [_record(r) for r in rows]
        return records if include_revoked else [r for r in records if not r.revoked]

    def verify(self, secret: str) -> KeyRecord | None:
        """The live key this secret belongs to, or None. Compares hashes in constant time."""
        key_id = key_id_of(secret) if isinstance(secret, str) else None
        row = None
        if key_id is not None:
            with self.engine.connect() as conn:
                row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        stored = row.secret_sha256 if row is not None else _DUMMY_HASH
        ok = hmac.compare_digest(_hash(secret if isinstance(secret, str) else ""), stored)
        if not ok or row is None or row.revoked_at is not None:
            return None
        return _record(row)

    def revoke(self, key_id: str) -> None:
        self._update(key_id, revoked_at=time.time())

    def set_limits(self, key_id: str, rpm: int | None, tpm: int | None) -> None:
        """Set this key's limits (None -> the server default). Takes effect on its next request."""
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        self._update(key_id, rpm=rpm, tpm=tpm)

    def set_max_top_logprobs(self, key_id: str, n: int | None) -> None:
        """How many top log-probs this key may receive (0: text only; None: the server's cap). Next request on."""
        _check_top(n)
        self._update(key_id, max_top_logprobs=n)

    def _update(self, key_id: str, **values) -> None:
        with self.engine.begin() as conn:
            n = conn.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(**values)).rowcount
        if n == 0:
            raise PotstillError(f"no such key: {key_id}")

    def close(self) -> None:
        self.engine.dispose()


def _record(row) -> KeyRecord:
    return KeyRecord(
        key_id=row.key_id,
        name=row.name,
        rpm=row.rpm,
        tpm=row.tpm,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        max_top_logprobs=row.max_top_logprobs,
    )
