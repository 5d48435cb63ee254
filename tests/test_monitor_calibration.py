"""monitor calibration and campaigns on simulated traffic written through the real query log (SQLite)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from potstill.bench.monitor import prec_recall, roc_auc
from potstill.guard import monitor as mon
from potstill.guard.campaigns import format_campaigns, score_campaigns
from potstill.guard.ratelimit import DEFAULT_RPM
from potstill.guard.simulate import BENIGN, EXTRACTION, simulate, write_log

HELD_OUT = 2  # the weights in monitor.py were fitted on seed 1


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    rows, truth = simulate(HELD_OUT)
    url = tmp_path_factory.mktemp("sim") / "queries.db"
    write_log(url, rows)
    return url, rows, truth


def test_simulator_is_deterministic_by_seed():
    small = {"person": 3, "chat_app": 1, "batch_eval": 1, "rag_app": 1, "sweep": 1, "slow_low": 1, "paraphrase": 1}
    a, ta = simulate(5, small, campaign_keys=5)
    b, tb = simulate(5, small, campaign_keys=5)
    c, _ = simulate(6, small, campaign_keys=5)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) and ta == tb
    assert json.dumps(a, sort_keys=True) != json.dumps(c, sort_keys=True)
    kinds = Counter(t.kind for t in ta.values())
    assert set(kinds) == set(BENIGN) | set(EXTRACTION) and kinds["campaign"] == 5
    assert all(t.label == (t.kind in EXTRACTION) for t in ta.values())


def test_calibrated_scores_beat_hand_set_on_held_out_seed(held_out):
    url, _, truth = held_out
    risks = mon.score_keys(url)
    assert {r.key_id for r in risks} == set(truth)
    labels = [truth[r.key_id].label for r in risks]
    after = [r.risk for r in risks]
    before = [mon.legacy_risk(r.features) for r in risks]
    auc_after, auc_before = roc_auc(after, labels), roc_auc(before, labels)
    assert auc_after >= 0.95 and auc_after > auc_before, (auc_before, auc_after)
    pr = prec_recall(after, labels, mon.THRESHOLD)
    assert pr["precision"] >= 0.9 and pr["recall"] >= 0.9, pr
    # the hand-set score misses most disguised extraction at its own threshold
    assert prec_recall(before, labels, mon.LEGACY_THRESHOLD)["recall"] < 0.5


def test_coverage_measures_breadth_not_volume():
    """Asking the same 20 questions 10 times is no broader than asking them once."""
    qs = [f"what is the capital of {c}" for c in "france spain italy peru chile japan kenya egypt india china "
          "norway sweden poland greece brazil canada mexico cuba iran iraq".split()]
    once = mon.key_features([{"ts": float(i), "prompt": q} for i, q in enumerate(qs)])
    many = mon.key_features([{"ts": float(i), "prompt": qs[i % 20]} for i in range(200)])
    assert mon.component_scores(many)["coverage"] < 0.5 * mon.component_scores(once)["coverage"]
    assert mon.component_scores(many)["novelty"] == pytest.approx(0.1)


def test_fifty_key_campaign_under_per_key_thresholds_is_flagged_as_one_campaign(held_out):
    url, rows, truth = held_out
    members = {k for k, t in truth.items() if t.kind == "campaign"}
    assert len(members) == 50
    by_key = mon.rows_by_key(url)
    for k in members:  # each key alone: under the rate limit and under the hand-set per-key threshold
        per_minute = Counter(int(r["ts"] // 60) for r in by_key[k])
        assert max(per_minute.values()) < DEFAULT_RPM
        assert mon.legacy_risk(mon.key_features(by_key[k])) < mon.LEGACY_THRESHOLD
    camps = score_campaigns(url)
    big = max(camps, key=lambda c: len(set(c.keys) & members))
    assert len(set(big.keys) & members) >= 45 and big.flagged, format_campaigns(camps)
    assert big.pooled is not None and big.pooled.n_requests >= 45 * 15
    for c in camps:  # no benign key is grouped with extraction keys
        labels = {truth[k].label for k in c.keys}
        assert len(labels) == 1, (c.campaign_id, c.keys)
        if labels == {0}:
            assert not c.flagged, format_campaigns(camps)


def test_cli_monitor_campaigns_and_bench(held_out, tmp_path):
    from click.testing import CliRunner

    from potstill.cli import app

    url, _, truth = held_out
    runner = CliRunner()
    res = runner.invoke(app, ["monitor", "--log-db", str(url), "--campaigns", "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "c.json").read_text())
    top = report["campaigns"][0]
    assert top["flagged"] and all(truth[k].label == 1 for k in top["keys"]) and "campaign:" in res.output
    res = runner.invoke(app, ["bench", "monitor", "--fitted", "--test-seed", str(HELD_OUT),
                              "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["weights"] == mon.WEIGHTS and bench["n_keys"]["campaign"] == 50
    assert bench["key_after"]["auc"] > bench["key_before"]["auc"]
    assert "| key | fitted |" in (tmp_path / "b.md").read_text()
