"""The whole guard story over real HTTP on 127.0.0.1, with the real embedded teacher.

serve (watermarked) -> `potstill generate` over HTTP -> `potstill train` (fkl and ce) -> `potstill detect`.
Controls: a wrong key, and the student as built before training (never saw our outputs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

KEY = "e2e-watermark-secret-7f3a9c"
# Sized to what the flow proves, not to a fast CPU: a few thousand served tokens give enough scored
# (context, token) pairs for p < 1e-6 on the fkl student, and the controls need no scale at all.
N_PROMPTS = int(os.environ.get("POTSTILL_E2E_PROMPTS", "48"))
SAMPLES = int(os.environ.get("POTSTILL_E2E_SAMPLES", "2"))
NEW_TOKENS = int(os.environ.get("POTSTILL_E2E_TOKENS", "48"))
STEPS = {"fkl": int(os.environ.get("POTSTILL_E2E_STEPS", "30")), "ce": int(os.environ.get("POTSTILL_E2E_CE_STEPS", "20"))}
OFF_PROMPTS, OFF_STEPS = 16, 10  # the watermark-off control: a null result needs no scale


def cli(*args, env=None, timeout=1800):
    res = subprocess.run([sys.executable, "-m", "potstill.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert res.returncode == 0, f"{args[0]} failed:\n{res.stderr[-3000:]}"
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_flow(root, watermark: bool, losses: dict[str, int], n_prompts: int, samples: int) -> dict:
    """serve (watermark on/off) -> generate over HTTP -> train one student per loss; returns the paths."""
    env = {**os.environ, "POTSTILL_WATERMARK_KEY": KEY}
    server_env = dict(env) if watermark else {k: v for k, v in os.environ.items() if k != "POTSTILL_WATERMARK_KEY"}
    keys_db, log_db = str(root / "keys.db"), str(root / "queries.db")
    secret = cli("keys", "create", "distiller", "--db", keys_db, "--rpm", "100000", "--tpm", "100000000",
                 "--max-top-logprobs", "server",
                 env=env).stdout.strip()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "potstill.cli", "serve", "embedded", "--port", str(port), "--keys-db", keys_db,
         "--log-db", log_db, "--max-batch-size", "32"],
        env=server_env, stdout=subprocess.DEVNULL, stderr=open(root / "serve.log", "w"),
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("server did not come up: " + (root / "serve.log").read_text()[-2000:])
        client_env = {**os.environ, "OPENAI_API_KEY": secret}
        client_env.pop("POTSTILL_WATERMARK_KEY", None)  # the distiller does not know the key
        cli("generate", "--teacher", f"http://127.0.0.1:{port}/v1", "--tokenizer", "embedded",
            "--prompts", "builtin:seed_tasks", "--max-prompts", str(n_prompts), "--max-new-tokens", str(NEW_TOKENS),
            "--top-k", "20", "--batch-size", "32", "--samples", str(samples), "--heldout", "0.1",
            "--out", str(root / "capture"), env=client_env)
    finally:
        server.terminate()
        server.wait(timeout=60)
    students = {}
    for loss, steps in losses.items():
        out = root / f"student-{loss}"
        cli("train", "--capture", str(root / "capture"), "--student", "prune:depth:8", "--loss", loss,
            "--max-steps", str(steps), "--batch-size", "8", "--lr", "5e-4", "--checkpoint-every", "0",
            "--out", str(out), env=client_env)
        students[loss] = out
    return {"root": root, "students": students, "env": env, "log_db": log_db}


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    return run_flow(tmp_path_factory.mktemp("guard-e2e"), True, STEPS, N_PROMPTS, SAMPLES)


def detect(flow, path, key=KEY):
    """Open-weights detection on the answers we served (the query log), as a model owner would run it
    (once per suspect and key: the result is kept in the flow). The default statistic: the suspect's
    green probability mass, calibrated on 200 random keys (guard/greenmass.py)."""
    out = path.parent / f"detect-{path.name}-{abs(hash(key)) % 1000}.json"
    if out.exists():
        return json.loads(out.read_text())
    env = flow["env"]
    cli("detect", "--suspect", str(path), "--log-db", flow["log_db"], "--max-tokens", "20000", "--out", str(out),
        env={**env, "POTSTILL_WATERMARK_KEY": key})
    return json.loads(out.read_text())


def test_capture_came_over_http_and_was_logged(flow):
    manifest = json.loads((flow["root"] / "capture" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["teacher"]["backend"] == "http"
    assert manifest["counts"]["rows"] == N_PROMPTS * SAMPLES
    from potstill.guard.querylog import read_log

    rows = read_log(flow["log_db"])
    ok = [r for r in rows if r["status"] == 200 and r["endpoint"] in ("/v1/chat/completions", "/v1/completions")]
    assert len(ok) >= N_PROMPTS * SAMPLES and all(r["logprobs"] and r["completion"] for r in ok)
    assert KEY not in (flow["root"] / "queries.db").read_bytes().decode("latin-1")


def test_fkl_student_detected(flow):
    res = detect(flow, flow["students"]["fkl"])
    print("fkl student:", res)
    assert res["statistic"] == "mass" and res["positions"] <= 20000
    # CI scale: 48 prompts x 2 samples x <= 48 tokens served, 30 steps
    assert res["p_value"] < 1e-6


def test_ce_student_carries_less_watermark_than_fkl(flow):
    """Sampled text alone (ce) transfers less of the mark than the top-k log-probs (fkl): a weaker p-value."""
    ce = detect(flow, flow["students"]["ce"])
    fkl = detect(flow, flow["students"]["fkl"])
    print("ce student:", ce)
    assert ce["positions"] > 1000 and ce["null_keys"] == 200
    assert ce["log10_p"] > fkl["log10_p"]


def test_wrong_key_is_not_detected(flow):
    res = detect(flow, flow["students"]["fkl"], key="some-other-secret-5e0b7d2a91c4")
    print("wrong key:", res)
    assert res["p_value"] > 0.01


def test_never_trained_model_is_not_detected(flow):
    """Null control: the same student architecture built from the teacher but never trained on our outputs."""
    from potstill.capture.prompts import load_prompts
    from potstill.students import build_student
    from potstill.teachers.hf import resolve_model_dir

    tok_dir = resolve_model_dir("embedded")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    calib = [tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True)["input_ids"]
             for p in load_prompts("builtin:seed_tasks")[:16]]
    model, tokenizer, _ = build_student("prune:depth:8", tok_dir, calib)
    out = flow["root"] / "student-untrained"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    res = detect(flow, out)
    print("never trained:", res)
    assert res["p_value"] > 0.01


def test_watermark_off_flow_is_not_detected(tmp_path_factory):
    """Control: the same flow against a server with the watermark off; detection with our key finds nothing."""
    off = run_flow(tmp_path_factory.mktemp("guard-e2e-off"), False, {"fkl": OFF_STEPS}, OFF_PROMPTS, 1)
    res = detect(off, off["students"]["fkl"])
    print("watermark off:", res)
    assert res["p_value"] > 0.01
