"""Loss-health checks for the training log: per-term magnitudes and loud warnings when a run is broken.

- At the start, a self-check: `distill_loss` with the student's logits replaced by the teacher's own
  distribution must be ~0 nats/token. Offline, that distribution is rebuilt from the stored top-k +
  tail (the tail spread evenly over the unstored ids); online, it is the teacher's full-vocabulary
  logits from a plain forward pass, an independent path from the top-k the live teacher yields. A
  non-zero value means the targets do not line up with the positions/ids the student is scored on
  (or the loss is not a divergence). Offline, it also checks that the capture's completion tokens
  mostly sit in their own position's stored top-k (a shifted capture fails that).
- Each step, the magnitudes of the terms (kd, ce, hidden, aux) go to the log line; after the first
  `health_steps` steps, a warning if the weighted KD term is under 1% of the weighted CE term (the
  student is then trained on hard labels, whatever --loss says).

    health = LossHealth(cfg, loss_cfg, log); health.self_check(examples, pad_id, vocab, teacher)
"""

from __future__ import annotations

from typing import Any

import torch

from potstill.train.data import Example, collate
from potstill.train.losses import LossConfig, distill_loss, stored_slots

SELF_CHECK_TOL = 1e-3  # nats/token; quantised codecs and the tail floor stay far below this
NEGLIGIBLE_KD = 0.01  # weighted KD / weighted CE under this is "negligible"
MIN_TARGET_IN_TOPK = 0.3  # a sampled completion token outside its own top-k this often: misaligned


def logits_from_topk(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor,
                     vocab_size: int) -> torch.Tensor:
    """[N, V] logits whose softmax is the stored distribution: stored ids get their log-prob, the
    tail mass is spread evenly over every other id."""
    valid = stored_slots(topk_logprobs)
    n_rest = (vocab_size - valid.sum(-1)).clamp_min(1).float()
    fill = torch.where(tail_logprob > float("-inf"), tail_logprob.float() - n_rest.log(), float("-inf"))
    logits = fill[:, None].expand(-1, vocab_size + 1).clone()
    ids = torch.where(valid, topk_ids, vocab_size)  # padding slots land in a spare column, dropped below
    logits.scatter_(-1, ids, torch.where(valid, topk_logprobs.float(), float("-inf")))
    return logits[:, :vocab_size]


def output_width(model) -> int:
    """Logits per position of a (possibly DDP/FSDP-wrapped) HF causal LM."""
    return int(getattr(model, "module", model).get_output_embeddings().weight.shape[0])


class LossHealth:
    """Self-check at start, per-step term magnitudes, and the negligible-KD warning."""

    def __init__(self, cfg, loss_cfg: LossConfig, log=print):
        self.cfg = cfg
        self.loss_cfg = loss_cfg
        self.log = log
        self.steps = int(getattr(cfg, "health_steps", 10))
        self.kd_w = self.ce_w = 0.0
        self.seen = 0
        self.report: dict[str, Any] = {"warnings": []}

    def warn(self, text: str) -> None:
        self.report["warnings"].append(text)
        self.log(f"WARNING (loss health): {text}")

    # -- start ---------------------------------------------------------------------------------
    @torch.no_grad()
    def self_check(self, examples: list[Example], pad_id: int, student, teacher=None) -> dict[str, Any]:
        """distill_loss(teacher's own distribution as the student's logits) must be ~0; warn loudly if not.

        `student`: the student model (or its output width as an int), for the vocabulary size.
        """
        vocab_size = student if isinstance(student, int) else output_width(student)
        if self.loss_cfg.kind == "ce" or not examples:
            return self.report
        batch = collate(examples[: max(1, min(4, self.cfg.batch_size))], pad_id)  # a few rows: full [B, L, V] logits
        if teacher is not None:
            scored = teacher.score(batch)
            # an independent path: the full model forward, all positions, then the learned ones picked
            dev = teacher.device
            out = teacher.model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev))
            ref = out.logits[batch.rows.to(dev), batch.cols.to(dev)].float().cpu()
            source = f"live teacher logits (top-{teacher.k} + tail)"
        elif batch.topk_ids is not None:
            scored = batch
            ref = logits_from_topk(batch.topk_ids, batch.topk_logprobs, batch.tail_logprob, vocab_size)
            source = "stored top-k + tail"
            self._check_targets(batch)
        else:
            return self.report
        parts = distill_loss(ref, scored.targets.cpu(), scored.topk_ids.cpu(), scored.topk_logprobs.cpu(),
                             scored.tail_logprob.cpu(), self.loss_cfg)
        kd = parts["kd_sum"] / max(parts["count"], 1)
        self.report["self_check_kd"] = kd
        if not kd <= SELF_CHECK_TOL:  # also catches NaN
            self.warn(
                f"self-check failed: {self.loss_cfg.kind} of the teacher against its own distribution "
                f"({source}) is {kd:.4g} nats/token, not ~0: the targets do not line up with the student's "
                "positions or ids"
            )
        else:
            self.log(f"loss self-check: {self.loss_cfg.kind}(teacher || teacher) = {kd:.2e} nats/token ({source}) ok")
        return self.report

    def _check_targets(self, batch) -> None:
        valid = stored_slots(batch.topk_logprobs)
        hit = ((batch.topk_ids == batch.targets[:, None]) & valid).any(-1).float().mean().item()
        self.report["targets_in_topk"] = hit
        if hit < MIN_TARGET_IN_TOPK:
            self.warn(
                f"only {hit:.0%} of the capture's completion tokens are in their own position's stored top-k: "
                "the top-k rows look shifted against the tokens"
            )

    # -- each step -------------------------------------------------------------------------------
    def observe(self, last: dict[str, Any]) -> None:
        """Accumulate the weighted terms; after `health_steps` steps, warn once if KD is negligible."""
        if self.seen >= self.steps:
            return
        w = self.loss_cfg.ce_weight if self.loss_cfg.kind != "ce" else 1.0
        self.kd_w += (1.0 - w) * float(last.get("kd") or 0.0)
        self.ce_w += w * float(last.get("ce") or 0.0)
        self.seen += 1
        if self.seen == self.steps or last.get("step") == self.cfg.max_steps:
            self.seen = self.steps
            self.report["weighted_kd_over_ce"] = self.kd_w / self.ce_w if self.ce_w > 0 else None
            if self.loss_cfg.kind != "ce" and self.ce_w > 0 and self.kd_w < NEGLIGIBLE_KD * self.ce_w:
                self.warn(
                    f"the weighted KD term is {self.kd_w / self.ce_w:.2%} of the weighted CE term over the first "
                    f"{self.steps} steps: the student is learning from hard labels, not the teacher "
                    f"(ce_weight {self.loss_cfg.ce_weight}, {self.loss_cfg.kind} kd ~{self.kd_w / max(1, self.steps):.3g})"
                )

    @staticmethod
    def suffix(last: dict[str, Any]) -> str:
        """The extra terms and the batch kind for the step's log line."""
        parts = [f" {k} {last[k]:.4f}" for k in ("hidden", "router_aux") if isinstance(last.get(k), float)]
        kinds = last.get("batch_kinds")
        if kinds:
            parts.append(" batch " + ",".join(kinds))
        return "".join(parts)
