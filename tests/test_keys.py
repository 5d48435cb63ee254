"""KeyStore: secrets shown once, stored hashed, verified; revocation and limits."""

from __future__ import annotations

import pytest

from potstill.errors import PotstillError
from potstill.guard.keys import KeyStore, key_id_of
from tests.keys_fixtures import check_migrated


@pytest.fixture
def store(tmp_path):
    s = KeyStore(tmp_path / "keys.db")
    yield s
    s.close()


def test_create_verify_and_hash_only_storage(store, tmp_path):
    key_id, secret = store.create("alice", rpm=60)
    assert secret.startswith(f"psk-{key_id}-") and len(secret) > 40
    rec = store.verify(secret)
    assert rec is not None and rec.key_id == key_id and rec.name == "alice" and rec.rpm == 60 and rec.tpm is None
    store.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert secret.encode() not in blob and secret.split("-", 2)[2].encode() not in blob
    assert key_id.encode() in blob


@pytest.mark.parametrize("bad", ["", "nope", "psk-", "psk--x", "psk-abc-def", "Bearer x", "psk-" + "a" * 40 + "-x"])
def test_verify_rejects_malformed_and_unknown(store, bad):
    store.create("bob")
    assert store.verify(bad) is None


def test_wrong_secret_for_a_real_key_id(store):
    key_id, secret = store.create("carol")
    assert store.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.verify(f"psk-{key_id}-") is None
    assert key_id_of(secret) == key_id


def test_revoke_list_and_set_limits(store):
    a, sa = store.create("a")
    b, sb = store.create("b", tpm=1000)
    store.revoke(a)
    assert store.verify(sa) is None and store.verify(sb) is not None
    assert {r.key_id for r in store.list()} == {a, b}
    assert [r.key_id for r in store.list(include_revoked=False)] == [b]
    assert store.get(a).revoked and not store.get(b).revoked
    store.set_limits(b, rpm=5, tpm=None)
    assert (store.verify(sb).rpm, store.verify(sb).tpm) == (5, None)
    with pytest.raises(PotstillError, match="no such key"):
        store.revoke("missing")
    with pytest.raises(PotstillError, match="rpm"):
        store.set_limits(b, rpm=0, tpm=None)
    with pytest.raises(PotstillError):
        store.create("")


def test_any_sqlalchemy_url(tmp_path):
    s = KeyStore(f"sqlite:///{tmp_path / 'k.db'}")
    key_id, secret = s.create("x")
    assert KeyStore(tmp_path / "k.db").verify(secret).key_id == key_id  # same file, path form
    mem = KeyStore("sqlite://")
    _, secret2 = mem.create("y")
    assert mem.verify(secret2) is not None


def test_old_key_store_is_migrated(tmp_path, caplog):
    check_migrated(f"sqlite:///{tmp_path / 'old.db'}")
    assert "key store: migrated an older schema (added max_top_logprobs" in caplog.text


def test_logprob_allowance(store):
    a, sa = store.create("a")
    assert store.verify(sa).max_top_logprobs == 0  # new keys: text only
    _, sb = store.create("b", max_top_logprobs=None)
    assert store.verify(sb).max_top_logprobs is None
    store.set_max_top_logprobs(a, 5)
    assert store.get(a).max_top_logprobs == 5
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(PotstillError, match="max_top_logprobs"):
            store.set_max_top_logprobs(a, bad)
    with pytest.raises(PotstillError, match="max_top_logprobs"):
        store.create("c", max_top_logprobs=-2)


def test_cli_keys_logprobs(tmp_path):
    from click.testing import CliRunner

    from potstill.cli import app

    db = str(tmp_path / "k.db")

    def keys(*args: str):
        return CliRunner().invoke(app, ["keys", *args, "--db", db])

    assert keys("create", "plain").exit_code == 0
    assert keys("create", "trusted", "--max-top-logprobs", "5").exit_code == 0
    assert keys("create", "legacy-like", "--max-top-logprobs", "server").exit_code == 0
    bad = keys("create", "x", "--max-top-logprobs", "-1")
    assert bad.exit_code == 2 and "expected an integer >= 0 or 'server'" in bad.output
    listed = {line.split("\t")[1]: line.split("\t") for line in keys("list").output.splitlines()}
    assert {n: row[4] for n, row in listed.items()} == {
        "plain": "top_logprobs=0 (text only)", "trusted": "top_logprobs=5", "legacy-like": "top_logprobs=server"}
    res = keys("set-logprobs", listed["plain"][0], "3")
    assert res.exit_code == 0 and "top_logprobs=3" in res.output
    assert KeyStore(db).get(listed["plain"][0]).max_top_logprobs == 3
