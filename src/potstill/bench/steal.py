"""`potstill bench steal`: how many queries does an attacker need to read our green lists off the API?

The attacker (bench/steal_attack.py) knows the public weights the service runs and asks for
completions with `top_logprobs`; it estimates every (context, candidate) green bit it can from the
served log-probs and from how often tokens are sampled. For each watermark configuration and
served-log-prob policy (WatermarkConfig.served_logprobs) the bench reports the share of the
(context, token) pairs in a distiller's data (watermarked completions of other prompts) whose
bit the attacker holds, against the number of queries (served positions: one position of a
completion with top_logprobs=k tells as much as one max_tokens=1 query with the same prefix),
and the queries needed for 50 % and 90 %.

It plays against the engine directly (`complete_ids` with the watermark's logits processor and
report processor, the exact code path `potstill serve` decodes through, minus HTTP: the HTTP
path is covered by tests/test_watermark_steal.py), on a tiny public random llama (vocab 512) so
that 10^4 queries take seconds on a CPU. The distiller side (bench/steal_students.py) trains small
students on the served data (fkl on the top-k log-probs, fkl on targets the attacker un-biased,
ce on text only) and reports the open-weights detection p-value of each.

    potstill bench steal --max-queries 20000 --out runs/bench/steal.json
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from potstill.config import derive, opt
from potstill.guard.watermark_config import WatermarkConfig

CONFIGS = {  # name -> (context_width, self_hash, served_logprobs)
    "h1-lefthash/biased": (1, False, "biased"),
    "h1-lefthash/decoy": (1, False, "decoy"),
    "h1-lefthash/unbiased": (1, False, "unbiased"),
    "h4-selfhash/biased": (4, True, "biased"),
    "h4-selfhash/decoy": (4, True, "decoy"),
}


@dataclass
class StealBenchConfig:
    """Settings of `potstill bench steal`."""

    configs: str = opt(",".join(CONFIGS), "Watermark configurations to attack (comma-separated), of: "
                       + ", ".join(CONFIGS) + ".")
    max_queries: int = opt(20000, "Attacker budget per configuration: served positions with top_logprobs.")
    top_k: int = opt(20, "top_logprobs the attacker asks for.")
    completion_tokens: int = opt(32, "Tokens per attacker (and distiller) completion.")
    distiller_completions: int = opt(256, "Watermarked completions in the distiller's data (the pairs scored).")
    vocab: int = opt(512, "Vocabulary of the tiny public teacher.")
    teacher_init: float = opt(0.5, "Weight std of the tiny public teacher: 0.5 gives ~2.1 nats of next-token entropy "
                              "and ~94 % of the mass in the top 20, like a chat model's answers (0.15: 5.5 nats).")
    gamma: float = derive(WatermarkConfig, "gamma")
    delta: float = derive(WatermarkConfig, "delta")
    students: bool = opt(True, "Also train students on the distiller's data and detect them (h=1 configs).")
    student_steps: int = opt(300, "Training steps per student.")
    seed: int = opt(0, "Seed (teacher weights, prompts, sampling).")
    out: str = opt("runs/bench/steal.json", "JSON results (a .md table beside).")


PROMPT_LEN = 4
CHECKPOINTS = (10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000, 300000)
KEY = "potstill-bench-steal-key-public-0b6f2d9e41c7a853"  # a bench key (public: the bench's runs are reproducible)


def public_tiny_teacher(vocab: int = 512, seed: int = 0, hidden: int = 64, init: float = 0.15):
    """A small random llama over ids t0..t{vocab-1} (t0 = EOS): the 'public open weights'."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from potstill.teachers.hf import HFTeacher

    words = {f"t{i}": i for i in range(vocab)}
    tk = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t0", pad_token="t0", unk_token="t0")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=init, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    return HFTeacher(model, tok, name=f"tiny-public-v{vocab}")


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, PROMPT_LEN), generator=g).tolist()


def serve_batch(teacher, wm, prompts: list[list[int]], tokens: int, k: int, seed: int) -> list:
    """Completions as `potstill serve` makes them: sampled through the watermark, log-probs per its policy."""
    from potstill.teachers.base import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=1.0, top_logprobs=k, seed=seed)
    return teacher.complete_ids(prompts, params, [seed * 100003 + i for i in range(len(prompts))],
                                logits_processor=wm.logits_processor, report_processor=wm.report_processor())


