"""`potstill study detect-power`: how much watermarked traffic must a distiller train on before we can prove it?

    potstill study detect-power --budgets 2500 --budgets 5000 --budgets 10000 --budgets 20000

The embedded teacher serves watermarked completions (the same green-list processor as `potstill
serve`, returned top-k included) for the seed prompts: one capture, cut into nested prefixes of
`budgets` completion tokens (the traffic a distiller collected). For each budget and loss (fkl on
the top-k, ce on the text only) a student is trained with a constant learning rate and, at each of
`steps`, scored by open-weights detection on the served sequences it trained on (the owner's query
log for that key): the green-mass statistic (guard/greenmass.py, calibrated on `null_keys` random
keys) and the older argmax count, side by side.

The largest budget is trained first, then the null controls, then the smaller budgets (a run stopped
early keeps the headline setting and every control). Null controls, all on the largest budget's served
sequences: `wrong_keys` wrong keys on each of the
largest ce and fkl students, the student as built (never trained), a ce student trained the same way on
the teacher's *unwatermarked* completions, and the unwatermarked teacher itself. The watermark's
quality cost: perplexity of watermarked and unwatermarked completions under the clean teacher.
Writes results.json, table.md and power.png under --out after every setting (a stopped run keeps
what it measured).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from potstill.config import GenerateConfig, TrainConfig, derive, opt
from potstill.errors import PotstillError
from potstill.utils import write_json


@dataclass
class DetectPowerConfig:
    teacher: str = derive(GenerateConfig, "teacher", note="Watermarked as `potstill serve` does.")
    prompts: str = derive(GenerateConfig, "prompts", "builtin:seed_tasks", "The prompts the distiller sends.")
    out: str = opt("runs/study-detect-power", "Output directory (captures, results.json, table.md, power.png).")
    budgets: list[int] = opt([2500, 5000, 10000, 20000], "Served completion tokens the distiller trains on (nested).")
    losses: list[str] = opt(["ce", "fkl"], "Distillation losses (ce: text only; fkl: the returned top-k).")
    steps: list[int] = opt([10, 20, 40], "Optimizer steps at which each student is scored (one constant-LR run).")
    student: str = derive(TrainConfig, "student", "prune:depth:8", "The same init for every run.")
    lr: float = derive(TrainConfig, "lr", 5e-4, "Constant after warm-up in this study.")
    batch_size: int = derive(TrainConfig, "batch_size", 8)
    max_prompts: int | None = derive(GenerateConfig, "max_prompts", note="For the watermarked capture.")
    samples: int = derive(GenerateConfig, "samples", 2, "In the watermarked capture.")
    max_new_tokens: int = derive(GenerateConfig, "max_new_tokens", 64)
    top_k: int = derive(GenerateConfig, "top_k", note="Served; fkl learns them.")
    gen_batch_size: int = derive(GenerateConfig, "batch_size", 32)
    clean_prompts: int = opt(48, "Prompts (x samples) of the unwatermarked capture (control student, perplexity).")
    statistic: str = opt("mass", "Open-weights statistic (mass or logit; argmax is always reported beside it).")
    detect_top_k: int = opt(64, "Suspect tokens read per position.")
    null_keys: int = opt(200, "Random keys calibrating each detection.")
    wrong_keys: int = opt(10, "Wrong-key controls on each of the largest ce and fkl students.")
    ppl_rows: int = opt(96, "Completions of each kind whose perplexity is measured.")
    seed: int = derive(GenerateConfig, "seed", note="Also of the watermark key and training.")

    def __post_init__(self) -> None:
        if not self.budgets or min(self.budgets) < 1 or not self.steps or min(self.steps) < 1:
            raise PotstillError("study detect-power: budgets and steps must be non-empty and >= 1")
        self.budgets, self.steps = sorted(set(self.budgets)), sorted(set(self.steps))
        if self.statistic not in ("mass", "logit"):
            raise PotstillError(f"study detect-power: statistic must be mass or logit, not {self.statistic!r}")


class WatermarkedTeacher:
    """A local teacher whose every decode goes through the watermark (as `potstill serve` does)."""

    def __init__(self, teacher, processor):
        self._teacher, self._processor = teacher, processor

    def __getattr__(self, name: str):
        return getattr(self._teacher, name)

    def complete_ids(self, *args, **kwargs):
        kwargs["logits_processor"] = self._processor
        return self._teacher.complete_ids(*args, **kwargs)

    def identity(self) -> dict[str, Any]:
        return {**self._teacher.identity(), "watermarked": True}


def prefix_capture(src: str | Path, dst: str | Path, tokens: int) -> Path:
    """A capture of `src`'s first shards holding >= `tokens` completion tokens (files hard-linked)."""
    from potstill.capture.store import MANIFEST, _totals, read_manifest

    dst = Path(dst)
    manifest = read_manifest(src)
    shards, total = [], 0
    for s in manifest["shards"]:
        if total >= tokens:
            break
        shards.append(s)
        total += s["completion_tokens"]
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for s in shards:
        try:
            (dst / s["file"]).hardlink_to(Path(src) / s["file"])
        except OSError:
            shutil.copy2(Path(src) / s["file"], dst / s["file"])
    sub = {**manifest, "shards": shards, "complete": True, "prefix_of": str(src)}
    sub.update(_totals(shards))
    write_json(dst / MANIFEST, sub)
    return dst


