"""Online and on-policy training: a live teacher scores every batch during training.

    potstill train --capture runs/cap --mode online --teacher embedded --online-k 64
    potstill train --capture runs/cap --mode on-policy --lmbda 0.5 --loss jsd --beta 0.5
    potstill train --capture runs/cap --mode online --hidden-weight 1.0     # + hidden-state matching

`LiveTeacher` wraps a Hugging Face causal LM with the student's tokenizer and turns a batch into
the same top-k + tail-bucket targets a capture stores (taken from its live logits under
`torch.no_grad()`), so `losses.distill_loss` applies unchanged; with k = vocab size the loss is
the dense full-vocabulary one. `TrainModes` is what the training loop talks to: it builds each
step's micro-batches (swapping a seeded share `lmbda` of them for completions the current student
samples, in on-policy mode), has the teacher score them, adds the optional hidden-state term
(hidden.py) and reports per-step metrics. Offline training does not create one.

On a student batch the KD term compares the student with the teacher on the student's own tokens
(GKD); the CE term, logged always and trained on only with --ce-weight > 0, then targets those
sampled tokens, which teaches nothing new: keep ce_weight 0 for on-policy runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from potstill.config import MODES, check_modes  # noqa: F401  (re-exported; they live with TrainConfig)
from potstill.errors import PotstillError
from potstill.lm.tokens import row_seed
from potstill.train.data import Batch, Example, collate, student_logits


class LiveTeacher:
    """A local HF teacher that yields top-k (+ tail) targets for a batch from its live logits."""

    def __init__(self, model, tokenizer, k: int = 64, name: str = "teacher"):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.k = k
        self.name = name
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, spec: str, k: int = 64, dtype: str = "float32", device: torch.device | None = None) -> LiveTeacher:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from potstill.lm.loading import pick_dtype, resolve_model_dir

        model_dir = resolve_model_dir(spec)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pick_dtype(dtype))
        model.to(device or torch.device("cpu"))
        return cls(model, AutoTokenizer.from_pretrained(model_dir), k=k, name=str(spec))

    def check_student(self, tokenizer, student_vocab: int) -> None:
        """Refuse a student whose tokenizer (or output width) is not the teacher's."""
        from potstill.lm.tokens import tokenizer_hash

        if tokenizer_hash(tokenizer) != tokenizer_hash(self.tokenizer):
            raise PotstillError(
                "the online teacher's tokenizer differs from the student's; online and on-policy modes "
                "score the student's tokens with the teacher, so both must use the same tokenizer",
                where=f"teacher {self.name}",
            )
        if self.vocab_size != student_vocab:
            raise PotstillError(
                f"the online teacher has {self.vocab_size} output logits, the student {student_vocab}; "
                "their vocabularies must line up",
                where=f"teacher {self.name}",
            )

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Teacher logits [N, V] (float32) at the batch's learned positions."""
        moved = _to(batch, self.device)
        return student_logits(self.model, moved).float()

    @torch.no_grad()
    def score(self, batch: Batch) -> Batch:
        """The batch with topk_ids / topk_logprobs / tail_logprob from the teacher's live logits.

        Top-k of log_softmax(logits); the tail is log of the mass of every other id, computed as a
        logsumexp over the rest (never log(1 - sum)); -inf when k covers the vocabulary.
        """
        logprobs = torch.log_softmax(self.logits(batch), dim=-1)
        k = min(self.k, logprobs.shape[-1])
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        rest = logprobs.scatter(-1, top_ids, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1) if k < logprobs.shape[-1] else torch.full_like(top_lp[:, 0], float("-inf"))
        dev = batch.input_ids.device
        return replace(batch, topk_ids=top_ids.to(dev), topk_logprobs=top_lp.to(dev), tail_logprob=tail.to(dev))


def sample_from_student(model, tokenizer, prompts: list[np.ndarray], max_new_tokens: int, temperature: float,
                        top_p: float, seeds: list[int]) -> list[list[int]]:
    """Completions the current student samples for `prompts` (eval mode, no grad), then back to train.

    Uses potstill's batched engine (potstill.lm.engine) on the student; `seeds[i]` seeds row i.
    """
    from potstill.lm.engine import Engine
    from potstill.lm.types import SamplingParams

    was_training = model.training
    use_cache = model.config.use_cache
    try:
        engine = Engine(model, tokenizer, name="student")  # puts the model in eval mode
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_logprobs=0)
        outs = engine.complete_ids([p.tolist() for p in prompts], params, seeds=seeds, **engine_keeps_eos(engine))
    finally:
        model.train(was_training)
        model.config.use_cache = use_cache
    return [o.completion_ids for o in outs]


def engine_keeps_eos(engine) -> dict[str, bool]:
    """{"include_eos": True} where the decoder can keep a final EOS (as captures do), so the student's
    samples end like the capture's completions and the stop decision is distilled too."""
    import inspect

    return {"include_eos": True} if "include_eos" in inspect.signature(engine.complete_ids).parameters else {}