def public_logprobs(teacher, completions) -> list:
    """[len(completion), V] public log-probs at each completion position (teacher forcing, no processor)."""
    import torch

    seqs = [c.prompt_ids + c.completion_ids for c in completions]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        lp = torch.log_softmax(teacher.model(input_ids=ids).logits.float(), -1)
    return [lp[i, len(c.prompt_ids) - 1 : len(c.prompt_ids) - 1 + len(c.completion_ids)]
            for i, c in enumerate(completions)]


def truth_pairs(wm, completions, h: int) -> list[tuple[tuple[tuple[int, ...], int], bool, int]]:
    """Distinct ((last h ids, token), green bit, occurrences) of the completions (the distiller's data)."""
    out: dict = {}
    count: dict = {}
    for c in completions:
        ids = c.prompt_ids + c.completion_ids
        _, toks, green = wm.pair_table(ids, len(c.prompt_ids))
        start = max(h, len(c.prompt_ids))
        for j, (t, g) in enumerate(zip(toks, green, strict=True)):
            pair = (tuple(ids[start + j - h : start + j]), t)
            out.setdefault(pair, g)
            count[pair] = count.get(pair, 0) + 1
    return [(pair, g, count[pair]) for pair, g in out.items()]


ATTACKERS = {"reads log-probs": True, "counts samples only": False}
"""The attacker trusting the served log-probs (exact bits where they carry the sampling bias; misled by
a decoy), and the one counting sampled tokens only (what is left when log-probs carry nothing)."""


def attack(teacher, wm, truth, cfg: StealBenchConfig, log=print) -> dict[str, Any]:
    """Run the attackers up to cfg.max_queries served positions; recovery at each checkpoint."""
    from potstill.bench.steal_attack import GreenMap, SelfHashMap, recovery

    watch = {pair for pair, _, _ in truth}
    maps = {name: GreenMap(wm.cfg.context_width, lp, watch) for name, lp in ATTACKERS.items()}
    if wm.cfg.self_hash:
        maps["reads log-probs, SelfHash-aware"] = SelfHashMap(wm.cfg.context_width, watch)
    curves: dict[str, list] = {name: [] for name in maps}
    rnd, n, t0 = 0, 0, time.process_time()
    marks = [q for q in CHECKPOINTS if q < cfg.max_queries] + [cfg.max_queries]

    def mark() -> None:
        while marks and n >= marks[0]:
            for name, gm in maps.items():
                curves[name].append({"queries": n, **recovery(gm, truth)})
            marks.pop(0)

    while n < cfg.max_queries:
        prompts = random_prompts(64, cfg.vocab, cfg.seed * 7919 + 1000 + rnd)
        comps = serve_batch(teacher, wm, prompts, cfg.completion_tokens, cfg.top_k, cfg.seed + 1000 + rnd)
        rnd += 1
        for c, pub in zip(comps, public_logprobs(teacher, comps), strict=True):
            prefix = list(c.prompt_ids)
            for j, tok in enumerate(c.completion_ids):
                mark()
                if n >= cfg.max_queries:
                    break
                top = (c.topk_ids[j].tolist(), c.topk_logprobs[j].tolist())
                for gm in maps.values():
                    gm.observe(prefix, tok, pub[j], top)
                prefix.append(tok)
                n += 1
    mark()
    out = {"cpu_s": time.process_time() - t0, "lp_bits": maps["reads log-probs"].lp_bits, "attackers": {}}
    for name, curve in curves.items():
        last = curve[-1]
        out["attackers"][name] = {"curve": curve, "queries_for_50": _first(curve, 0.5),
                                  "queries_for_90": _first(curve, 0.9),
                                  "queries_for_90_tokens": _first(curve, 0.9, "recovered_tokens")}
        log(f"  [{name}] {n} queries: recovered {last['recovered']:.3f} (precision {last['precision']:.3f}); "
            f"{last['recovered_tokens']:.3f} of tokens; 50 %: {_first(curve, 0.5)}, 90 %: {_first(curve, 0.9)}")
    log(f"  {out['lp_bits']} bits read off log-probs ({out['cpu_s']:.0f} s CPU)")
    return out