def served_rows(capture: str | Path) -> tuple[list[list[int]], list[int], list[Any]]:
    """(prompt + completion sequences, prompt lengths, completions) of a capture: what the log holds."""
    from types import SimpleNamespace

    from potstill.capture.store import Capture

    seqs, lens, comps = [], [], []
    for r in Capture.open(capture).rows(columns=["prompt_ids", "completion_ids"]):
        p, c = r["prompt_ids"].tolist(), r["completion_ids"].tolist()
        seqs.append(p + c)
        lens.append(len(p))
        comps.append(SimpleNamespace(prompt_ids=p, completion_ids=c))
    return seqs, lens, comps


def train_config(cfg: DetectPowerConfig, capture: str | Path, out: Path, loss: str, teacher_dir: Path):
    """Every student of the study: the same architecture, init, data order and constant learning rate."""
    from potstill.config import TrainConfig

    return TrainConfig(capture=str(capture), out=str(out), teacher=str(teacher_dir), student=cfg.student, loss=loss,
                       lr=cfg.lr, warmup_steps=min(5, cfg.steps[0]), max_steps=cfg.steps[-1], batch_size=cfg.batch_size,
                       checkpoint_every=0, seed=cfg.seed, lr_schedule="constant")


def study_key(seed: int) -> str:
    return f"detect-power-study-{seed}-" + hashlib.sha256(f"potstill-detect-power-{seed}".encode()).hexdigest()[:32]


class Detector:
    """Scores suspects on one set of served sequences: the green-mass statistic and the argmax count."""

    def __init__(self, cfg: DetectPowerConfig, wm_cfg, seqs: list[list[int]], lens: list[int], tokenizer):
        from potstill.guard.greenmass import GreenMassConfig

        self.cfg, self.wm_cfg, self.seqs, self.lens, self.tok = cfg, wm_cfg, seqs, lens, tokenizer
        self.gm = GreenMassConfig(statistic=cfg.statistic, top_k=cfg.detect_top_k, null_keys=cfg.null_keys)
        self._nulls_of: Any = None
        self._nulls: dict[str, list[float]] = {}

    def table(self, model):
        from potstill.guard.greenmass import suspect_table

        was = model.training
        try:
            return suspect_table(model.eval(), self.tok, self.seqs, self.wm_cfg, self.gm.top_k, self.lens,
                                 max_positions=10**9)
        finally:
            model.train(was)

    def score(self, table, key: str | None = None) -> dict[str, Any]:
        """The configured statistic's numbers, the other statistic's p-value and the argmax count's.

        The random-key null of a table is computed once and shared by every key scored on it.
        """
        from potstill.guard.greenmass import argmax_score, null_zs, score_table

        cfg = self.wm_cfg if key is None else replace(self.wm_cfg, key=key)
        other = replace(self.gm, statistic="logit" if self.gm.statistic == "mass" else "mass")
        if self._nulls_of is not table:  # holds the table, so no other one can take its place
            self._nulls_of, self._nulls = table, {}
        res = {}
        for gm in (self.gm, other):
            if gm.statistic not in self._nulls:
                self._nulls[gm.statistic] = null_zs(table, self.wm_cfg, gm)
            res[gm.statistic] = score_table(table, cfg, gm, self._nulls[gm.statistic])
        main, alt, arg = res[self.gm.statistic], res[other.statistic], argmax_score(table, cfg)
        return {"n_contexts": main.contexts, "n_pairs": main.pairs, "positions": main.positions,
                "z": main.z, "p_analytic": main.p_analytic, "z_calibrated": main.z_calibrated,
                "p_rank": main.p_rank, "p_value": main.p_value, "log10_p": main.log10_p,
                "null_mean": main.null_mean, "null_sd": main.null_sd, "green_mass": main.green_mass,
                f"{other.statistic}_p": alt.p_value, f"{other.statistic}_log10_p": alt.log10_p,
                f"{other.statistic}_p_rank": alt.p_rank, "argmax_pairs": arg.tokens_scored, "argmax_green": arg.green,
                "argmax_p": arg.p_value, "argmax_log10_p": arg.log10_p}


