"""Keys, the query log and its tamper check against a real PostgreSQL server started by the test."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, text

from potstill.guard.keys import KeyStore
from potstill.guard.logchain import load_log_key, verify
from potstill.guard.querylog import QueryLog, read_log
from tests.keys_fixtures import check_migrated
from tests.pg_fixtures import postgres_server

LOG_KEY = "pg-test-log-key-8d1f3a5c7e9b2d4f6a8c0e1f3b5d7f9a"


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("pg")) as url:
        yield url


def _fresh(url: str, name: str) -> str:
    """A new database on the server, so each test starts empty."""
    eng = create_engine(url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    eng.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def test_keys_on_postgres(pg):
    store = KeyStore(_fresh(pg, "keys"))
    kid, secret = store.create("alice", rpm=5)
    assert store.verify(secret).key_id == kid and store.verify(secret + "x") is None
    store.revoke(kid)
    assert store.verify(secret) is None
    store.close()


@pytest.mark.parametrize("poison", ["\u0000", "\ud800"])
def test_one_poisoned_row_never_drops_the_others_on_postgres(pg, poison):
    """Attack 2 on PostgreSQL: NUL is what PostgreSQL text refuses (SQLite takes it)."""
    url = _fresh(pg, "poison_" + ("nul" if poison == "\u0000" else "surrogate"))
    log = QueryLog(url, key=LOG_KEY)
    log.record({"key_id": "evil", "status": 200, "prompt": f"a{poison}b", "model": f"m{poison}",
                "completion": f"c{poison}", "params": {"stop": [poison]}})
    for i in range(100):
        log.record({"key_id": "good", "status": 200, "prompt": f"good {i}", "model": "tiny"})
    log.close()
    rows = read_log(url)
    assert len(rows) == 101 and rows[0]["prompt"] == f"a{poison}b" and rows[0]["params"] == {"stop": [poison]}
    assert "\u0000" not in rows[0]["model"] and "\u0000" not in rows[0]["completion"]
    assert verify(url, load_log_key(LOG_KEY)).ok


def test_tamper_check_on_postgres(pg):
    url = _fresh(pg, "tamper")
    logs = [QueryLog(url, key=LOG_KEY, batch_size=5, checkpoint_every=20) for _ in range(2)]
    threads = [threading.Thread(target=lambda lg=lg, n=n: [lg.record({"key_id": f"w{n}", "status": 200,
                                                                        "prompt": [i], "ts": 1e9 + i})
                                                             for i in range(60)])
               for n, lg in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lg in logs:
        lg.close()
    key = load_log_key(LOG_KEY)
    rep = verify(url, key)
    assert rep.ok and rep.chained_rows == 120 and rep.checkpoints >= 2, rep.summary()
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("UPDATE queries SET status = 404 WHERE id = 33"))
    assert (verify(url, key).kind, verify(url, key).row_id) == ("edited", 33)
    with eng.begin() as conn:
        conn.execute(text("UPDATE queries SET status = 200 WHERE id = 33"))
        conn.execute(text("DELETE FROM queries WHERE id = 50"))
    assert (verify(url, key).kind, verify(url, key).row_id) == ("deleted", 51)
    eng.dispose()


def test_old_schema_migrated_on_postgres(pg):
    url = _fresh(pg, "old")
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE queries (id SERIAL PRIMARY KEY, ts FLOAT NOT NULL, key_id VARCHAR(64), "
                          "prompt TEXT, params TEXT, status INTEGER)"))
        conn.execute(text("INSERT INTO queries (ts, key_id, prompt, status) VALUES (1.0, 'old', '\"x\"', 200)"))
    eng.dispose()
    log = QueryLog(url, key=LOG_KEY)
    log.record({"key_id": "new", "status": 200, "prompt": "y", "completion": "z"})
    log.close()
    rows = read_log(url)
    assert [r["key_id"] for r in rows] == ["old", "new"] and rows[1]["completion"] == "z"
    rep = verify(url, load_log_key(LOG_KEY))
    assert rep.ok and rep.legacy_rows == 1 and rep.chained_rows == 1


def test_old_key_store_migrated_on_postgres(pg):
    check_migrated(_fresh(pg, "oldkeys"))
