"""The query log under attack: poisoned rows, blinding prompts, old schemas (real SQLite files)."""

from __future__ import annotations

import sqlite3

import pytest

from potstill.guard.monitor import prompt_words, score_keys
from potstill.guard.querylog import QueryLog, read_log

GOOD = {"key_id": "good", "endpoint": "/v1/completions", "method": "POST", "status": 200,
        "prompt": "hello there", "params": {"max_tokens": 4}, "completion": "hi"}


@pytest.mark.parametrize("field", ["prompt", "params", "model", "completion", "error_type"])
@pytest.mark.parametrize("poison", ["\ud800", "a\udfffb", "nul\u0000byte"])
def test_one_poisoned_row_never_drops_the_others(tmp_path, field, poison):
    """Attack 2: one bad string among 100 good rows; every row lands, the bad one escaped."""
    log = QueryLog(tmp_path / "q.db")
    bad = dict(GOOD, key_id="evil")
    bad[field] = {"stop": [poison]} if field == "params" else poison
    log.record(bad)
    for i in range(100):
        log.record(dict(GOOD, prompt=f"good {i}"))
    log.close()
    rows = read_log(tmp_path / "q.db")
    assert len(rows) == 101
    assert [r["key_id"] for r in rows].count("evil") == 1 and [r["key_id"] for r in rows].count("good") == 100
    evil = next(r for r in rows if r["key_id"] == "evil")
    if field in ("prompt", "params"):  # JSON fields round-trip exactly
        assert evil[field] == bad[field]
    else:
        assert "\u0000" not in evil[field] and evil[field].encode("utf-8")  # stored escaped, valid UTF-8


def _served(prompt, key="k1", **kw) -> dict:
    return {**GOOD, "key_id": key, "prompt": prompt, **kw}


BLINDING = [[], [[]], "[]", "", [{}], [{"role": "user"}], [{"role": "user", "content": None}], {"x": 1}, [None], 5]


@pytest.mark.parametrize("prompt", BLINDING, ids=repr)
def test_monitor_survives_blinding_prompts(tmp_path, prompt):
    """Attack 3: prompts that once raised IndexError in score_keys (and so disabled --throttle)."""
    log = QueryLog(tmp_path / "q.db")
    for i in range(30):
        log.record(_served(f"normal question number {i} about cats", ts=1000.0 + i))
    log.record(_served(prompt, ts=2000.0))
    log.close()
    risks = score_keys(tmp_path / "q.db")
    assert [r.key_id for r in risks] == ["k1"] and risks[0].n_requests == 31


def test_prompts_keep_their_type(tmp_path):
    """A string prompt that looks like JSON stays a string; lists stay lists."""
    log = QueryLog(tmp_path / "q.db")
    prompts = ["[]", "[1, 2]", '{"role": "user"}', "plain", [1, 2], [], [[]], ["a", "b"],
               [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]]
    for p in prompts:
        log.record(_served(p))
    log.close()
    rows = read_log(tmp_path / "q.db")
    assert [r["prompt"] for r in rows] == prompts
    assert [r["prompt_kind"] for r in rows] == ["text", "text", "text", "text", "ids", "ids", "batch", "batch", "chat"]
    assert prompt_words("[]") == [] and prompt_words([]) == [] and prompt_words([[]]) == []
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "World"}]}]
    assert prompt_words(parts) == ["hello", "world"]


