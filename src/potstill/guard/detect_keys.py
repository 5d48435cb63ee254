"""Open-weights detection over every scheme a distilled model may carry, with a valid correction.

With 'decoy' served log-probs (watermark_config.py) the sampled text carries the sampling key's
green lists and the served top-k log-probs carry the decoy key's: a student trained on the text
(ce) learns the first, one trained on the top-k targets (fkl) mostly the second. Detection tests
each key and reports the smallest p-value times the number of keys tested (Bonferroni): valid
under any dependence between the tests, and costing a factor 2 at most.

`align_with_log` checks the detection settings against the watermark the server recorded in the
query log at start-up (scheme, h, gamma, key fingerprint, served-log-prob policy): a mismatched
scheme would give a meaningless null result, so it is refused.
"""

from __future__ import annotations

import math
from dataclasses import replace

from potstill.errors import PotstillError
from potstill.guard.detect import DetectResult, detect_model
from potstill.guard.watermark_config import WatermarkConfig


def bonferroni(results: list[DetectResult]) -> DetectResult:
    """The result with the smallest p-value, its p multiplied by len(results) (capped at 1)."""
    best = min(results, key=lambda r: r.log10_p)
    m = len(results)
    if m == 1:
        return best
    log10_p = min(0.0, best.log10_p + math.log10(m))
    return replace(best, p_value=min(1.0, best.p_value * m), log10_p=log10_p,
                   mode=f"{best.mode} (best of {m} keys, p x{m})")


def detect_model_keys(suspect_model, tokenizer, prompts_or_texts: list[list[int]], cfg: WatermarkConfig,
                      **kwargs) -> DetectResult:
    """`detect_model` for each of `cfg.detection_configs()`, combined by `bonferroni`."""
    return bonferroni([detect_model(suspect_model, tokenizer, prompts_or_texts, c, **kwargs)
                       for c in cfg.detection_configs()])


def align_with_log(cfg: WatermarkConfig, log_db: str) -> tuple[WatermarkConfig, list[str]]:
    """`cfg` with the served-log-prob policy the last server recorded in `log_db`, and warnings.

    Raises PotstillError when gamma, h or SelfHash differ from the served watermark's; a key whose
    fingerprint does not match only warns (a wrong-key run is a legitimate null control).
    """
    from potstill.guard.querylog import server_config

    rec = (server_config(log_db) or {}).get("watermark")
    if not rec:
        return cfg, ["the query log records no watermarked server: settings not checked"]
    for name in ("gamma", "context_width", "self_hash"):
        if name in rec and rec[name] != getattr(cfg, name):
            raise PotstillError(f"{name} is {getattr(cfg, name)!r} here but the server watermarked with "
                                f"{rec[name]!r}: pass the served settings", where=f"{log_db} (log_servers)")
    notes = []
    if rec.get("key_fingerprint") and not cfg.check_fingerprint(rec["key_fingerprint"]):
        notes.append("this key's fingerprint does not match the served watermark's: expect a null result")
    # servers from before the policy existed served the sampling distribution
    return replace(cfg, served_logprobs=rec.get("served_logprobs", "biased")), notes
