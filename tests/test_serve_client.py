"""The client address in the query log (issue 14): the peer, X-Forwarded-For believed only from a trusted proxy.

A real uvicorn server on 127.0.0.1; the attacker sends its own X-Forwarded-For to pin its traffic on
someone else (or hide behind a made-up address). Also: the address is covered by the log's hash chain,
and rows written before the column existed keep their MACs.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time

import httpx
import pytest

from potstill.guard.logchain import load_log_key, row_mac, verify
from potstill.guard.middleware import client_address
from potstill.guard.querylog import QueryLog, read_log
from tests.guard_fixtures import live_server, tiny_teacher

LOG_KEY = "5e1b9c7a3d2f4068a1c3e5f7092b4d6f8e0a2c4e6f8091b3d5f7092b4c6e8a1b"


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


def _clients(srv, headers: list[dict]) -> list[str | None]:
    """Send GET /v1/models with each header set; the logged client address of each, in order."""
    key_id, secret = srv.keys.create("c")
    with httpx.Client(timeout=30) as http:
        for h in headers:
            r = http.get(srv.base + "/models", headers={"Authorization": f"Bearer {secret}", **h})
            assert r.status_code == 200, r.text
    deadline = time.time() + 10
    while True:
        srv.flush()
        rows = [r for r in read_log(srv.querylog_url) if r["key_id"] == key_id]
        if len(rows) >= len(headers) or time.time() > deadline:
            return [r.get("client") for r in sorted(rows, key=lambda r: r["id"])]
        time.sleep(0.05)


def test_spoofed_forwarded_for_from_an_untrusted_peer_is_not_believed(teacher, tmp_path):
    """The attack: a direct client claims to be 6.6.6.6. No trusted proxy is configured: the peer is logged."""
    with live_server(teacher, tmp_path) as srv:
        got = _clients(srv, [{}, {"X-Forwarded-For": "6.6.6.6"}, {"X-Forwarded-For": "6.6.6.6, 10.0.0.1"},
                             {"X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6"}])
    assert got == ["127.0.0.1"] * 4


def test_trusted_proxy_is_believed_but_not_what_the_client_put_before_it(teacher, tmp_path):
    """Behind a trusted proxy (127.0.0.1 here) the address it appends is logged; hops the client wrote are not."""
    with live_server(teacher, tmp_path, trusted_proxies=["127.0.0.0/8"]) as srv:
        got = _clients(srv, [{"X-Forwarded-For": "203.0.113.7"},
                             {"X-Forwarded-For": "6.6.6.6, 203.0.113.7"},  # the client's own claim, then the proxy's
                             {"X-Forwarded-For": "not-an-ip"},  # garbage: believe no further than the proxy
                             {}])
    assert got == ["203.0.113.7", "203.0.113.7", "127.0.0.1", "127.0.0.1"]


def test_client_address_walks_a_chain_of_trusted_proxies():
    trusted = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]

    def scope(peer, *xff):
        return {"client": (peer, 5000), "headers": [(b"x-forwarded-for", x.encode()) for x in xff]}

    assert client_address(scope("10.0.0.2", "6.6.6.6, 198.51.100.4, 10.0.0.9"), trusted) == "198.51.100.4"
    assert client_address(scope("10.0.0.2", "6.6.6.6", "198.51.100.4"), trusted) == "198.51.100.4"  # two headers
    assert client_address(scope("198.51.100.4", "10.0.0.3"), trusted) == "198.51.100.4"  # untrusted peer
    assert client_address(scope("::1", "[2001:db8::1]"), trusted) == "2001:db8::1"
    assert client_address(scope("10.0.0.2", "10.0.0.3"), trusted) == "10.0.0.3"  # all trusted: the leftmost
    assert client_address({"headers": []}, trusted) is None  # no peer (e.g. a unix socket)


def test_client_address_is_chained_and_old_rows_keep_their_macs(tmp_path):
    path = tmp_path / "q.db"
    log = QueryLog(path, key=LOG_KEY)
    for i, client in enumerate(["203.0.113.7", None, "2001:db8::1"]):
        log.record({"key_id": "k", "endpoint": "/v1/completions", "status": 200, "prompt": f"p{i}", "ts": 1000.0 + i,
                    "client": client})
    log.close()
    key = load_log_key(LOG_KEY)
    assert verify(path, key).ok
    assert [r["client"] for r in read_log(path)] == ["203.0.113.7", None, "2001:db8::1"]
    # a row without a client has the MAC it had before the column existed
    row = {"key_id": "k", "status": 200}
    old_fields = ["key_id", "status"]
    assert row_mac(key, 1, "0" * 64, row, old_fields + ["client"]) == row_mac(key, 1, "0" * 64, row, old_fields)
    con = sqlite3.connect(path)
    con.execute("UPDATE queries SET client = '198.51.100.9' WHERE id = 1")  # pin the request on someone else
    con.commit()
    con.close()
    rep = verify(path, key)
    assert not rep.ok and rep.kind == "edited" and rep.row_id == 1, rep.summary()
