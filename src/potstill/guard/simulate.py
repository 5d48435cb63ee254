"""Labelled API traffic for calibrating and benchmarking the monitor (pure Python, seeded, no model).

    rows, truth = simulate(seed=1)          # query-log rows + {key_id: KeyTruth(kind, label, campaign)}
    write_log("sim.db", rows)               # through the real QueryLog (hash-chained SQLite)

Benign kinds: `person` (bursty sessions, varied questions), `chat_app` (one key behind an app: fixed system
prompt, users coming back to the same topics), `batch_eval` (log-probs on a fixed benchmark, run several
times, steady), `rag_app` (long templated retrieve-then-answer prompts). Extraction kinds: `sweep` (fast,
steady, templated, log-probs), `slow_low` (under rate limits, jittered timing, some requests without
log-probs), `paraphrase` (templates rewritten per request), and `campaign` (one operator spread over
`campaign_keys` keys, each small and slow, sharing templates, topics and sampling parameters).
The simulated rows carry no client address (the grouping does not use it yet), so campaigns share
everything except that.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.guard.querylog import QueryLog

T0 = 1_700_000_000.0
BENIGN = ("person", "chat_app", "batch_eval", "rag_app")
EXTRACTION = ("sweep", "slow_low", "paraphrase", "campaign")
DEFAULT_COUNTS = {"person": 16, "chat_app": 6, "batch_eval": 4, "rag_app": 5,
                  "sweep": 4, "slow_low": 5, "paraphrase": 5, "campaign": 1}

FIELDS = ("biology", "history", "physics", "economics", "geology", "chemistry", "music", "law", "medicine",
          "astronomy", "linguistics", "computing", "philosophy", "architecture", "ecology", "mathematics")
THINGS = ("photosynthesis", "revolution", "entanglement", "inflation", "tectonics", "enzymes", "harmony",
          "contracts", "vaccines", "pulsars", "phonology", "compilers", "ethics", "arches", "wetlands", "primes",
          "glaciers", "empires", "superconductors", "tariffs", "volcanoes", "polymers", "counterpoint", "torts",
          "antibiotics", "nebulae", "syntax", "databases", "epistemology", "cathedrals", "reefs", "topology",
          "monsoons", "senates", "lasers", "auctions", "fossils", "catalysts", "rhythm", "patents", "genomes",
          "comets", "dialects", "encryption", "logic", "bridges", "forests", "probability", "tsunamis", "guilds")
ASPECTS = ("history of", "key experiments in", "misconceptions about", "the mathematics of", "debates around",
           "everyday examples of", "open problems in", "the basics of", "recent advances in", "applications of")
TEMPLATES = (
    "Write a detailed explanation of {t}, including key facts, examples and common pitfalls.",
    "Explain {t} step by step to a university student, with one worked example.",
    "Give a comprehensive overview of {t} and list the five most important concepts.",
    "Answer as an expert tutor: what should every beginner know about {t}?",
    "### Instruction:\nDescribe {t} in depth.\n### Response:",
)
OPENERS = ("Explain", "Describe", "Tell me about", "Give an overview of", "Walk me through", "Summarise",
           "What is known about", "Could you cover", "I'd like to understand", "Teach me", "Break down",
           "Provide notes on")
CLOSERS = ("", ".", " in detail.", " with examples.", "? Be thorough.", ", briefly.", " for a textbook.",
           " like an expert would.", "; include pitfalls.", " - cite key facts.", ", step by step.", "!")
HUMAN = (
    "hey can you help me write a birthday message for my sister", "what's a good recipe for banana bread",
    "my python script crashes with KeyError when the dict is empty why", "why is the sky blue",
    "is it rude to leave a party without saying goodbye", "translate where is the train station into german",
    "I have chicken rice and broccoli, dinner ideas?", "how long should I boil an egg",
    "write a haiku about my cat ignoring me", "difference between affect and effect",
    "summarise hamlet in three sentences", "why does my sourdough come out dense",
    "names for a small coffee shop near the sea", "check my grammar: me and him goes to the store",
    "how do vaccines train the immune system", "tips for a first marathon", "what to pack for camping",
    "why do cats purr", "rewrite this email so it sounds less angry", "when did the berlin wall fall",
    "recommend a sci-fi novel like the martian", "plan a cheap 3 day trip to lisbon", "is coffee bad for you",
    "my tomato leaves are turning yellow", "short toast for my best friend's wedding",
    "explain compound interest simply", "what does per se mean", "how do I get red wine out of a carpet",
    "ok and what if it already dried", "stretches for lower back pain", "who painted girl with a pearl earring",
    "how do i decline a meeting from my boss", "gift for a dad who likes fishing", "why is the ocean salty",
    "convert 350 fahrenheit to celsius", "limerick about a forgetful robot", "how to memorise spanish words",
    "are tomatoes a fruit", "my landlord won't return my deposit", "how many cups in a liter",
    "describe the taste of durian", "can dogs eat grapes", "give me a pep talk i failed my driving test",
    "plural of octopus", "what is a mortgage rate lock", "why do onions make you cry", "bio for my pottery page",
    "board games for 2 players", "that's not right, try again shorter", "could you make it rhyme?",
    "how does noise cancelling work", "thank-you note to my kid's teacher", "is it safe to swim after eating",
    "cool down a hot room without AC", "who won the world cup in 2010", "ask neighbours to turn music down",
    "fun facts about octopuses for a 9 year old", "my sink is clogged and no plunger",
)
APP_TOPICS = {  # each chat app's users come back to a handful of topics
    "bank": ("reset my card pin", "dispute a charge from {n} days ago", "raise my transfer limit", "open a savings pot"),
    "shop": ("where is order {n}", "return the shoes I bought", "change my delivery address", "size guide for jackets"),
    "travel": ("rebook flight {n}", "baggage allowance for economy", "cancel my hotel", "visa for japan"),
    "telco": ("my internet is slow", "upgrade to plan {n}", "roaming charges in spain", "port my number"),
    "games": ("how do I beat level {n}", "refund a purchase", "link my account", "report a cheater"),
    "school": ("explain fractions", "help with essay on {n} words", "practice quiz on verbs", "what is photosynthesis"),
}


@dataclass(frozen=True)
class KeyTruth:
    """What the simulator did with one key."""

    kind: str
    label: int  # 1: extraction, 0: benign
    campaign: str  # ground-truth group: the campaign's id, else the key itself


def _row(key, ts, prompt, params, lp=False, top=None, endpoint="/v1/chat/completions", tin=40, tout=120) -> dict:
    return {"key_id": key, "ts": ts, "method": "POST", "endpoint": endpoint, "model": "served",
            "prompt": prompt, "params": params, "tokens_in": tin, "tokens_out": tout, "logprobs": lp,
            "top_logprobs": top if lp else None, "latency_ms": 400.0, "status": 200}


def _chat(text: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": text}]


def _subjects(rng: random.Random) -> list[str]:
    subs = [f"{a} {t} in {f}" for f in FIELDS for t in THINGS for a in ASPECTS]
    rng.shuffle(subs)
    return subs


def _person(rng: random.Random, key: str, t0: float) -> list[dict]:
    rows, t = [], t0
    params = rng.choice([{}, {"temperature": 0.7}, {"temperature": 1.0, "max_tokens": 512}])
    for i, p in enumerate(rng.sample(HUMAN, rng.randint(12, 45))):
        t += rng.uniform(2, 20) * 3600 if i and rng.random() < 0.25 else rng.lognormvariate(3.5, 1.0)
        text = p + rng.choice(["", "", "?", " please", " thanks", "!!"])
        rows.append(_row(key, t, _chat(text, "You are a helpful assistant."), params, lp=rng.random() < 0.05, top=5))
    return rows


def _chat_app(rng: random.Random, key: str, t0: float) -> list[dict]:
    app = rng.choice(sorted(APP_TOPICS))
    topics, system = APP_TOPICS[app], f"You are the {app} support assistant. Be concise and friendly."
    params = {"temperature": round(rng.uniform(0.2, 0.8), 1), "max_tokens": 300}
    rows, t = [], t0
    for _ in range(rng.randint(150, 400)):  # many end users: Poisson-ish with a daily swing
        t += rng.expovariate(1 / rng.choice([20, 60, 300]))
        text = rng.choice(topics).format(n=rng.randint(2, 999)) + rng.choice(["", "?", " please", " asap"])
        rows.append(_row(key, t, _chat(text, system), params))
    return rows


def _benchmark(seed: int) -> list[str]:
    """A public multiple-choice benchmark (the same for every key of a seed)."""
    rng = random.Random(f"benchmark-{seed}")
    return [f"Question: which statement about {rng.choice(THINGS)} in {rng.choice(FIELDS)} is true?\n"
            f"A) {rng.choice(THINGS)} B) {rng.choice(THINGS)} C) {rng.choice(THINGS)} D) none\nAnswer:"
            for _ in range(300)]


def _batch_eval(rng: random.Random, key: str, t0: float, benchmark: list[str]) -> list[dict]:
    start = rng.randrange(0, 200)
    bench = benchmark[start:start + rng.randint(60, 100)]  # one task of the public benchmark
    params = {"temperature": 0.0, "max_tokens": 1}
    rows, t = [], t0
    for _ in range(rng.randint(2, 4)):  # the same benchmark for several model versions
        for q in bench:
            t += rng.uniform(0.3, 0.6)
            rows.append(_row(key, t, q, params, lp=True, top=rng.choice([5, 10]), endpoint="/v1/completions",
                             tout=1))
        t += rng.uniform(1, 48) * 3600
    return rows


def _rag_app(rng: random.Random, key: str, t0: float) -> list[dict]:
    params = {"temperature": 0.1, "max_tokens": 400}
    docs = [" ".join(rng.choice(THINGS + FIELDS) for _ in range(40)) for _ in range(12)]
    rows, t = [], t0
    for _ in range(rng.randint(80, 300)):
        t += rng.expovariate(1 / 90)
        q = rng.choice(HUMAN)
        text = (f"Use only the context to answer.\nContext:\n{rng.choice(docs)}\n{rng.choice(docs)}\n"
                f"Question: {q}\nAnswer:")
        rows.append(_row(key, t, _chat(text), params, tin=900))
    return rows


def _extract(rng: random.Random, key: str, t0: float, kind: str, subjects: list[str], params: dict,
             n: int, gap: tuple[float, float], lp_share: float = 1.0, templates=TEMPLATES,
             completions: bool = False) -> list[dict]:
    rows, t = [], t0
    for _ in range(n):
        if kind == "sweep":  # a script: steady
            t += rng.uniform(*gap)
        elif kind == "paraphrase":  # concurrent workers: Poisson arrivals
            t += rng.expovariate(2 / sum(gap))
        else:  # disguised: bursty, human-like gaps (CV > 1)
            t += rng.lognormvariate(0, 1.2) * sum(gap) / 4
        s = subjects.pop()
        if kind == "paraphrase":
            text = f"{rng.choice(OPENERS)} {s}{rng.choice(CLOSERS)}"
        else:
            text = rng.choice(templates).format(t=s)
        prompt, endpoint = (text, "/v1/completions") if completions else (_chat(text), "/v1/chat/completions")
        rows.append(_row(key, t, prompt, params, lp=rng.random() < lp_share, top=params.get("top", 5),
                         endpoint=endpoint))
    return rows


def simulate(seed: int = 0, counts: dict[str, int] | None = None,
             campaign_keys: int = 50, campaign_requests: tuple[int, int] = (15, 30)) -> tuple[list[dict[str, Any]], dict[str, KeyTruth]]:
    """Rows (sorted by time) and the truth per key. Same seed -> same rows.

    `campaign_requests`: (fewest, most) requests per campaign key.
    """
    rng = random.Random(seed)
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    subjects = _subjects(rng)
    rows: list[dict] = []
    truth: dict[str, KeyTruth] = {}
    makers = {"person": _person, "chat_app": _chat_app, "batch_eval": _batch_eval, "rag_app": _rag_app}
    for kind in BENIGN:
        for i in range(counts[kind]):
            key = f"{kind}-{seed}-{i}"
            extra = (_benchmark(seed),) if kind == "batch_eval" else ()
            rows += makers[kind](rng, key, T0 + rng.uniform(0, 86400), *extra)
            truth[key] = KeyTruth(kind, 0, key)
    for i in range(counts["sweep"]):
        key = f"sweep-{seed}-{i}"
        params = {"temperature": 1.0, "max_tokens": 256, "top": rng.choice([5, 10, 20])}
        rows += _extract(rng, key, T0 + rng.uniform(0, 86400), "sweep", subjects, params, rng.randint(200, 500),
                         (1.2, 1.8), completions=i % 2 == 1)
        truth[key] = KeyTruth("sweep", 1, key)
    for i in range(counts["slow_low"]):  # ~1 request/minute, jittered, over a few hours; some without log-probs
        key = f"slow_low-{seed}-{i}"
        params = {"temperature": 0.8, "max_tokens": 512, "top": 5}
        rows += _extract(rng, key, T0 + rng.uniform(0, 86400), "slow_low", subjects, params, rng.randint(80, 200),
                         (30.0, 90.0), lp_share=rng.uniform(0.3, 1.0), templates=rng.sample(TEMPLATES, 2))
        truth[key] = KeyTruth("slow_low", 1, key)
    for i in range(counts["paraphrase"]):
        key = f"paraphrase-{seed}-{i}"
        params = {"temperature": 0.9, "top": 10}
        rows += _extract(rng, key, T0 + rng.uniform(0, 86400), "paraphrase", subjects, params,
                         rng.randint(100, 300), (2.0, 20.0), lp_share=rng.uniform(0.5, 1.0),
                         completions=i % 2 == 1)
        truth[key] = KeyTruth("paraphrase", 1, key)
    for c in range(counts["campaign"]):  # one operator, many small keys, shared templates and params
        camp = f"campaign-{seed}-{c}"
        params = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 384, "top": 5}
        templates = rng.sample(TEMPLATES, 3)
        start = T0 + rng.uniform(0, 86400)
        for i in range(campaign_keys):
            key = f"{camp}-k{i}"
            rows += _extract(rng, key, start + rng.uniform(0, 7200), "campaign", subjects, params,
                             rng.randint(*campaign_requests), (60.0, 300.0), lp_share=rng.uniform(0.3, 1.0), templates=templates)
            truth[key] = KeyTruth("campaign", 1, camp)
    for r in rows:
        p = r["params"]
        if "top" in p:
            r["params"] = {k: v for k, v in p.items() if k != "top"}
    rows.sort(key=lambda r: (r["ts"], r["key_id"]))
    return rows, truth


def write_log(url: str | Path, rows: list[dict[str, Any]], key: bytes | None = None) -> None:
    """Write rows through the real QueryLog (hash-chained), in time order."""
    log = QueryLog(url, key=key or b"simulated-traffic-log-key-0123456789")
    try:
        for r in rows:
            log.record(r)
    finally:
        log.close()