def run_detect_power(cfg: DetectPowerConfig, log=print) -> dict[str, Any]:
    """The whole study; returns the results (also written under cfg.out)."""
    import torch
    from transformers import AutoModelForCausalLM

    from potstill.bench.watermark import completion_nll, perplexity_stats
    from potstill.capture.generate import generate
    from potstill.config import GenerateConfig
    from potstill.guard.watermark import Watermark, WatermarkConfig
    from potstill.students import build_student
    from potstill.teachers import load_teacher
    from potstill.teachers.hf import resolve_model_dir
    from potstill.train.loop import train
    from potstill.utils import quiet_transformers

    quiet_transformers()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher_dir = resolve_model_dir(cfg.teacher)
    teacher = load_teacher(cfg.teacher, dtype="float32")
    wm_cfg = WatermarkConfig(key=study_key(cfg.seed), vocab_size=len(teacher.tokenizer))
    result: dict[str, Any] = {"config": asdict(cfg), "watermark": wm_cfg.public_dict(), "cpu_threads": torch.get_num_threads(),
                              "settings": [], "controls": []}
    from potstill.studies.detect_power_report import write_outputs

    def save() -> None:  # everything measured so far, so a stopped run keeps its table and plot
        write_json(out / "results.json", result)
        write_outputs(result, out)

    def capture(name: str, wm: bool, max_prompts: int | None, samples: int) -> str:
        d = out / name
        gen = GenerateConfig(teacher=cfg.teacher, prompts=cfg.prompts, out=str(d), max_new_tokens=cfg.max_new_tokens,
                             top_k=cfg.top_k, heldout=0.0, samples=samples, max_prompts=max_prompts,
                             batch_size=cfg.gen_batch_size, temperature=1.0, seed=cfg.seed, shard_rows=8, dtype="float32")
        t = time.perf_counter()
        generate(gen, teacher=WatermarkedTeacher(teacher, Watermark(wm_cfg)) if wm else teacher, log=log)
        result["timings"][f"{name}_s"] = round(time.perf_counter() - t, 1)
        return str(d)

    result["timings"] = {}
    wm_dir = capture("capture-wm", True, cfg.max_prompts, cfg.samples)
    clean_dir = capture("capture-clean", False, cfg.clean_prompts, cfg.samples)
    _, _, wm_comps = served_rows(wm_dir)
    _, _, clean_comps = served_rows(clean_dir)
    served_total = sum(len(c.completion_ids) for c in wm_comps)
    result["served_tokens_available"] = served_total
    ppl_w = perplexity_stats(completion_nll(teacher, wm_comps[: cfg.ppl_rows]), cfg.seed)
    ppl_c = perplexity_stats(completion_nll(teacher, clean_comps[: cfg.ppl_rows]), cfg.seed)
    result["perplexity"] = {"watermarked": ppl_w, "unwatermarked": ppl_c, "rows": cfg.ppl_rows,
                            "cost": ppl_w["ppl"] / ppl_c["ppl"] - 1, "gamma": wm_cfg.gamma, "delta": wm_cfg.delta}
    log(f"[detect-power] {served_total} watermarked tokens served; perplexity {ppl_w['ppl']:.2f} (watermarked) vs "
        f"{ppl_c['ppl']:.2f} (clean)")
    save()

    tok = teacher.tokenizer
    largest = cfg.budgets[-1]
    largest_tables: dict[str, Any] = {}
    from potstill.guard.greenmass import null_key

    def control(det: Detector, kind: str, table, key: str | None = None, **extra) -> None:
        row = {"control": kind, **extra, **det.score(table, key)}
        result["controls"].append(row)
        log(f"[detect-power] control {kind} {extra}: p={row['p_value']:.3g} argmax p={row['argmax_p']:.3g}")
        save()

    def controls(det: Detector) -> None:
        """The null controls, on the largest budget's served sequences."""
        for loss, table in largest_tables.items():
            for i in range(cfg.wrong_keys):
                control(det, "wrong key", table, null_key(10**6 + i + (0 if loss == "ce" else cfg.wrong_keys)),
                        suspect=f"{loss} student", key_index=i)
        calib = [s[:n] for s, n in zip(det.seqs[:32], det.lens[:32], strict=True)]
        fresh, _, _ = build_student(cfg.student, teacher_dir, calib, seed=cfg.seed)
        control(det, "never-trained student", det.table(fresh), suspect=cfg.student)
        del fresh
        state: dict[str, Any] = {}

        def grab(metrics, model) -> bool:
            if metrics["step"] == cfg.steps[-1]:
                state["table"] = det.table(model)
            return False

        train(train_config(cfg, clean_dir, out / "runs" / "ce-clean", "ce", teacher_dir), log=lambda *a, **k: None,
              on_step=grab)
        control(det, "ce student of unwatermarked text", state["table"], suspect="ce-clean")
        base = AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32)
        control(det, "unwatermarked teacher", det.table(base), suspect=str(cfg.teacher))

    # largest budget first, then its controls, then the smaller budgets: a run stopped early keeps the
    # headline setting and every control
    for budget in reversed(cfg.budgets):
        sub = prefix_capture(wm_dir, out / f"capture-wm-{budget}", budget)
        seqs, lens, comps = served_rows(sub)
        tokens = sum(len(c.completion_ids) for c in comps)
        det = Detector(cfg, wm_cfg, seqs, lens, tok)
        for loss in cfg.losses:
            tcfg = train_config(cfg, sub, out / "runs" / f"{loss}-{budget}", loss, teacher_dir)

            def on_step(metrics, model, loss=loss, budget=budget, tokens=tokens, det=det) -> bool:
                if metrics["step"] not in cfg.steps:
                    return False
                t = time.perf_counter()
                table = det.table(model)
                row = {"loss": loss, "budget": budget, "served_tokens": tokens, "step": metrics["step"],
                       "train_loss": metrics["loss"], **det.score(table), "detect_s": round(time.perf_counter() - t, 1)}
                result["settings"].append(row)
                if budget == largest:
                    largest_tables[loss] = table
                log(f"[detect-power] {loss} {tokens} tokens step {row['step']}: p={row['p_value']:.3g} "
                    f"(argmax p={row['argmax_p']:.3g}) n={row['n_contexts']} contexts | {time.perf_counter() - t0:.0f}s")
                result["tokens_needed"] = tokens_needed(result["settings"], cfg)
                save()
                return False

            train(tcfg, log=lambda *a, **k: None, on_step=on_step)
        if budget == largest:
            controls(det)
    result["tokens_needed"] = tokens_needed(result["settings"], cfg)
    result["timings"]["total_s"] = round(time.perf_counter() - t0, 1)
    result["cpu_s"] = round(time.process_time(), 1)
    save()
    return result


def tokens_needed(settings: list[dict[str, Any]], cfg: DetectPowerConfig, alpha: float = 1e-6) -> list[dict[str, Any]]:
    """Per (loss, step): the smallest served-token budget detected at p < alpha (None: none was)."""
    rows = []
    for loss in cfg.losses:
        for step in cfg.steps:
            hits = [s for s in settings if s["loss"] == loss and s["step"] == step]
            mass = [s["served_tokens"] for s in hits if s["p_value"] < alpha]
            arg = [s["served_tokens"] for s in hits if s["argmax_p"] < alpha]
            rows.append({"loss": loss, "step": step, "alpha": alpha, "tokens_needed": min(mass) if mass else None,
                         "argmax_tokens_needed": min(arg) if arg else None})
    return rows
