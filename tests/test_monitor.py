"""monitor: generated traffic written through the real query log; extractors must rank above people."""

from __future__ import annotations

import json
import random

import pytest

from potstill.guard.keys import KeyStore
from potstill.guard.monitor import (
    THRESHOLD,
    format_table,
    prompt_words,
    score_keys,
    template_share,
    throttle,
    timing_cv,
    write_report,
)
from tests.traffic_fixtures import (
    HUMAN_PROMPTS,
    TEMPLATES_A,
    TEMPLATES_B,
    extractor_rows,
    human_rows,
    write_rows,
)


@pytest.fixture
def traffic(tmp_path):
    rng = random.Random(7)
    t0 = 1_700_000_000.0
    rows = []
    humans = [f"human{i}" for i in range(6)]
    for h in humans:
        rows += human_rows(rng, h, t0 + rng.uniform(0, 3600))
    return tmp_path / "queries.db", rows, humans, rng, t0


def test_one_extractor_ranks_first_and_people_stay_below_threshold(traffic):
    url, rows, humans, rng, t0 = traffic
    rows += extractor_rows(rng, "extractor", t0, 400, TEMPLATES_A, steady=True)
    write_rows(url, rows)
    risks = score_keys(url)
    by = {r.key_id: r for r in risks}
    assert risks[0].key_id == "extractor" and risks[0].flagged
    for h in humans:
        assert by[h].risk < THRESHOLD and not by[h].flagged, format_table(risks)
    # the components separate for the reasons given in the module table
    ex = by["extractor"].scores
    assert ex["logprobs"] == 1.0 and ex["template"] > 0.8 and ex["timing"] > 0.7
    assert max(by[h].scores["timing"] for h in humans) < 0.2
    assert max(by[h].scores["template"] for h in humans) < 0.4


def test_two_extractors_rank_above_every_person(traffic):
    url, rows, humans, rng, t0 = traffic
    rows += extractor_rows(rng, "steady", t0, 400, TEMPLATES_A, steady=True)
    rows += extractor_rows(rng, "poisson", t0 + 500, 200, TEMPLATES_B, steady=False, completions=True)
    write_rows(url, rows)
    risks = score_keys(url)
    assert {r.key_id for r in risks[:2]} == {"steady", "poisson"}, format_table(risks)
    assert all(r.flagged for r in risks[:2])
    assert not any(r.flagged for r in risks[2:])
    assert len(risks) == len(humans) + 2


def test_report_table_and_throttle(traffic, tmp_path):
    url, rows, humans, rng, t0 = traffic
    store = KeyStore(tmp_path / "keys.db")
    kid, _ = store.create("suspect", rpm=100, tpm=None, max_top_logprobs=20)
    rows += extractor_rows(rng, kid, t0, 300, TEMPLATES_A, steady=True)
    write_rows(url, rows)
    risks = score_keys(url)
    table = format_table(risks)
    assert kid in table and "YES" in table and len(table.splitlines()) == len(risks) + 2
    write_report(tmp_path / "report.json", risks, log=str(url))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["keys"][0]["key_id"] == kid and report["threshold"] == THRESHOLD
    new = throttle(store, [r.key_id for r in risks if r.flagged], factor=0.1, default_tpm=50_000)
    assert new == {kid: (10, 5_000)}
    rec = store.get(kid)
    assert (rec.rpm, rec.tpm) == (10, 5_000)
    assert rec.max_top_logprobs == 0  # a flagged key keeps text only: no more log-probs to distil from


def test_time_window_and_min_requests(traffic):
    url, rows, humans, rng, t0 = traffic
    write_rows(url, rows)
    assert score_keys(url, since=t0 + 10**7) == []
    assert {r.key_id for r in score_keys(url)} == set(humans)
    assert score_keys(url, min_requests=10**6) == []


def test_feature_helpers():
    assert prompt_words("Order #123 costs $4.50 at https://x.io now") == ["order", "numtoken", "costs", "numtoken",
                                                                          "at", "urltoken", "now"]
    chat = [{"role": "system", "content": "SYS"}, {"role": "user", "content": [{"type": "text", "text": "Hi you"}]}]
    assert prompt_words(chat) == ["hi", "you"]
    assert prompt_words([5, 6]) == ["t5", "t6"]
    templ = [f"please write a long essay about {w} for my class".split() for w in ["cats", "dogs", "rain", "tea"]]
    assert template_share(templ) == 1.0
    assert template_share([p.split() for p in HUMAN_PROMPTS[:20]]) < 0.2
    cv, gaps = timing_cv([0, 1, 2, 3, 4, 5])
    assert cv == 0.0 and gaps == 5
