"""The training loop: one function, readable top to bottom.

    potstill train --capture runs/capture --student prune:depth:0.5 --loss fkl --out runs/student

Reads a capture, builds the student, and minimises a distillation loss on the teacher's stored
top-k (train never talks to a teacher). AdamW, linear warm-up + cosine decay, bf16 autocast where
supported, gradient accumulation with the loss normalised by the learned tokens of the whole
optimizer step, resumable checkpoints (`--resume` reaches the same weights as an uninterrupted
run), one JSONL metrics line per step. The student is saved with `save_pretrained`, its tokenizer
and a provenance.json (capture manifest hash, full config, potstill version, how it was built).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import potstill
from potstill.config import TrainConfig
from potstill.errors import PotstillError
from potstill.lm.tokens import pad_token_id
from potstill.train import dist
from potstill.train.data import collate, examples_from_capture, micro_batches
from potstill.train.health import LossHealth
from potstill.train.losses import LossConfig, distill_loss
from potstill.train.online import setup_modes
from potstill.train.uld import XTOK_LOSSES
from potstill.utils import quiet_transformers, sha256_file, write_json


def autocast_enabled(setting: str, device: torch.device) -> bool:
    if setting == "off":
        return False
    if setting == "on":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from potstill.lm.loading import cpu_has_bf16

    return cpu_has_bf16()


def check_tokenizer(manifest: dict[str, Any], tokenizer, capture_dir: str, cross_tokenizer: bool = False) -> None:
    """Refuse a capture whose tokenizer is not the student's, unless a cross-tokenizer loss is asked for."""
    from potstill.lm.tokens import tokenizer_hash

    want = (manifest.get("teacher") or {}).get("tokenizer_sha256")
    if want and want != tokenizer_hash(tokenizer) and not cross_tokenizer:
        raise PotstillError(
            "tokenizer of the capture's teacher differs from the student's; "
            "use --loss uld (or uld_kl) for cross-tokenizer distillation, or a student with the teacher's tokenizer",
            where=f"{capture_dir}/manifest.json: teacher.tokenizer_sha256",
        )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 10% of it at max_steps (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    ckpts = [c for c in ckpts if (c / "state.json").exists()]
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    out: Path, step: int, model, optimizer, ctx: dist.Dist | None = None, micro: int = 0
) -> Path:
    """Full (unsharded) weights + optimizer keyed by name, written by rank 0; every rank calls it."""
    ctx = ctx or dist.Dist()
    state = dist.full_state(model, optimizer, ctx)
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = out / "checkpoints" / f".step-{step:07d}.tmp"
    if not ctx.is_main:
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "weights.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "micro_batches": micro}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted((out / "checkpoints").glob("step-*"))[:-2]:  # keep the two newest
        shutil.rmtree(old, ignore_errors=True)
    return final


