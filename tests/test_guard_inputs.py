"""What the guard CLI used to do itself now lives once in the library: the watermark secret, JSONL texts,
the stores' default paths. Real files, real environment variables, a real SQLite query log."""

from __future__ import annotations

import hashlib

import pytest

from potstill.errors import PotstillError
from potstill.guard.db import existing_db, home_db
from potstill.guard.suspect import read_texts
from potstill.guard.watermark_config import WATERMARK_KEY_ENV, load_watermark

STRONG = "wm-inputs-" + hashlib.sha256(b"test_guard_inputs").hexdigest()


def test_watermark_secret_from_file_else_env(tmp_path, monkeypatch):
    monkeypatch.delenv(WATERMARK_KEY_ENV, raising=False)
    assert load_watermark(required=False) is None  # no secret: the watermark is off
    with pytest.raises(PotstillError, match=f"set \\${WATERMARK_KEY_ENV}"):
        load_watermark()
    monkeypatch.setenv(WATERMARK_KEY_ENV, f"  {STRONG}\n")
    cfg = load_watermark(gamma=0.5, context_width=2)
    assert cfg.key == STRONG and cfg.gamma == 0.5 and cfg.context_width == 2
    key_file = tmp_path / "wm.key"
    key_file.write_text(STRONG[::-1] + "\n")
    assert load_watermark(key_file=str(key_file)).key == STRONG[::-1]  # the file wins over the env var
    with pytest.raises(PotstillError) as e:
        load_watermark(key_file=str(tmp_path / "missing.key"))
    assert "missing.key" in str(e.value)
    with pytest.raises(PotstillError, match="gamma"):
        load_watermark(gamma=1.5)


def test_jsonl_texts_name_the_bad_line(tmp_path):
    good = tmp_path / "gens.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": 2}\n')
    assert read_texts(str(good), "text") == ["one", "2"]
    assert read_texts(str(good)) == good.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"other": "x"}\n')
    with pytest.raises(PotstillError) as e:
        read_texts(str(bad), "text")
    assert f"{bad}:2" in str(e.value) and "'text'" in str(e.value)
    bad.write_text('{"text": "one"}\n{not json\n')
    with pytest.raises(PotstillError) as e:
        read_texts(str(bad), "text")
    assert f"{bad}:2" in str(e.value) and "invalid JSON" in str(e.value)


def test_store_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_HOME", str(tmp_path))
    assert home_db("keys.db") == str(tmp_path / "guard" / "keys.db")
    with pytest.raises(PotstillError, match="no query log here"):
        existing_db(None)  # the default log does not exist yet
    from potstill.guard.querylog import QueryLog

    QueryLog(home_db("queries.db")).close()
    assert existing_db(None) == home_db("queries.db")
    assert existing_db("postgresql://u@h/db") == "postgresql://u@h/db"  # a URL is the server's to check