class TrainModes:
    """The loop's handle on online / on-policy training and the hidden-state term."""

    def __init__(self, cfg, teacher: LiveTeacher, model, tokenizer, pad_id: int, sampling: dict[str, Any],
                 hidden=None, log=print, hidden_opt=None):
        self.cfg = cfg
        self.teacher = teacher
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.sampling = sampling
        self.hidden = hidden
        self.hidden_opt = hidden_opt  # the projections' own AdamW (None without a hidden-state loss)
        self.log = log
        self.kinds: list[str] = []
        self.hidden_sum = 0.0

    # -- batches ---------------------------------------------------------------------------------
    def is_onpolicy(self, step: int, micro: int) -> bool:
        """Seeded per (seed, step, micro-batch), so --resume and reruns draw the same batches."""
        if self.cfg.mode != "on-policy":
            return False
        return bool(np.random.default_rng(row_seed(self.cfg.seed, f"onpolicy:{step}:{micro}")).random() < self.cfg.lmbda)

    def sample_seeds(self, step: int, micro: int, n: int) -> list[int]:
        return [row_seed(self.cfg.seed, f"sample:{step}:{micro}:{i}") for i in range(n)]

    def batches(self, step: int, groups: list[list[Example]]) -> list[Batch]:
        """One step's micro-batches: capture rows, or (on-policy draws) the student's own completions."""
        self.kinds, self.hidden_sum = [], 0.0
        out = []
        for micro, group in enumerate(groups):
            if self.is_onpolicy(step, micro):
                group = self.student_examples(group, self.sample_seeds(step, micro, len(group)))
                self.kinds.append("student")
            else:
                self.kinds.append("capture")
            out.append(collate(group, self.pad_id))
        return out

    def student_examples(self, group: list[Example], seeds: list[int]) -> list[Example]:
        """The group's prompts with completions sampled from the current student (no top-k yet)."""
        prompts = [e.input_ids[: e.prompt_len] for e in group]
        s = self.sampling
        completions = sample_from_student(
            self.model, self.tokenizer, prompts, s["max_new_tokens"], s["temperature"], s["top_p"], seeds
        )
        out = []
        for p, c in zip(prompts, completions, strict=True):
            c = c[: max(0, self.cfg.max_seq_len - len(p))]
            ids = np.concatenate([p, np.asarray(c, dtype=np.int64)]).astype(np.int64)
            out.append(Example(ids, len(p), None, None, None))
        return out

    # -- per micro-batch ---------------------------------------------------------------------------
    def score(self, batch: Batch) -> Batch:
        """Teacher top-k for the batch (and the teacher's hidden states, when the hidden term is on)."""
        if self.hidden is not None:
            self.hidden.begin(batch)
        return self.teacher.score(batch)

    def add_hidden(self, parts: dict, batch: Batch) -> None:
        """Add the weighted hidden-state term to the loss sum (call after the student's forward)."""
        if self.hidden is None:
            return
        h = self.hidden.loss_sum(batch)
        parts["loss_sum"] = parts["loss_sum"] + self.cfg.hidden_weight * h
        parts["hidden_sum"] = float(h.detach())
        self.hidden_sum += parts["hidden_sum"]

    def step_metrics(self, n_total: int) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.cfg.mode, "batch_kinds": list(self.kinds)}
        if self.hidden is not None:
            out["hidden"] = self.hidden_sum / max(n_total, 1)
        return out

    # -- checkpoints (the projections are trained with the student but are not part of the HF model) --
    def step(self, lr: float) -> None:
        """Step the hidden-state projections with the student (same learning-rate schedule)."""
        if self.hidden_opt is not None:
            for group in self.hidden_opt.param_groups:
                group["lr"] = lr
            self.hidden_opt.step()
            self.hidden_opt.zero_grad(set_to_none=True)

    def save(self, ckpt: Path) -> None:
        if self.hidden is not None:
            self.hidden.save(ckpt, self.hidden_opt)

    def close(self) -> None:
        if self.hidden is not None:
            self.hidden.remove()


def setup_modes(cfg, model, tokenizer, student_info: dict | None, capture, device, pad_id: int,
                log=print, teacher: LiveTeacher | None = None) -> TrainModes | None:
    """Load the live teacher and wire online / on-policy / hidden-state training; None when offline."""
    if cfg.mode == "offline":
        return None
    if teacher is None:
        teacher = LiveTeacher.load(cfg.teacher, k=cfg.online_k, dtype=cfg.teacher_dtype, device=device)
    from potstill.train.health import output_width

    model = getattr(model, "module", model)  # a DDP/FSDP wrapper: sample from and hook the wrapped model
    teacher.check_student(tokenizer, output_width(model))
    sampling = dict(capture.manifest.get("sampling") or {})
    sampling = {
        "max_new_tokens": cfg.sample_max_new_tokens or int(sampling.get("max_new_tokens") or 64),
        "temperature": float(cfg.sample_temperature if cfg.sample_temperature is not None
                             else sampling.get("temperature", 1.0)),
        "top_p": float(sampling.get("top_p") or 1.0),
    }
    hidden = hidden_opt = None
    if cfg.hidden_weight > 0:
        from potstill.train.hidden import HiddenMatcher

        hidden = HiddenMatcher.build(model, teacher.model, student_info or {}, device)
        # their own optimizer: the student's optimizer state is keyed by the student's parameter names
        hidden_opt = torch.optim.AdamW(hidden.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        log(f"hidden-state loss: student layer -> teacher layer {hidden.mapping} (weight {cfg.hidden_weight})")
        if cfg.resume:
            from potstill.train.loop import latest_checkpoint

            ckpt = latest_checkpoint(Path(cfg.out))
            if ckpt is not None and not hidden.load(ckpt, hidden_opt):
                log(f"warning: {ckpt} has no hidden-state projections; they restart from their initialisation")
    extra = f", student samples for {cfg.lmbda:.0%} of batches ({sampling})" if cfg.mode == "on-policy" else ""
    log(f"mode {cfg.mode}: live teacher {teacher.name}, top-{teacher.k} + tail from its logits{extra}")
    return TrainModes(cfg, teacher, model, tokenizer, pad_id, sampling, hidden, log, hidden_opt)


def _to(batch: Batch, device: torch.device) -> Batch:
    if batch.input_ids.device == device:
        return batch
    return replace(batch, **{k: v.to(device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)})
