"""`potstill case`: the case file about a key or a campaign, from a real served app's log and key store.

The person a case is about wrote its prompts: the page must show them as text, never run them
(attack first: a prompt carrying markup and script). The case reports the log's integrity as it
is: an edited row makes it say so.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from click.testing import CliRunner

from potstill.cli import app
from potstill.errors import PotstillError
from potstill.guard.case import CaseConfig, build_case, write_case
from potstill.guard.querylog import read_log
from potstill.guard.watermark_config import WatermarkConfig
from tests.browser_fixtures import chromium, headless_flags
from tests.guard_fixtures import live_server, one_torch_thread, tiny_teacher, wm_key

XSS = '<script>document.title="owned"</script><img src=x onerror="document.title=1">'


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two keys served by a watermarked tiny model: 'mallory' (a template, markup in a prompt), 'alice'."""
    tmp = tmp_path_factory.mktemp("case")
    wm = WatermarkConfig(key=wm_key("case"), delta=4.0)
    with one_torch_thread(), live_server(tiny_teacher(), tmp, watermark=wm, max_tokens_cap=24) as srv:
        mallory, m_sec = srv.keys.create("mallory", rpm=10_000, tpm=10**7, max_top_logprobs=5)
        alice, a_sec = srv.keys.create("alice", rpm=10_000, tpm=10**7, max_top_logprobs=5)
        def ask(i: int) -> int:  # sent together: the server batches them
            if i >= 16:
                return httpx.post(srv.base + "/completions", timeout=120, headers={"Authorization": f"Bearer {a_sec}"},
                                  json={"model": "tiny", "prompt": f"hello {i}", "max_tokens": 8, "seed": i}).status_code
            prompt = f"Explain topic number {i} in simple words for a dataset" + (XSS if i == 3 else "")
            return httpx.post(srv.base + "/chat/completions", timeout=120, headers={"Authorization": f"Bearer {m_sec}"},
                              json={"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                                    "seed": i, "logprobs": True, "top_logprobs": 5}).status_code

        with ThreadPoolExecutor(20) as pool:
            assert list(pool.map(ask, range(20))) == [200] * 20
        deadline = time.time() + 10  # each row is written just after its response went out
        while len(read_log(srv.querylog_url)) < 20 and time.time() < deadline:
            srv.flush()
            time.sleep(0.05)
        yield {"log": srv.querylog_url, "keys": str(tmp / "keys.db"), "wm": wm, "mallory": mallory, "alice": alice,
               "tmp": tmp}


def _case(served, out, **kw):
    cfg = CaseConfig(log_db=served["log"], keys_db=served["keys"], out=str(out), **kw)
    case = build_case(cfg, served["wm"], log=lambda m: None)
    write_case(case, out)
    return case


def test_case_file_holds_who_what_evidence_integrity(served, tmp_path):
    case = _case(served, tmp_path / "c", key_id=served["mallory"])
    saved = json.loads((tmp_path / "c" / "case.json").read_text())
    assert saved["case"] == served["mallory"] and saved["who"][0]["name"] == "mallory"
    assert saved["who"][0]["rpm"] == 10_000 and saved["who"][0]["created_at"].endswith("Z")
    assert saved["who"][0]["max_top_logprobs"] == 5  # what the key was allowed to read
    what = saved["what"]
    assert what["requests"] == 16 and what["status"] == {"200": 16} and what["logprob_requests"] == 16
    assert sum(p["requests"] for p in what["timeline"]["points"]) == 16
    assert any("topic number" in t["words"] or "simple words" in t["words"] for t in what["templates"])
    assert what["samples"] and all(s["key_id"] == served["mallory"] for s in what["samples"])
    ev = saved["evidence"]
    assert ev["monitor"]["pooled"]["n_requests"] == 16 and set(ev["monitor"]["per_key"]) == {served["mallory"]}
    wm = ev["served_watermark"]
    assert wm["answers"] == 16 and wm["tokens_scored"] > 100
    assert wm["p_value"] < 1e-6, wm  # delta 4 on a tiny model: the served text carries the watermark
    assert wm["watermark"]["key_fingerprint"].startswith("v1:") and "key" not in wm["watermark"]
    assert saved["integrity"]["log"]["verified"] is True
    assert len(saved["integrity"]["inputs"]["log_rows_sha256"]) == 64
    assert any(c.startswith("potstill log verify") for c in saved["reproduce"])
    assert (tmp_path / "c" / "traffic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert case["what"]["requests"] == 16


def test_logged_markup_is_shown_as_text(served, tmp_path):
    """Attack: a key holder writes markup and script into a prompt; the owner opens the case page."""
    _case(served, tmp_path / "c", key_id=served["mallory"], samples=16)
    page = (tmp_path / "c" / "case.html").read_text()
    assert "<script" not in page.lower() and "onerror=" not in page.replace("onerror=&quot;", "")
    assert "&lt;script&gt;document.title=&quot;owned&quot;&lt;/script&gt;" in page
    saved = json.loads((tmp_path / "c" / "case.json").read_text())
    assert any(XSS in s["prompt"] for s in saved["what"]["samples"])  # the JSON keeps the exact text


def test_a_campaign_case_pools_its_keys(served, tmp_path):
    case = _case(served, tmp_path / "c", campaign=f"{served['mallory']},{served['alice']}")
    assert case["what"]["requests"] == 20 and {w["name"] for w in case["who"]} == {"mallory", "alice"}
    assert set(case["evidence"]["monitor"]["per_key"]) == {served["mallory"], served["alice"]}


def test_an_edited_log_is_reported_not_hidden(served, tmp_path):
    log = tmp_path / "edited.db"
    with sqlite3.connect(served["log"]) as src, sqlite3.connect(log) as dst:  # WAL: copy through SQLite
        src.backup(dst)
    with sqlite3.connect(log) as conn:
        conn.execute("UPDATE queries SET tokens_out = tokens_out + 1 WHERE id = (SELECT min(id) FROM queries)")
    case = build_case(CaseConfig(log_db=str(log), key_id=served["mallory"], out=str(tmp_path / "c")), served["wm"],
                      log=lambda m: None)
    assert case["integrity"]["log"]["verified"] is False and case["integrity"]["log"]["kind"] == "edited"


def test_bad_input_one_line_nothing_written(served, tmp_path):
    runner = CliRunner()
    for args in (["--key-id", "k1", "--campaign", "a,b"], ["--key-id", "nobody-at-all"],
                 ["--campaign", "campaign:none+3"]):
        res = runner.invoke(app, ["case", "--log-db", served["log"], "--out", str(tmp_path / "bad"), *args])
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, (args, res.stderr)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(PotstillError):
        CaseConfig(log_db=served["log"])


def test_cli_case_with_a_suspect_and_controls(served, tmp_path, monkeypatch):
    """The suspect (here the served model itself, saved) is tested on the key's answers, beside wrong-key
    controls that must not find anything."""
    suspect = tmp_path / "suspect"
    teacher = tiny_teacher()
    teacher.model.save_pretrained(suspect)
    teacher.tokenizer.save_pretrained(suspect)
    monkeypatch.setenv("POTSTILL_WATERMARK_KEY", served["wm"].key)
    res = CliRunner().invoke(app, ["case", "--log-db", served["log"], "--keys-db", served["keys"], "--key-id",
                                   served["mallory"], "--suspect", str(suspect), "--controls", "3", "--delta", "4",
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    sus = json.loads((tmp_path / "c" / "case.json").read_text())["evidence"]["suspect"]
    assert len(sus["controls"]) == 3 and all(c["p_value"] > 1e-3 for c in sus["controls"]), sus["controls"]
    assert len(sus["suspect_sha256"]) == 64 and sus["per_key"][0]["tokens_scored"] > 0


@pytest.mark.subprocess
def test_case_page_renders_in_chromium(served, tmp_path):
    exe = chromium()
    _case(served, tmp_path / "c", key_id=served["mallory"], samples=16)
    url = (tmp_path / "c" / "case.html").resolve().as_uri()
    dom = subprocess.run([exe, *headless_flags(tmp_path), "--dump-dom", url], capture_output=True, text=True,
                         timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<title>potstill case:" in html and "owned" not in html.split("</title>")[0]  # no script ran
    assert 'id="traffic"' in html and 'class="who"' in html and 'class="per-key"' in html
    assert "&lt;script&gt;" in html
