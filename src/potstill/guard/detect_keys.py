"""Open-weights detection over every scheme a distilled model may carry, with a valid correction.

With 'decoy' served log-probs (watermark_config.py) the sampled text carries the sampling key's
green lists and the served top-k log-probs carry the decoy key's: a student trained on the text
(ce) learns the first, one trained on the top-k targets (fkl) mostly the second. Detection tests
each key and reports the smallest p-value times the number of keys tested (Bonferroni): valid
under any dependence between the tests, and costing a factor 2 at most.
"""

from __future__ import annotations

import math
from dataclasses import replace

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
                   mode=f"{best.mode}, best of {m} keys x{m}")


def detect_model_keys(suspect_model, tokenizer, prompts_or_texts: list[list[int]], cfg: WatermarkConfig,
                      **kwargs) -> DetectResult:
    """`detect_model` for each of `cfg.detection_configs()`, combined by `bonferroni`."""
    return bonferroni([detect_model(suspect_model, tokenizer, prompts_or_texts, c, **kwargs)
                       for c in cfg.detection_configs()])
