"""The distiller's side of `potstill bench steal`: is a student trained on the served data detected?

One small student (a fresh random llama of the teacher's shape) per arm, each trained for the same
steps on the same served completions (the distiller's data), then tested with open-weights
detection on those served sequences (as `potstill detect --log-db` does), under the sampling key,
the decoy log-prob key, and both with the Bonferroni correction (what `potstill detect` reports):

- `fkl, served top-k`: forward KL to the served top-k log-probs (+ tail), whatever the policy serves;
- `fkl, un-biased targets`: the same ids with their public log-probs (what a distiller who knows the
  public weights, or has stolen the green lists, trains on: the bias removed exactly);
- `ce, text only`: cross-entropy on the sampled tokens;
- `control: fkl, no watermark`: fkl on completions served with the watermark off (a null model).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from potstill.bench.steal import PROMPT_LEN, public_logprobs, public_tiny_teacher, serve_batch
from potstill.guard.detect import detect_model
from potstill.guard.detect_keys import bonferroni
from potstill.guard.watermark import Watermark
from potstill.train.losses import forward_kl, student_bucket_logprobs, teacher_bucket_logprobs


def _tensors(comps, topk: list | None, length: int):
    """ids [N, P+L], valid [N, L], topk ids/log-probs [N, L, k] (zeros where invalid)."""
    n = len(comps)
    k = comps[0].topk_ids.shape[1]
    ids = torch.zeros(n, PROMPT_LEN + length, dtype=torch.long)
    valid = torch.zeros(n, length, dtype=torch.bool)
    tk_ids = torch.zeros(n, length, k, dtype=torch.long)
    tk_lp = torch.full((n, length, k), -30.0)
    for i, c in enumerate(comps):
        t = len(c.completion_ids)
        ids[i, : PROMPT_LEN + t] = torch.tensor(c.prompt_ids + c.completion_ids)
        valid[i, :t] = True
        tk_ids[i, :t] = torch.as_tensor(c.topk_ids)
        tk_lp[i, :t] = torch.as_tensor(topk[i] if topk is not None else c.topk_logprobs)
    return ids, valid, tk_ids, tk_lp


def train_student(vocab: int, comps, loss: str, steps: int, seed: int, topk: list | None = None):
    """A fresh tiny llama fit to `comps` by `loss` ('fkl' on top-k targets or 'ce' on the text)."""
    length = max(len(c.completion_ids) for c in comps)
    ids, valid, tk_ids, tk_lp = _tensors(comps, topk, length)
    model = public_tiny_teacher(vocab, seed=seed + 1, init=0.02).model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = torch.randint(0, len(comps), (32,), generator=g)
        logits = model(input_ids=ids[b]).logits[:, PROMPT_LEN - 1 : PROMPT_LEN - 1 + length].float()
        m = valid[b]
        z = logits[m]
        if loss == "ce":
            target = ids[b][:, PROMPT_LEN : PROMPT_LEN + length][m]
            out = torch.nn.functional.cross_entropy(z, target)
        else:
            lp = tk_lp[b][m]
            tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))
            out = forward_kl(teacher_bucket_logprobs(lp, tail), student_bucket_logprobs(z, tk_ids[b][m])).mean()
        opt.zero_grad()
        out.backward()
        opt.step()
    return model.eval()


def _detect(model, seqs: list[list[int]], wm: Watermark) -> dict[str, Any]:
    cfg = wm.cfg
    lens = [PROMPT_LEN] * len(seqs)
    samp = detect_model(model, None, seqs, cfg, prompt_lengths=lens)
    decoy = detect_model(model, None, seqs, cfg.logprob_config(), prompt_lengths=lens)
    both = bonferroni([samp, decoy] if cfg.served_logprobs == "decoy" else [samp])
    return {"p_sampling": samp.p_value, "log10_p_sampling": samp.log10_p, "green_sampling": samp.green_fraction,
            "p_decoy": decoy.p_value, "log10_p_decoy": decoy.log10_p, "green_decoy": decoy.green_fraction,
            "p_detect": both.p_value, "log10_p_detect": both.log10_p, "pairs_scored": samp.tokens_scored}


def student_arms(teacher, wm: Watermark, dist, cfg, log=print) -> list[dict[str, Any]]:
    """Train and detect one student per arm (module docstring) on the distiller's data `dist`."""
    seqs = [c.prompt_ids + c.completion_ids for c in dist]
    pubs = public_logprobs(teacher, dist)
    unbiased = [p.gather(1, torch.as_tensor(c.topk_ids)).numpy() for c, p in zip(dist, pubs, strict=True)]
    off = Watermark(replace(wm.cfg, delta=0.0))
    clean = serve_batch(teacher, off, [c.prompt_ids for c in dist], cfg.completion_tokens, cfg.top_k, cfg.seed)
    arms = [("fkl, served top-k", dist, "fkl", None), ("fkl, un-biased targets", dist, "fkl", unbiased),
            ("ce, text only", dist, "ce", None), ("control: fkl, no watermark", clean, "fkl", None)]
    out = []
    for name, comps, loss, topk in arms:
        model = train_student(cfg.vocab, comps, loss, cfg.student_steps, cfg.seed, topk)
        probe = seqs if comps is dist else [c.prompt_ids + c.completion_ids for c in comps]
        res = {"arm": name, "loss": loss, **_detect(model, probe, wm)}
        log(f"  student {name}: p sampling key {res['p_sampling']:.2g}, decoy key {res['p_decoy']:.2g}, "
            f"detect {res['p_detect']:.2g} ({res['pairs_scored']} pairs)")
        out.append(res)
    return out