def _first(curve: list[dict], level: float, field: str = "recovered") -> int | None:
    """Queries at the first checkpoint where `field` >= level, log-interpolated from the one before."""
    prev = None
    for pt in curve:
        if pt[field] >= level:
            if prev is None or pt[field] == prev[field]:
                return pt["queries"]
            f = (level - prev[field]) / (pt[field] - prev[field])
            return round(math.exp(math.log(max(prev["queries"], 1)) + f * math.log(pt["queries"] / max(prev["queries"], 1))))
        prev = pt
    return None


def bench_steal(cfg: StealBenchConfig, log=print) -> dict[str, Any]:
    import torch

    from potstill.guard.watermark import Watermark
    from potstill.utils import write_json

    torch.manual_seed(cfg.seed)
    teacher = public_tiny_teacher(cfg.vocab, cfg.seed, init=cfg.teacher_init)
    names = [n.strip() for n in cfg.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        from potstill.errors import PotstillError

        raise PotstillError(f"configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    result: dict[str, Any] = {"bench": "steal", "teacher": teacher.name, "mode": "engine (complete_ids), no HTTP",
                              "settings": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                              "torch_threads": torch.get_num_threads(), "configs": {}}
    for name in names:
        h, self_hash, policy = CONFIGS[name]
        wcfg = WatermarkConfig(key=KEY, gamma=cfg.gamma, delta=cfg.delta, context_width=h, self_hash=self_hash,
                               served_logprobs=policy, vocab_size=cfg.vocab)
        wm = Watermark(wcfg)
        dist = serve_batch(teacher, wm, random_prompts(cfg.distiller_completions, cfg.vocab, cfg.seed * 7919),
                           cfg.completion_tokens, cfg.top_k, cfg.seed)
        truth = truth_pairs(wm, dist, h)
        log(f"{name}: {len(truth)} distinct (context, token) pairs in the distiller's data")
        entry = {"watermark": wcfg.public_dict(), "distiller_pairs": len(truth),
                 "distiller_tokens": sum(n for _, _, n in truth),
                 "distiller_green_share": sum(g for _, g, _ in truth) / max(len(truth), 1),
                 "attack": attack(teacher, wm, truth, cfg, log)}
        if cfg.students and h == 1:
            from potstill.bench.steal_students import student_arms

            entry["students"] = student_arms(teacher, wm, dist, cfg, log)
        result["configs"][name] = entry
    write_json(cfg.out, result)
    md = format_table(result)
    tmp = cfg.out.rsplit(".", 1)[0] + ".md"
    with open(tmp + ".tmp", "w") as fh:
        fh.write(md + "\n")
    import os

    os.replace(tmp + ".tmp", tmp)
    return result


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    fmt = lambda q: f"{q:,}" if q is not None else f"> {s['max_queries']:,}"  # noqa: E731
    lines = [f"watermark stealing vs {result['teacher']} ({result['mode']}), gamma={s['gamma']} delta={s['delta']}, "
             f"top_logprobs={s['top_k']}",
             "| config | attacker | distiller pairs | queries for 50 % | queries for 90 % | 90 % of tokens | "
             "recovered at max: pairs / tokens (precision) |",
             "|---|---|---|---|---|---|---|"]
    for name, e in result["configs"].items():
        for who, a in e["attack"]["attackers"].items():
            last = a["curve"][-1]
            lines.append(f"| {name} | {who} | {e['distiller_pairs']} | {fmt(a['queries_for_50'])} | "
                         f"{fmt(a['queries_for_90'])} | {fmt(a['queries_for_90_tokens'])} | "
                         f"{last['recovered']:.3f} / {last['recovered_tokens']:.3f} ({last['precision']:.3f}) |")
    rows = [(name, arm) for name, e in result["configs"].items() for arm in e.get("students", [])]
    if rows:
        lines += ["", "| config | student | p (sampling key) | p (decoy key) | p (detect: both, Bonferroni) |",
                  "|---|---|---|---|---|"]
        for name, arm in rows:
            lines.append(f"| {name} | {arm['arm']} | {arm['p_sampling']:.2g} | {arm['p_decoy']:.2g} | {arm['p_detect']:.2g} |")
    return "\n".join(lines)
