"""A key store as an older potstill made it, and the check that a start-up migrates it (SQLite and PostgreSQL)."""

from __future__ import annotations

from potstill.guard.keys import KeyStore

OLD_KEYS_DDL = ("CREATE TABLE api_keys (key_id VARCHAR(32) PRIMARY KEY, name VARCHAR(256) NOT NULL, "
                "secret_sha256 VARCHAR(64) NOT NULL, rpm INTEGER, tpm INTEGER, created_at FLOAT NOT NULL, "
                "revoked_at FLOAT)")


def old_key_store(url: str) -> str:
    """A key store as potstill made it before per-key log-probs (no max_top_logprobs column), one key; its secret."""
    import hashlib

    from sqlalchemy import create_engine, text

    secret = "psk-0ld0ld0ld0ld-" + "s" * 43
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text(OLD_KEYS_DDL))
        conn.execute(text("INSERT INTO api_keys VALUES ('0ld0ld0ld0ld', 'legacy', :h, NULL, NULL, 1.0, NULL)"),
                     {"h": hashlib.sha256(secret.encode()).hexdigest()})
    eng.dispose()
    return secret


def check_migrated(url: str) -> None:
    """The old key still verifies and keeps the server's log-prob cap (None); a new key is text only."""
    secret = old_key_store(url)
    store = KeyStore(url)
    old = store.verify(secret)
    assert old is not None and old.name == "legacy" and old.max_top_logprobs is None
    _, new = store.create("new")
    assert store.verify(new).max_top_logprobs == 0
    store.close()
    again = KeyStore(url)  # a second start finds nothing to migrate
    assert again.verify(secret).max_top_logprobs is None and len(again.list()) == 2
    again.close()