def test_detect_log_db_reads_chat_content_parts(tmp_path, tiny_tokenizer):
    """`detect --log-db` once crashed on served chat requests whose content is a list of parts."""
    from potstill.guard.suspect import served_sequences

    log = QueryLog(tmp_path / "q.db")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}]}]
    plain = [{"role": "user", "content": "Hello world"}]
    log.record(_served(parts, endpoint="/v1/chat/completions", completion="fine thanks"))
    log.record(_served(plain, endpoint="/v1/chat/completions", completion="fine thanks"))
    log.record(_served([], completion="x"))
    log.record(_served([[]], completion="x"))
    log.record(_served("[]", completion="x"))
    log.record(_served("\ud800", completion="x"))  # the tokenizer cannot take it: skipped, not a crash
    log.record(_served([{"role": "wizard", "content": 5}], endpoint="/v1/chat/completions", completion="x"))
    log.close()
    log2 = QueryLog(tmp_path / "ids.db")
    log2.record(_served("hi", completion="text that would tokenize otherwise", completion_ids=[7, 8, 9]))
    log2.close()
    ids_seqs, ids_lens = served_sequences(str(tmp_path / "ids.db"), tiny_tokenizer)
    assert ids_seqs[0][ids_lens[0]:] == [7, 8, 9]  # the served ids are scored, not a re-tokenization
    seqs, lens = served_sequences(str(tmp_path / "q.db"), tiny_tokenizer)
    assert seqs[0] == seqs[1] and lens[0] == lens[1]  # parts are the same conversation as plain text
    # the "[]" text prompt is a text prompt; [] and [[]] carry no prompt to score; the surrogate is skipped;
    # the odd role with non-text content is a conversation with empty content
    assert len(seqs) == 4


def test_old_schema_is_migrated(tmp_path):
    """A log created before the `completion` column: once every insert failed silently."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE queries (id INTEGER PRIMARY KEY AUTOINCREMENT, ts FLOAT NOT NULL, key_id VARCHAR(64), "
        "method VARCHAR(16), endpoint VARCHAR(256), model VARCHAR(256), prompt TEXT, params TEXT, "
        "tokens_in INTEGER, tokens_out INTEGER, logprobs BOOLEAN, top_logprobs INTEGER, latency_ms FLOAT, "
        "status INTEGER, error_type VARCHAR(64))"
    )
    con.execute("INSERT INTO queries (ts, key_id, prompt, status) VALUES (1.0, 'old', '[1, 2]', 200)")
    con.commit()
    con.close()
    log = QueryLog(path)
    log.record(GOOD)
    log.close()
    rows = read_log(path)
    assert [r["key_id"] for r in rows] == ["old", "good"] and rows[1]["completion"] == "hi"
    assert rows[0]["prompt"] == [1, 2]


def test_foreign_schema_is_refused_with_one_line(tmp_path):
    from potstill.errors import PotstillError

    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE queries (id INTEGER PRIMARY KEY, something TEXT)")
    con.commit()
    con.close()
    with pytest.raises(PotstillError, match="queries") as err:
        QueryLog(path)
    assert "\n" not in str(err.value)


def test_monitor_throttle_starts_from_the_servers_limits(tmp_path):
    """`monitor --throttle` once scaled keys on server defaults from hard-coded 60 rpm / 100k tpm."""
    import random

    from click.testing import CliRunner

    from potstill.cli import app
    from potstill.guard.keys import KeyStore
    from tests.traffic_fixtures import TEMPLATES_A, extractor_rows

    store = KeyStore(tmp_path / "keys.db")
    kid, _ = store.create("suspect")  # no own limits: it runs on the server's defaults
    log = QueryLog(tmp_path / "q.db")
    log.record_server({"default_rpm": 40, "default_tpm": 8000, "model_name": "tiny"})
    for r in extractor_rows(random.Random(1), kid, 1_700_000_000.0, 300, TEMPLATES_A, steady=True):
        log.record(r)
    log.close()
    out = CliRunner().invoke(app, ["monitor", "--log-db", str(tmp_path / "q.db"), "--keys-db",
                                   str(tmp_path / "keys.db"), "--throttle", "--factor", "0.5"])
    assert out.exit_code == 0, out.output
    assert f"throttled {kid}: rpm=20 tpm=4000" in out.output
    assert (store.get(kid).rpm, store.get(kid).tpm) == (20, 4000)
