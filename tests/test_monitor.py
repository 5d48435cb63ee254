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
from potstill.guard.querylog import QueryLog

HUMAN_PROMPTS = [
    "hey, can you help me write a birthday message for my sister? she's turning 30",
    "what's a good recipe for banana bread without eggs",
    "my python script crashes with KeyError when the dict is empty, why?",
    "Explain like I'm five: why is the sky blue",
    "is it rude to leave a party without saying goodbye",
    "translate 'where is the train station' into german",
    "I have chicken, rice and broccoli. dinner ideas?",
    "how long should I boil an egg for a runny yolk",
    "write a haiku about my cat ignoring me",
    "what's the difference between affect and effect",
    "summarise the plot of hamlet in three sentences",
    "Why does my sourdough come out so dense?",
    "give me 5 names for a small coffee shop near the sea",
    "can you check this sentence for grammar: me and him goes to the store yesterday",
    "how do vaccines train the immune system",
    "tips for a first marathon? i'm nervous",
    "what should I pack for a weekend of camping in october",
    "why do cats purr",
    "rewrite this email so it sounds less angry: I told you twice already to send the invoice",
    "what year did the berlin wall fall and why",
    "recommend a sci-fi novel like the martian",
    "help me plan a cheap 3 day trip to lisbon",
    "is coffee bad for you if you drink four cups a day",
    "my tomato plant leaves are turning yellow, what's wrong",
    "write a short toast for my best friend's wedding, funny but sweet",
    "explain compound interest with a simple example",
    "what does 'per se' actually mean",
    "how do I get red wine out of a carpet??",
    "ok and what if it already dried",
    "thanks! also does baking soda work on old stains",
    "suggest a stretching routine for lower back pain after sitting all day",
    "who painted the girl with a pearl earring",
    "how do i politely decline a meeting invite from my boss",
    "what's a good gift for a dad who likes fishing and jazz",
    "why is the ocean salty but rivers aren't",
    "convert 350 fahrenheit to celsius",
    "write a limerick about a forgetful robot",
    "what's the best way to memorize vocabulary for a spanish exam next week",
    "are tomatoes a fruit or a vegetable, settle this argument",
    "my landlord won't return my deposit, what are my options in california",
    "how many cups are in a liter",
    "describe the taste of durian to someone who's never had it",
    "can dogs eat grapes",
    "what time zone is new zealand in right now",
    "give me a pep talk, I failed my driving test again",
    "what's the plural of octopus",
    "explain what a mortgage rate lock is",
    "why do onions make you cry and how do chefs avoid it",
    "draft a short bio for my pottery instagram",
    "what are some board games for 2 players that aren't chess",
    "hmm that's not right, try again but shorter",
    "could you make it rhyme?",
    "how does noise cancelling in headphones work",
    "write a thank-you note to my kid's teacher",
    "is it safe to swim after eating",
    "what's a quick way to cool down a hot room without AC",
    "who won the world cup in 2010",
    "what's a polite way to ask neighbours to turn the music down",
    "list some fun facts about octopuses for a 9 year old",
    "help, my sink is clogged and I don't have a plunger",
]

TOPICS = [
    "photosynthesis", "the french revolution", "quantum entanglement", "supply and demand", "plate tectonics",
    "the krebs cycle", "byzantine architecture", "neural networks", "the roman senate", "black holes",
    "keynesian economics", "mitochondria", "the silk road", "game theory", "volcanic eruptions",
    "the printing press", "antibiotic resistance", "baroque music", "ocean currents", "the cold war",
    "cryptography", "plant hormones", "the industrial revolution", "string theory", "coral reefs",
    "medieval castles", "blockchain consensus", "the immune response", "impressionist painting", "glaciers",
    "the ottoman empire", "enzyme kinetics", "jazz improvisation", "monetary policy", "the water cycle",
    "viking navigation", "relational databases", "greek tragedy", "solar wind", "the human genome",
]
QUALIFIERS = ["", "early history of ", "modern research on ", "common misconceptions about ", "the mathematics of ",
              "ethical debates around ", "key experiments in ", "everyday examples of "]
