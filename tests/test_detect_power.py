"""`potstill study detect-power` end to end on a tiny teacher: every setting, control and artefact is there."""

from __future__ import annotations

import json

from potstill.studies.detect_power import DetectPowerConfig, prefix_capture, run_detect_power


def test_detect_power_study_tiny(tmp_path, tiny_model_dir, prompts_file):
    out = tmp_path / "power"
    cfg = DetectPowerConfig(teacher=str(tiny_model_dir), prompts=prompts_file, out=str(out), budgets=[80, 40],
                            steps=[2, 1], student="prune:depth:2", lr=3e-3, batch_size=4, samples=1, max_new_tokens=8,
                            gen_batch_size=12, clean_prompts=4, null_keys=20, wrong_keys=2, ppl_rows=4)
    assert cfg.budgets == [40, 80] and cfg.steps == [1, 2]
    lines: list[str] = []
    result = run_detect_power(cfg, log=lines.append)
    saved = json.loads((out / "results.json").read_text())
    # largest budget first, then every control, then the smaller budget (a stopped run keeps the headline)
    assert [s["budget"] for s in saved["settings"]] == [80] * 4 + [40] * 4
    order = [("control" if "control " in line else "setting") for line in lines if "[detect-power]" in line
             and (" control " in line or " step " in line)]
    assert order == ["setting"] * 4 + ["control"] * 7 + ["setting"] * 4
    assert saved["settings"] == json.loads(json.dumps(result["settings"]))
    assert {(s["loss"], s["budget"], s["step"]) for s in saved["settings"]} == {
        (loss, b, st) for loss in ("ce", "fkl") for b in (40, 80) for st in (1, 2)}
    for s in saved["settings"]:
        assert s["served_tokens"] >= s["budget"] and s["n_contexts"] > 0 and 0 < s["p_value"] <= 1
        assert 0 < s["argmax_p"] <= 1 and 0 < s["logit_p"] <= 1 and s["null_sd"] > 0
    kinds = [c["control"] for c in saved["controls"]]
    assert kinds.count("wrong key") == 4 and len(kinds) == 7
    assert {"never-trained student", "ce student of unwatermarked text", "unwatermarked teacher"} <= set(kinds)
    assert all(0 < c["p_value"] <= 1 for c in saved["controls"])
    assert saved["perplexity"]["watermarked"]["ppl"] > 0 and len(saved["tokens_needed"]) == 4
    table = (out / "table.md").read_text()
    assert "p (mass)" in table and "unwatermarked teacher" in table and (out / "power.png").stat().st_size > 1000
    from PIL import Image

    w, h = Image.open(out / "power.png").size
    assert w > 2 * h  # two panels: p against served tokens and against steps
    assert "key" not in saved["watermark"] or "fingerprint" in json.dumps(saved["watermark"])


def test_prefix_capture_takes_whole_shards(tmp_path, tiny_model_dir, prompts_file):
    from potstill.capture.generate import generate
    from potstill.capture.store import Capture
    from potstill.config import GenerateConfig

    src = tmp_path / "cap"
    generate(GenerateConfig(teacher=str(tiny_model_dir), prompts=prompts_file, out=str(src), max_new_tokens=6,
                            top_k=4, heldout=0.0, shard_rows=3, dtype="float32"), log=lambda *a: None)
    full = Capture.open(src)
    first = full.manifest["shards"][0]["completion_tokens"]
    sub = Capture.open(prefix_capture(src, tmp_path / "sub", first))  # verified: sha256 of every shard
    assert len(sub) == 3 and sub.manifest["counts"]["completion_tokens"] == first
    assert len(Capture.open(prefix_capture(src, tmp_path / "all", 10**9))) == len(full)
