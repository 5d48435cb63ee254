"""Anti-distillation as a distiller meets it: answers collected over HTTP from a served teacher, a student
trained on them, scored on the owner's protect set.

    arm = distill_over_http(url, HttpDistillConfig(tokenizer=..., prompts=..., seed=s), student, tok, protect, out)
    cost = teacher_protect_cost(teacher, AntidistillConfig(L, proxy_dir, protect_file), protect)
    diff = paired_difference(defended_nlls, undefended_nlls)

One arm is `potstill generate --teacher URL` (the distiller's client: the server templates, samples and
returns text and top-k log-probs, mapped back to ids with the tokenizer) and `potstill train` of a copy
of `student` on that capture (the same initial weights in every arm). Its outcome is the student's
per-token NLL of the protect set's reference answers (`evaluate.metrics.reference_nll`): the
downstream loss anti-distillation sampling (guard/antidistill.py) tries to keep high. The default loss is
`ce` (trains on the sampled text only): most real distillers get no log-probs (issue 17), and it is the
paper's threat model (fine-tuning on sampled traces); the tilt changes which tokens are sampled, so it
reaches a text-only distiller as much as one reading the (tilted) top-k.

The teacher's side of the trade-off is `teacher_protect_cost`: the protect references' NLL under the
distribution the defended server samples from, softmax((logits + lambda * Delta) / T), teacher-forced,
against the clean teacher's (`studies.antidistill.ReferenceScores`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.config import GenerateConfig, TrainConfig, derive


@dataclass
class HttpDistillConfig:
    """A distiller's recipe against a served teacher: the capture over HTTP and the student's training."""

    model: str | None = derive(GenerateConfig, "model")
    tokenizer: str | None = derive(GenerateConfig, "tokenizer")
    http_api_key_env: str | None = derive(GenerateConfig, "http_api_key_env")
    prompts: str | None = derive(GenerateConfig, "prompts", note="The questions the distiller asks.")
    samples: int = derive(GenerateConfig, "samples", 4)
    max_new_tokens: int = derive(GenerateConfig, "max_new_tokens", 16)
    temperature: float = derive(GenerateConfig, "temperature")
    top_k: int = derive(GenerateConfig, "top_k", 4)
    loss: str = derive(TrainConfig, "loss", "ce", "Text only: what most distillers can do (module doc).")
    max_steps: int = derive(TrainConfig, "max_steps", 30)
    batch_size: int = derive(TrainConfig, "batch_size", 8)
    lr: float = derive(TrainConfig, "lr", 3e-3)
    seed: int = derive(GenerateConfig, "seed", note="Also the training data order's.")


def distill_over_http(base_url: str, cfg: HttpDistillConfig, student, tokenizer, protect: list, out: str | Path,
                      log=lambda line: None) -> dict[str, Any]:
    """Capture `cfg.prompts` from the server at `base_url`, train a copy of `student` on it; the student's
    protect NLL (and the capture's and training's sizes and times)."""
    from potstill.capture.generate import generate
    from potstill.evaluate.metrics import reference_nll
    from potstill.train.loop import train

    out = Path(out)
    t0 = time.perf_counter()
    gcfg = GenerateConfig(teacher=base_url, model=cfg.model, tokenizer=cfg.tokenizer, prompts=cfg.prompts,
                          http_api_key_env=cfg.http_api_key_env, out=str(out / "capture"), samples=cfg.samples,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                          heldout=0.0, seed=cfg.seed)
    manifest = generate(gcfg, log=log)
    t1 = time.perf_counter()
    model = copy.deepcopy(student)  # every arm starts from the same weights
    tcfg = TrainConfig(capture=str(out / "capture"), out=str(out / "student"), teacher=str(cfg.tokenizer),
                       student="pretrained:init", loss=cfg.loss, lr=cfg.lr, warmup_steps=1, max_steps=cfg.max_steps,
                       batch_size=cfg.batch_size, checkpoint_every=0, seed=cfg.seed, lr_schedule="constant",
                       bf16="off")
    summary = train(tcfg, log=log, model=model, tokenizer=tokenizer, student_info={"spec": "pretrained:init"})
    model.eval()
    row = reference_nll(model, tokenizer, protect) or {}
    return {"protect_nll": row.get("nll_reference"), "protect_tokens": row.get("reference_tokens"),
            "completion_tokens": manifest.get("counts", {}).get("completion_tokens"),
            "rows": manifest.get("counts", {}).get("rows"), "train_steps": summary.get("steps"),
            "capture_seconds": round(t1 - t0, 2), "train_seconds": round(time.perf_counter() - t1, 2)}


def teacher_protect_cost(teacher, ad, protect: list, temperature: float = 1.0, match: bool = False) -> dict[str, Any]:
    """The protect references' per-token NLL under the clean teacher and under the distribution a server with
    `ad` (an `AntidistillConfig`; its lambda may be 0) at `temperature` samples from; `cost` = their difference.
    `match`: also the temperature (no tilt) that costs the teacher as much (`matched_temperature`, bisection)."""
    from potstill.guard.antidistill import AntidistillProcessor
    from potstill.studies.antidistill import ReferenceScores, calibrate

    scores = ReferenceScores(teacher, AntidistillProcessor.load(ad, teacher), protect)
    clean, served = scores.nll(0.0, 1.0), scores.nll(ad.antidistill, temperature)
    out: dict[str, Any] = {"clean": clean, "served": served, "cost": served - clean, "tokens": len(scores.targets)}
    if match and served > clean:
        out["matched_temperature"] = 1.0 + calibrate(lambda t: scores.nll(0.0, 1.0 + t) - clean, served - clean, 1e-4, 100.0)
    return out


def paired_difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """a - b per seed (paired): mean, sd, the mean's 95 % t-interval (low, high), the per-seed values, and
    `predict_low`, the lower 97.5 % t-prediction bound for one new seed's difference, mean - t * sd * sqrt(1 + 1/n):
    a single-seed test asserting the difference >= predict_low fails with ~2.5 % chance (normal errors)."""
    import math

    from potstill.studies.stats import t_interval, t_quantile_975

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    t = t_interval(diffs)
    hw, n = t["half_width"], len(diffs)
    if hw is None:
        return {**t, "low": None, "high": None, "predict_low": None, "per_seed": diffs, "positive": sum(d > 0 for d in diffs)}
    return {**t, "low": t["mean"] - hw, "high": t["mean"] + hw,
            "predict_low": t["mean"] - t_quantile_975(n - 1) * t["sd"] * math.sqrt(1 + 1 / n),
            "per_seed": diffs, "positive": sum(d > 0 for d in diffs)}
