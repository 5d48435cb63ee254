"""The gateway in front of a real `potstill serve` (tiny model, 127.0.0.1): two guarded servers in a chain.

The upstream has its own key (given to the gateway through $POTSTILL_UPSTREAM_KEY); the client only
holds a gateway key. Whole answers and streams pass through with the upstream's text, the gateway
meters by the upstream's usage, and its log keeps the served completions (the evidence `detect
--log-db` scores) with a verified chain.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from potstill.guard.logchain import load_log_key, verify
from potstill.guard.querylog import read_log
from tests.guard_fixtures import live_gateway, live_server, one_torch_thread, tiny_teacher


@pytest.fixture(scope="module")
def teacher():
    with one_torch_thread():
        yield tiny_teacher()


def test_gateway_in_front_of_potstill_serve(teacher, tmp_path, monkeypatch):
    with live_server(teacher, tmp_path / "up") as up:
        _, upstream_secret = up.keys.create("the-gateway", max_top_logprobs=None)
        monkeypatch.setenv("POTSTILL_UPSTREAM_KEY", upstream_secret)
        with live_gateway(up.base, tmp_path / "gw") as gw, httpx.Client(timeout=60) as http:
            key_id, secret = gw.keys.create("client", max_top_logprobs=2)
            h = {"Authorization": f"Bearer {secret}"}
            r = http.post(gw.base + "/completions", headers=h,
                          json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 7})
            assert r.status_code == 200, r.text
            whole = r.json()
            direct = http.post(up.base + "/completions", headers={"Authorization": f"Bearer {upstream_secret}"},
                               json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 7})
            assert whole["choices"][0]["text"] == direct.json()["choices"][0]["text"]  # the same model, seeded
            body = {"messages": [{"role": "user", "content": "Name two animals."}], "max_tokens": 10, "seed": 3,
                    "stream": True, "logprobs": True, "top_logprobs": 2}
            streamed, chunks = "", 0
            with http.stream("POST", gw.base + "/chat/completions", headers=h, json=body) as s:
                assert s.status_code == 200
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        ev = json.loads(line[6:])
                        assert "usage" not in ev or ev["usage"] is None  # the client did not ask for it
                        delta = ev["choices"][0]["delta"] if ev["choices"] else {}
                        streamed += delta.get("content") or ""
                        chunks += bool(ev["choices"] and ev["choices"][0].get("logprobs"))
            assert chunks >= 1
            assert http.get(gw.base + "/models", headers=h).json()["data"][0]["id"] == "tiny"
            assert http.post(gw.base + "/completions", json={"prompt": "x"}).status_code == 401
            deadline = time.time() + 10
            while True:
                gw.flush()
                rows = sorted(read_log(gw.querylog_url), key=lambda r: r["id"])
                if len(rows) >= 4 or time.time() > deadline:
                    break
                time.sleep(0.05)
    assert [r["status"] for r in rows] == [200, 200, 200, 401]
    first, second = rows[0], rows[1]
    assert first["key_id"] == key_id and first["completion"] == whole["choices"][0]["text"]
    assert (first["tokens_in"], first["tokens_out"]) == (whole["usage"]["prompt_tokens"],
                                                         whole["usage"]["completion_tokens"])
    assert second["completion"] == streamed and second["top_logprobs"] == 2 and second["error_type"] is None
    assert second["tokens_out"] >= 1 and second["tokens_in"] > 0  # the upstream's usage, asked for by the gateway
    assert verify(gw.querylog_url, load_log_key(None)).ok