TEMPLATES_A = [
    "Write a detailed explanation of {t}, including key facts, examples and common pitfalls.",
    "Explain {t} step by step to a university student, with one worked example.",
    "Give a comprehensive overview of {t} and list the five most important concepts.",
    "Answer as an expert tutor: what should every beginner know about {t}?",
]
TEMPLATES_B = [
    "### Instruction:\nDescribe {t} in depth.\n### Response:",
    "Q: What are the main ideas behind {t}? Answer thoroughly.\nA:",
    "Task: summarise the current understanding of {t} for an encyclopedia entry.",
]


def _human_rows(rng: random.Random, key_id: str, t0: float) -> list[dict]:
    prompts = rng.sample(HUMAN_PROMPTS, rng.randint(15, 40))
    rows, t = [], t0
    for i, p in enumerate(prompts):
        # sessions of a few messages (gaps of ~20 s to minutes) separated by hours
        t += rng.uniform(2, 8) * 3600 if i and rng.random() < 0.25 else rng.lognormvariate(3.5, 1.0)
        messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}]
        lp = rng.random() < 0.05
        rows.append(_row(key_id, t, messages, lp))
    return rows


def _extractor_rows(rng: random.Random, key_id: str, t0: float, n: int, templates: list[str], steady: bool,
                    completions: bool = False) -> list[dict]:
    subjects = [q + t for t in TOPICS for q in QUALIFIERS]
    rng.shuffle(subjects)
    rows, t = [], t0
    for i in range(n):
        t += rng.uniform(1.35, 1.65) if steady else rng.expovariate(1 / 1.5)
        text = rng.choice(templates).format(t=subjects[i % len(subjects)])
        prompt = text if completions else [{"role": "user", "content": text}]
        rows.append(_row(key_id, t, prompt, True, top=rng.choice([5, 10, 20]), completions=completions))
    return rows


def _row(key_id, ts, prompt, logprobs, top=None, completions=False) -> dict:
    return {
        "key_id": key_id, "ts": ts, "method": "POST",
        "endpoint": "/v1/completions" if completions else "/v1/chat/completions",
        "prompt": prompt, "params": {"max_tokens": 256}, "tokens_in": 40, "tokens_out": 100,
        "logprobs": logprobs, "top_logprobs": top if logprobs else None, "latency_ms": 500.0, "status": 200,
    }


def _write(url: str, rows: list[dict]) -> None:
    log = QueryLog(url)
    for r in sorted(rows, key=lambda r: r["ts"]):
        log.record(r)
    log.close()


@pytest.fixture
def traffic(tmp_path):
    rng = random.Random(7)
    t0 = 1_700_000_000.0
    rows = []
    humans = [f"human{i}" for i in range(6)]
    for h in humans:
        rows += _human_rows(rng, h, t0 + rng.uniform(0, 3600))
    return tmp_path / "queries.db", rows, humans, rng, t0


def test_one_extractor_ranks_first_and_people_stay_below_threshold(traffic):
    url, rows, humans, rng, t0 = traffic
    rows += _extractor_rows(rng, "extractor", t0, 400, TEMPLATES_A, steady=True)
    _write(url, rows)
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
    rows += _extractor_rows(rng, "steady", t0, 400, TEMPLATES_A, steady=True)
    rows += _extractor_rows(rng, "poisson", t0 + 500, 200, TEMPLATES_B, steady=False, completions=True)
    _write(url, rows)
    risks = score_keys(url)
    assert {r.key_id for r in risks[:2]} == {"steady", "poisson"}, format_table(risks)
    assert all(r.flagged for r in risks[:2])
    assert not any(r.flagged for r in risks[2:])
    assert len(risks) == len(humans) + 2


def test_report_table_and_throttle(traffic, tmp_path):
    url, rows, humans, rng, t0 = traffic
    store = KeyStore(tmp_path / "keys.db")
    kid, _ = store.create("suspect", rpm=100, tpm=None)
    rows += _extractor_rows(rng, kid, t0, 300, TEMPLATES_A, steady=True)
    _write(url, rows)
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


def test_time_window_and_min_requests(traffic):
    url, rows, humans, rng, t0 = traffic
    _write(url, rows)
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
