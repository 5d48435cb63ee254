"""The training loop: `train` runs named steps (data, student, set-up, resume, loop, finish).

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
from potstill.lm.embedded import derivative_notice
from potstill.lm.tokens import pad_token_id
from potstill.train import dist
from potstill.train.data import collate, collate_packed, examples_from_capture, micro_batches
from potstill.train.health import LossHealth
from potstill.train.losses import LossConfig, distill_loss
from potstill.train.online import LiveTeacher, setup_modes
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


def train(
    cfg: TrainConfig, log=print, model=None, tokenizer=None, student_info=None, on_step=None, teacher=None
) -> dict[str, Any]:
    """Train a student on a capture; returns a summary dict (also in out/train_summary.json).

    `model`/`tokenizer`/`student_info`, if given, are the student (else built from `cfg.student`).
    `teacher` (anything with `.model`, `.tokenizer`, `.name`, e.g. an `HFTeacher`) is the live teacher
    of the online and on-policy modes, built by whoever runs the stage; without one those modes load
    `cfg.teacher` themselves. `on_step(metrics, model)`, if given, runs after each optimizer step with
    that step's metrics dict; returning True stops training there (the student is still saved), e.g.
    for a time budget.
    """
    run = _Run(cfg, log)
    run.load_data()
    run.build_student(model, tokenizer, student_info)
    run.prepare(teacher)
    start, skip = run.resume()
    run.loop(start, skip, on_step)
    return run.finish()


def student_for(cfg: TrainConfig, examples, log=print, ctx: dist.Dist | None = None):
    """(model, tokenizer, info): `cfg.student` built from `cfg.teacher`'s weights as `train` builds it,
    calibrated on the first `cfg.calibration` training `examples` (rows of the capture)."""
    from potstill.lm.loading import resolve_model_dir
    from potstill.students import build_student

    teacher_dir = None
    if not cfg.student.startswith("pretrained:"):  # rank 0 first: it may convert a GGUF into the cache
        teacher_dir = (ctx or dist.Dist()).main_first(resolve_model_dir, cfg.teacher)
    calibration = [e.input_ids.tolist() for e in examples[: cfg.calibration]]
    model, tokenizer, info = build_student(cfg.student, teacher_dir, calibration, seed=cfg.seed)
    if info.get("dropped_layers") is not None:
        log(f"student: {cfg.student}: dropped layers {info['dropped_layers']} (least block influence)")
    if info.get("summary"):
        log(f"student: {cfg.student}: {info['summary']}")
    return model, tokenizer, info


class _Run:
    """One training run's state, set up and driven by `train` in named steps."""

    def __init__(self, cfg: TrainConfig, log):
        self.cfg = cfg
        self.ctx = dist.setup(cfg.dist)
        self.log = log if self.ctx.is_main else (lambda *a, **k: None)  # only rank 0 speaks
        self.out = Path(cfg.out)
        self.last: dict[str, Any] = {}

    def load_data(self) -> None:
        """The capture's training rows and the loss they are trained with."""
        from potstill.capture.store import Capture

        cfg = self.cfg
        self.capture = Capture.open(cfg.capture)
        quiet_transformers()
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.examples = examples_from_capture(self.capture, split="train", max_seq_len=cfg.max_seq_len)
        if not self.examples:
            raise PotstillError("no training rows (split 'train') with completion tokens", where=cfg.capture)
        self.xtok = cfg.loss in XTOK_LOSSES  # cross-tokenizer: train/xtok.py swaps in examples, batches and loss
        self.loss_cfg = LossConfig(kind="ce" if self.xtok else cfg.loss, temperature=cfg.temperature, beta=cfg.beta,
                                   alpha=cfg.alpha, ce_weight=cfg.ce_weight)
        if self.capture.text_only and cfg.loss != "ce" and cfg.mode == "offline":
            self.log(f"notice: {cfg.capture} is text-only (the teacher gave no log-probs); training with ce instead of {cfg.loss}")
            self.loss_cfg = LossConfig(kind="ce")

    def build_student(self, model, tokenizer, student_info) -> None:
        """The given student, or one built from `cfg.student`; checked against the capture's tokenizer."""
        cfg, ctx = self.cfg, self.ctx
        if model is None:
            model, tokenizer, student_info = student_for(cfg, self.examples, self.log, ctx)
        check_tokenizer(self.capture.manifest, tokenizer, cfg.capture, cross_tokenizer=self.xtok)
        self.model, self.tokenizer, self.student_info = model, tokenizer, student_info
        self.plan = None
        if self.xtok:
            from potstill.train.xtok import XtokPlan

            self.plan = XtokPlan.build(self.capture, tokenizer, cfg, self.log)
            self.examples, self.loss_cfg = self.plan.examples, self.plan.loss_cfg

    def prepare(self, teacher) -> None:
        """Device, DDP/FSDP wrapping, the optimizer, the online modes and the loss health checks."""
        cfg, ctx, model = self.cfg, self.ctx, self.model
        self.device = ctx.device
        model.to(self.device).train()
        model.config.use_cache = False
        if cfg.grad_checkpointing:  # recompute each layer's activations in backward: less memory, ~1 more forward
            dist.enable_activation_checkpointing(model)
        self.forward = dist.wrap(model, ctx)  # DDP/FSDP under torchrun; before the optimizer (FSDP shards params)
        self.use_bf16 = autocast_enabled(cfg.bf16, self.device)
        self.pad_id = pad_token_id(self.tokenizer)
        if cfg.freeze_embeddings:  # a tied head is the same tensor: frozen with it
            model.get_input_embeddings().weight.requires_grad_(False)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
        )
        live = None
        if teacher is not None and cfg.mode != "offline":
            live = LiveTeacher(teacher.model.to(self.device), teacher.tokenizer, k=cfg.online_k, name=teacher.name)
        self.modes = setup_modes(cfg, model, self.tokenizer, self.student_info, self.capture, self.device, self.pad_id,
                                 self.log, teacher=live)  # None offline
        self.health = LossHealth(cfg, self.loss_cfg, self.log)
        if self.plan is None:  # cross-tokenizer targets are in the teacher's vocabulary: no self-check there
            self.health.self_check(self.examples, self.pad_id, model, self.modes and self.modes.teacher)

    def resume(self) -> tuple[int, int]:
        """(first step, micro-batches of the data stream already used): from the latest checkpoint with --resume."""
        cfg, ctx = self.cfg, self.ctx
        self.metrics_path = self.out / "metrics.jsonl"
        if not cfg.resume:
            if self.metrics_path.exists() and ctx.is_main:
                self.metrics_path.unlink()
            return 0, 0
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise PotstillError("--resume: no checkpoint to resume from", where=str(self.out / "checkpoints"))
        state = torch.load(ckpt / "weights.pt", map_location="cpu", weights_only=True)
        dist.load_full_state(self.model, self.optimizer, state)
        ckpt_state = json.loads((ckpt / "state.json").read_text())
        start = ckpt_state["step"]
        skip = ckpt_state.get("micro_batches") or start * cfg.grad_accum * ctx.world
        if ctx.is_main:
            truncate_metrics(self.metrics_path, start)
        self.log(f"resumed from {ckpt} at step {start}")
        return start, skip

    def loop(self, start: int, skip: int, on_step) -> None:
        """Optimizer steps from `start` to `cfg.max_steps` (or until `on_step` says stop)."""
        cfg, ctx = self.cfg, self.ctx
        # one data stream for any number of ranks: a step takes world x grad_accum micro-batches of it
        per_step = cfg.grad_accum * ctx.world
        stream = micro_batches(len(self.examples), cfg.batch_size, cfg.seed)
        for _ in range(skip):  # replay the data order up to the resume point
            next(stream)
        if ctx.is_main:
            write_json(self.out / "train_config.json", asdict(cfg))
        dist.reset_peak_memory(self.device)  # the peak of training, not of building the student
        self.t0, self.tokens_seen = time.perf_counter(), 0
        with open(self.metrics_path if ctx.is_main else os.devnull, "a") as metrics:
            for step in range(start, cfg.max_steps):
                step_ids = ctx.shard([next(stream)[1] for _ in range(per_step)])
                self.last = self.step(step, [[self.examples[i] for i in idx] for idx in step_ids])
                self.health.observe(self.last)
                metrics.write(json.dumps(self.last) + "\n")
                metrics.flush()
                self.report(step, start)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
                    micro = skip + (step + 1 - start) * per_step  # micro-batches of the stream used so far
                    ckpt = save_checkpoint(self.out, step + 1, self.model, self.optimizer, ctx, micro=micro)
                    if self.modes and ctx.is_main:
                        self.modes.save(ckpt)  # hidden-state projections, for --resume
                if on_step is not None and on_step(self.last, self.model):  # e.g. a time budget, a study's evals
                    break
        if self.modes:
            self.modes.close()

    def step(self, step: int, groups: list) -> dict[str, Any]:
        """One optimizer step over the micro-batches `groups`; returns the step's metrics."""
        cfg, ctx, modes, plan = self.cfg, self.ctx, self.modes, self.plan
        pack = collate_packed if cfg.packing else collate
        batches = modes.batches(step, groups) if modes else [(plan.collate if plan else pack)(g, self.pad_id)
                                                             for g in groups]
        (n_total,) = ctx.sum(sum(b.n_targets for b in batches))  # the whole step's, over all ranks
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        kd_sum = ce_sum = loss_sum = aux_sum = 0.0
        aux = None
        for i, batch in enumerate(batches):
            batch = _to(batch, self.device)
            if modes:
                batch = modes.score(batch)  # live teacher top-k (+ its hidden states), no grad
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                logits, aux = self.forward(batch, sync=i == len(batches) - 1)
            parts = plan.loss(logits, batch) if plan else distill_loss(
                logits, batch.targets, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob, self.loss_cfg,
                chunk_size=cfg.chunk_size,
            )
            if modes:
                modes.add_hidden(parts, batch)
            loss = parts["loss_sum"] / n_total
            if aux is not None:  # MoE student: router load-balancing loss, weighted by this batch's share of tokens
                loss = loss + self.model.config.router_aux_loss_coef * aux * (batch.n_targets / n_total)
                aux_sum += float(aux.detach()) * batch.n_targets
            # DDP/FSDP average gradients over ranks; x world makes it the sum of the ranks' shares
            (loss * ctx.world).backward()
            loss_sum += float(parts["loss_sum"].detach())
            kd_sum += float(parts["kd_sum"])
            ce_sum += float(parts["ce_sum"])
        grad_norm = (
            dist.grad_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            if cfg.grad_clip
            else None
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if modes:
            modes.step(lr)
        step_tokens = sum(int(b.attention_mask.sum()) for b in batches)
        loss_sum, kd_sum, ce_sum, step_tokens = ctx.sum(loss_sum, kd_sum, ce_sum, step_tokens)
        self.tokens_seen += step_tokens
        elapsed = time.perf_counter() - self.t0
        last = {
            "step": step + 1,
            "loss": loss_sum / n_total,
            "kd": kd_sum / n_total,
            "ce": ce_sum / n_total,
            "lr": lr,
            "grad_norm": grad_norm,
            "target_tokens": n_total,
            "tokens_per_s": self.tokens_seen / elapsed,
            "elapsed_s": elapsed,
            "peak_mem_mb": ctx.max(dist.peak_memory_mb(self.device)),
        }
        if aux is not None:  # MoE student: the router load-balancing term (before its coefficient)
            last["router_aux"] = aux_sum / n_total
        if modes:
            last.update(modes.step_metrics(n_total))
        return last

    def report(self, step: int, start: int) -> None:
        """The step's progress line: loss terms, rate, memory, ETA, health warnings."""
        last, cfg = self.last, self.cfg
        eta = last["elapsed_s"] / (step + 1 - start) * (cfg.max_steps - step - 1)
        self.log(
            f"step {step + 1}/{cfg.max_steps} loss {last['loss']:.4f} kd {last['kd']:.4f} ce {last['ce']:.4f} "
            f"lr {last['lr']:.2e} {last['tokens_per_s']:.0f} tok/s peak {last['peak_mem_mb']:.0f} MB eta {eta:.0f}s"
            + self.health.suffix(last)
        )

    def finish(self) -> dict[str, Any]:
        """Save the student (rank 0) and the run's summary."""
        cfg, ctx, last = self.cfg, self.ctx, self.last
        weights = dist.full_model_state(self.model, ctx)  # FSDP: gathered to rank 0
        if ctx.is_main:
            save_student(self.out, self.model, self.tokenizer, cfg, self.capture, self.student_info or {},
                         self.loss_cfg, state_dict=weights)
        summary = {
            "steps": last.get("step", cfg.max_steps),
            "final": last,
            "train_tokens_per_s": last.get("tokens_per_s"),
            "examples": len(self.examples),
            "bf16": self.use_bf16,
            "loss_health": self.health.report,
            "dist": ctx.mode,
            "world_size": ctx.world,
            "grad_checkpointing": cfg.grad_checkpointing,
            "peak_mem_mb_per_rank": ctx.gather(dist.peak_memory_mb(self.device)),
        }
        if ctx.is_main:
            write_json(self.out / "train_summary.json", summary)
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
    notice = derivative_notice(capture.manifest.get("teacher"))
    if notice:  # the teacher's terms reach the student (Gemma): they travel with it
        (tmp / "NOTICE").write_text(notice)
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


def truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
