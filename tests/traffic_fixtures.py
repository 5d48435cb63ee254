"""Simulated query-log traffic for the monitor tests: people asking varied questions, extractors filling templates."""

from __future__ import annotations

import random

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


def human_rows(rng: random.Random, key_id: str, t0: float) -> list[dict]:
    prompts = rng.sample(HUMAN_PROMPTS, rng.randint(15, 40))
    rows, t = [], t0
    for i, p in enumerate(prompts):
        # sessions of a few messages (gaps of ~20 s to minutes) separated by hours
        t += rng.uniform(2, 8) * 3600 if i and rng.random() < 0.25 else rng.lognormvariate(3.5, 1.0)
        messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}]
        lp = rng.random() < 0.05
        rows.append(log_row(key_id, t, messages, lp))
    return rows


def extractor_rows(rng: random.Random, key_id: str, t0: float, n: int, templates: list[str], steady: bool,
                    completions: bool = False) -> list[dict]:
    subjects = [q + t for t in TOPICS for q in QUALIFIERS]
    rng.shuffle(subjects)
    rows, t = [], t0
    for i in range(n):
        t += rng.uniform(1.35, 1.65) if steady else rng.expovariate(1 / 1.5)
        text = rng.choice(templates).format(t=subjects[i % len(subjects)])
        prompt = text if completions else [{"role": "user", "content": text}]
        rows.append(log_row(key_id, t, prompt, True, top=rng.choice([5, 10, 20]), completions=completions))
    return rows


def log_row(key_id, ts, prompt, logprobs, top=None, completions=False) -> dict:
    return {
        "key_id": key_id, "ts": ts, "method": "POST",
        "endpoint": "/v1/completions" if completions else "/v1/chat/completions",
        "prompt": prompt, "params": {"max_tokens": 256}, "tokens_in": 40, "tokens_out": 100,
        "logprobs": logprobs, "top_logprobs": top if logprobs else None, "latency_ms": 500.0, "status": 200,
    }


def write_rows(url: str, rows: list[dict]) -> None:
    log = QueryLog(url)
    for r in sorted(rows, key=lambda r: r["ts"]):
        log.record(r)
    log.close()