def train(cfg: TrainConfig, log=print, model=None, tokenizer=None, student_info=None, on_step=None) -> dict[str, Any]:
    """Train a student on a capture; returns a summary dict (also in out/train_summary.json).

    `on_step(metrics, model)`, if given, runs after each optimizer step with that step's metrics dict;
    returning True stops training there (the student is still saved), e.g. for a time budget.
    """
    from potstill.capture.store import Capture

    ctx = dist.setup(cfg.dist)
    if not ctx.is_main:
        log = lambda *a, **k: None  # noqa: E731 -- only rank 0 speaks
    capture = Capture.open(cfg.capture)
    quiet_transformers()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    examples = examples_from_capture(capture, split="train", max_seq_len=cfg.max_seq_len)
    if not examples:
        raise PotstillError("no training rows (split 'train') with completion tokens", where=cfg.capture)
    xtok = cfg.loss in XTOK_LOSSES  # cross-tokenizer: train/xtok.py swaps in examples, batches and loss
    loss_cfg = LossConfig(
        kind="ce" if xtok else cfg.loss, temperature=cfg.temperature, beta=cfg.beta, alpha=cfg.alpha, ce_weight=cfg.ce_weight
    )
    if capture.text_only and cfg.loss != "ce" and cfg.mode == "offline":
        log(f"notice: {cfg.capture} is text-only (the teacher gave no log-probs); training with ce instead of {cfg.loss}")
        loss_cfg = LossConfig(kind="ce")

    if model is None:
        from potstill.lm.loading import resolve_model_dir
        from potstill.students import build_student

        teacher_dir = None
        if not cfg.student.startswith("pretrained:"):  # rank 0 first: it may convert a GGUF into the cache
            teacher_dir = ctx.main_first(resolve_model_dir, cfg.teacher)
        calibration = [e.input_ids.tolist() for e in examples[: cfg.calibration]]
        model, tokenizer, student_info = build_student(cfg.student, teacher_dir, calibration, seed=cfg.seed)
        if student_info.get("dropped_layers") is not None:
            log(f"student: {cfg.student}: dropped layers {student_info['dropped_layers']} (least block influence)")
        if student_info.get("summary"):
            log(f"student: {cfg.student}: {student_info['summary']}")
    check_tokenizer(capture.manifest, tokenizer, cfg.capture, cross_tokenizer=xtok)
    plan = None
    if xtok:
        from potstill.train.xtok import XtokPlan

        plan = XtokPlan.build(capture, tokenizer, cfg, log)
        examples, loss_cfg = plan.examples, plan.loss_cfg
    device = ctx.device
    model.to(device).train()
    model.config.use_cache = False
    if cfg.grad_checkpointing:  # recompute each layer's activations in backward: less memory, ~1 more forward
        dist.enable_activation_checkpointing(model)
    forward = dist.wrap(model, ctx)  # DDP/FSDP under torchrun; before the optimizer (FSDP shards params)
    use_bf16 = autocast_enabled(cfg.bf16, device)
    pad_id = pad_token_id(tokenizer)

    if cfg.freeze_embeddings:  # a tied head is the same tensor: frozen with it
        model.get_input_embeddings().weight.requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    modes = setup_modes(cfg, model, tokenizer, student_info, capture, device, pad_id, log)  # None offline
    health = LossHealth(cfg, loss_cfg, log)
    if plan is None:  # cross-tokenizer targets are in the teacher's vocabulary: no self-check there
        health.self_check(examples, pad_id, model, modes and modes.teacher)

    start = skip = 0
    metrics_path = out / "metrics.jsonl"
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise PotstillError("--resume: no checkpoint to resume from", where=str(out / "checkpoints"))
        state = torch.load(ckpt / "weights.pt", map_location="cpu", weights_only=True)
        dist.load_full_state(model, optimizer, state)
        ckpt_state = json.loads((ckpt / "state.json").read_text())
        start = ckpt_state["step"]
        skip = ckpt_state.get("micro_batches") or start * cfg.grad_accum * ctx.world
        if ctx.is_main:
            _truncate_metrics(metrics_path, start)
        log(f"resumed from {ckpt} at step {start}")
    elif metrics_path.exists() and ctx.is_main:
        metrics_path.unlink()

    # one data stream for any number of ranks: a step takes world x grad_accum micro-batches of it
    per_step = cfg.grad_accum * ctx.world
    stream = micro_batches(len(examples), cfg.batch_size, cfg.seed)
    for _ in range(skip):  # replay the data order up to the resume point
        next(stream)

    if ctx.is_main:
        write_json(out / "train_config.json", asdict(cfg))
    dist.reset_peak_memory(device)  # the peak of training, not of building the student
    t0 = time.perf_counter()
    tokens_seen = 0
    last = {}
    with open(metrics_path if ctx.is_main else os.devnull, "a") as metrics:
        for step in range(start, cfg.max_steps):
            step_ids = ctx.shard([next(stream)[1] for _ in range(per_step)])
            groups = [[examples[i] for i in idx] for idx in step_ids]
            batches = modes.batches(step, groups) if modes else [(plan.collate if plan else collate)(g, pad_id)
                                                                 for g in groups]
            (n_total,) = ctx.sum(sum(b.n_targets for b in batches))  # the whole step's, over all ranks
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            kd_sum = ce_sum = loss_sum = aux_sum = 0.0
            for i, batch in enumerate(batches):
                batch = _to(batch, device)
                if modes:
                    batch = modes.score(batch)  # live teacher top-k (+ its hidden states), no grad
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits, aux = forward(batch, sync=i == len(batches) - 1)
                parts = plan.loss(logits, batch) if plan else distill_loss(
                    logits,
                    batch.targets,
                    batch.topk_ids,
                    batch.topk_logprobs,
                    batch.tail_logprob,
                    loss_cfg,
                    chunk_size=cfg.chunk_size,
                )
                if modes:
                    modes.add_hidden(parts, batch)
                loss = parts["loss_sum"] / n_total
                if aux is not None:  # MoE student: router load-balancing loss, weighted by this batch's share of tokens
                    loss = loss + model.config.router_aux_loss_coef * aux * (batch.n_targets / n_total)
                    aux_sum += float(aux.detach()) * batch.n_targets
                # DDP/FSDP average gradients over ranks; x world makes it the sum of the ranks' shares
                (loss * ctx.world).backward()
                loss_sum += float(parts["loss_sum"].detach())
                kd_sum += float(parts["kd_sum"])
                ce_sum += float(parts["ce_sum"])
            grad_norm = (
                dist.grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                if cfg.grad_clip
                else None
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if modes:
                modes.step(lr)
            step_tokens = sum(int(b.attention_mask.sum()) for b in batches)
            loss_sum, kd_sum, ce_sum, step_tokens = ctx.sum(loss_sum, kd_sum, ce_sum, step_tokens)
            tokens_seen += step_tokens
            peak_mb = ctx.max(dist.peak_memory_mb(device))
            elapsed = time.perf_counter() - t0
            done = step + 1 - start
            last = {
                "step": step + 1,
                "loss": loss_sum / n_total,
                "kd": kd_sum / n_total,
                "ce": ce_sum / n_total,
                "lr": lr,
                "grad_norm": grad_norm,
                "target_tokens": n_total,
                "tokens_per_s": tokens_seen / elapsed,
                "elapsed_s": elapsed,
                "peak_mem_mb": peak_mb,
            }
            if aux is not None:  # MoE student: the router load-balancing term (before its coefficient)
                last["router_aux"] = aux_sum / n_total
            if modes:
                last.update(modes.step_metrics(n_total))
            health.observe(last)
            metrics.write(json.dumps(last) + "\n")
            metrics.flush()
            eta = elapsed / done * (cfg.max_steps - step - 1)
            log(
                f"step {step + 1}/{cfg.max_steps} loss {last['loss']:.4f} kd {last['kd']:.4f} ce {last['ce']:.4f} "
                f"lr {lr:.2e} {last['tokens_per_s']:.0f} tok/s peak {peak_mb:.0f} MB eta {eta:.0f}s"
                + health.suffix(last)
            )
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
                micro = skip + (step + 1 - start) * per_step  # micro-batches of the stream used so far
                ckpt = save_checkpoint(out, step + 1, model, optimizer, ctx, micro=micro)
                if modes and ctx.is_main:
                    modes.save(ckpt)  # hidden-state projections, for --resume
            if on_step is not None and on_step(last, model):  # e.g. a benchmark's time budget, a study's evals
                break

    if modes:
        modes.close()

    weights = dist.full_model_state(model, ctx)  # FSDP: gathered to rank 0
    if ctx.is_main:
        save_student(out, model, tokenizer, cfg, capture, student_info or {}, loss_cfg, state_dict=weights)
    peaks = ctx.gather(dist.peak_memory_mb(device))
    summary = {
        "steps": last.get("step", cfg.max_steps),
        "final": last,
        "train_tokens_per_s": last.get("tokens_per_s"),
        "examples": len(examples),
        "bf16": use_bf16,
        "loss_health": health.report,
        "dist": ctx.mode,
        "world_size": ctx.world,
        "grad_checkpointing": cfg.grad_checkpointing,
        "peak_mem_mb_per_rank": peaks,
    }
    if ctx.is_main:
        write_json(out / "train_summary.json", summary)
    ctx.close()
    return summary


def save_student(
    out: Path, model, tokenizer, cfg: TrainConfig, capture, info: dict, loss_cfg, state_dict=None
) -> None:
    """save_pretrained + tokenizer + provenance.json, moved into place file by file; provenance last."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    write_json(
        out / "provenance.json",
        {
            "potstill_version": potstill.__version__,
            "capture": str(cfg.capture),
            "capture_manifest_sha256": sha256_file(Path(cfg.capture) / "manifest.json"),
            "teacher": capture.manifest.get("teacher"),
            "student": info,
            "loss": asdict(loss_cfg),
            "train_config": asdict(cfg),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def _to(batch, device):
    if device.type == "cpu":
        return batch
    from dataclasses import replace

    return replace(batch, **{k: v.to(device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)})


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
