"""Anti-distillation sampling (Savani et al. 2025, "Antidistillation Sampling"): serve tokens that teach
a distiller less.

The teacher samples from its own logits tilted by `lam * Delta`, where `Delta(v | ctx)` estimates how
much one gradient step of a proxy student on token `v` would *raise* the proxy's loss on a
downstream "protect" set the owner cares about. With `g` the gradient of that loss (computed once,
at start-up) and `u = g / |g|`, a step `theta += eta * grad log p(v)` changes the loss by
`eta * |g| * <grad log p(v), u>`, and the directional derivative is taken by finite differences:

    Delta(v | ctx) = [log p_proxy(v | ctx; theta + eps * u) - log p_proxy(v | ctx; theta)] / eps

Two extra proxy forward passes per decode step: the proxy and its perturbed copy each keep their own
KV caches (`ProxyRows`, the engine's `SlabCache`), beside the teacher's, for the same rows. The
processor matches rows to caches by their context lists (the engine passes the same list object,
prompt + tokens so far, at every step of a run): a row seen before with one more token is stepped, an
unseen one is prefilled, and in a call that steps rows, cached rows not in it have left the batch.
`u` is a unit vector so that `eps` is a step length in parameter space whatever the proxy's size.

What the client gets back: the returned `top_logprobs` (and each sampled token's log-prob) are those
of the tilted distribution the token was sampled from (teacher logits + lam * Delta, after the
watermark when both are on), never the clean teacher's: a distiller reading top-k log-probs learns the
tilt too. The temperature divides the tilted logits (the tilt is applied before the sampler).

    proc = AntidistillProcessor.load(cfg, teacher)       # cfg: potstill.config.AntidistillConfig
    teacher.complete_ids(prompt_ids, params, logits_processor=proc)
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from potstill.errors import PotstillError
from potstill.lm.engine import Engine
from potstill.lm.kvslab import SlabCache
from potstill.lm.tokens import chat_ids, tokenizer_hash

log = logging.getLogger(__name__)


class ProxyRows:
    """One proxy model's KV caches for a changing set of rows, in the engine's slab."""

    def __init__(self, model, tokenizer):
        self.engine = Engine(model, tokenizer, name="proxy")
        self.model = model
        self.slab: SlabCache | None = None
        self.attn: torch.Tensor | None = None

    def prefill(self, contexts: list[list[int]]) -> torch.Tensor:
        """Prefill new rows (appended after the cached ones); their last-position logits [n, V]."""
        cache, attn, logits = self.engine._prefill(contexts)
        if self.slab is None:
            max_len = getattr(self.model.config, "max_position_embeddings", None) or 1 << 20
            self.slab, self.attn = SlabCache(cache, attn, len(contexts), max_len), attn
        else:
            self.attn = self.slab.add_rows(cache, self.attn, attn)
        return logits.float()

    def keep(self, positions: list[int]) -> list[int]:
        """Keep the cached rows at `positions` (ascending); returns the new order (old positions)."""
        if not positions:
            self.slab = self.attn = None
            return []
        order = self.slab.keep_rows(positions)
        idx = torch.tensor(order, device=self.engine.device)
        self.attn = self.slab.trim_left(self.attn[idx])
        return order

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to every cached row (in cache order); the next-token logits [rows, V]."""
        slab = self.slab
        attn = torch.cat([self.attn, self.attn.new_ones((slab.rows, 1))], dim=1)
        pos = attn.sum(-1, keepdim=True) - 1
        out = self.model(input_ids=tokens[:, None].to(self.engine.device), attention_mask=slab.step_mask(attn),
                         position_ids=pos, cache=slab.cache, use_cache=True)
        slab.advance()
        self.attn = attn
        return out.logits[:, -1, :].float()


def protect_examples(tokenizer, prompts, stop_ids: list[int], max_len: int = 512) -> list[tuple[list[int], int]]:
    """(prompt + reference answer ids, prompt length) for each prompt with a reference."""
    from potstill.capture.generate import answer_ids

    out = []
    for p in prompts:
        if p.reference:
            prompt = chat_ids(tokenizer, p.messages)
            ids = (prompt + answer_ids(tokenizer, p.messages, p.reference, prompt, stop_ids))[:max_len]
            if len(ids) > len(prompt):
                out.append((ids, len(prompt)))
    return out


def protect_loss_grad(model, examples: list[tuple[list[int], int]], batch_size: int = 8) -> tuple[float, list[torch.Tensor]]:
    """Mean per-token NLL of the answers and its gradient (one tensor per parameter)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    total = sum(len(ids) - n for ids, n in examples)
    loss_sum = 0.0
    model.eval()
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros((len(chunk), width - 1), dtype=torch.bool)
        for b, (seq, n) in enumerate(chunk):
            ids[b, : len(seq)] = torch.tensor(seq)
            attn[b, : len(seq)] = 1
            mask[b, n - 1 : len(seq) - 1] = True  # logits at t predict token t + 1: the answer's tokens
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits[mask], ids[:, 1:][mask], reduction="sum")
            (nll / total).backward()
        loss_sum += float(nll.detach())
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, flag in zip(params, flags, strict=True):
        p.grad = None
        p.requires_grad_(flag)
    return loss_sum / max(total, 1), grads


def perturbed_copy(model, grads: list[torch.Tensor], eps: float) -> tuple[Any, float]:
    """A copy of `model` moved by `eps` along the unit gradient direction; (copy, |g|)."""
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    if not norm > 0:
        raise PotstillError("antidistill: the proxy's loss on the protect set has a zero gradient")
    pert = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(pert.parameters(), grads, strict=True):
            p.add_(g.to(p.dtype), alpha=eps / norm)
    return pert.eval(), norm


class AntidistillProcessor:
    """The logits processor `logits + lam * Delta`, Delta from the proxy and its perturbed copy (module doc).

    One processor serves one decode at a time (the engine's runs, the server's single decode thread).
    """

    def __init__(self, proxy, tokenizer, protect_prompts, lam: float, eps: float = 1e-3, batch_size: int = 8):
        if lam < 0 or not eps > 0:
            raise PotstillError(f"antidistill: lambda must be >= 0 and eps > 0, got {lam}, {eps}")
        self.lam, self.eps = float(lam), float(eps)
        self.proxy = proxy.float().eval()
        from potstill.capture.generate import end_of_turn_ids

        stop = end_of_turn_ids(tokenizer, getattr(proxy, "generation_config", None))
        examples = protect_examples(tokenizer, protect_prompts, stop)
        if not examples:
            raise PotstillError("antidistill: no protect prompt has a reference answer (field 'output' or 'reference')")
        self.protect_loss, grads = protect_loss_grad(self.proxy, examples, batch_size)
        self.perturbed, self.grad_norm = perturbed_copy(self.proxy, grads, self.eps)
        for m in (self.proxy, self.perturbed):
            for p in m.parameters():
                p.requires_grad_(False)
        self.protect_tokens = sum(len(ids) - n for ids, n in examples)
        self.protect_count = len(examples)
        self.tokenizer_sha256 = tokenizer_hash(tokenizer)
        self.base, self.pert = ProxyRows(self.proxy, tokenizer), ProxyRows(self.perturbed, tokenizer)
        self.rows: list[list[int]] = []  # the context list of each cached row, in cache order
        self.fed: list[int] = []  # tokens each cached row has been given

    @classmethod
    def load(cls, cfg, teacher) -> AntidistillProcessor:
        """From an `AntidistillConfig` for a local `teacher`: the proxy must share the teacher's tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from potstill.capture.prompts import load_prompts
        from potstill.lm.loading import resolve_model_dir

        proxy_dir = resolve_model_dir(cfg.proxy)
        tok = AutoTokenizer.from_pretrained(proxy_dir)
        if tokenizer_hash(tok) != tokenizer_hash(teacher.tokenizer):
            raise PotstillError("the proxy's tokenizer differs from the teacher's (Delta is per token id)", where=str(proxy_dir))
        prompts = load_prompts(cfg.protect)
        proxy = AutoModelForCausalLM.from_pretrained(proxy_dir, dtype=torch.float32)
        proc = cls(proxy, tok, prompts, cfg.antidistill, cfg.antidistill_eps)
        proc.source = {"proxy": str(cfg.proxy), "protect": str(cfg.protect)}
        return proc

    def public_dict(self) -> dict[str, Any]:
        """What a capture manifest / the server's config record says about the tilt."""
        return {"lambda": self.lam, "eps": self.eps, **getattr(self, "source", {}),
                "proxy_tokenizer_sha256": self.tokenizer_sha256, "protect_references": self.protect_count,
                "protect_tokens": self.protect_tokens, "protect_loss": round(self.protect_loss, 5),
                "grad_norm": self.grad_norm,
                "top_logprobs": "tilted: returned log-probs are those of the distribution sampled from"}

    # ---- Delta -----------------------------------------------------------------------------------
    def delta(self, contexts: list[list[int]]) -> torch.Tensor:
        """Delta [B, V_proxy] for each row's next token (module doc); updates the proxy caches."""
        where = {id(r): q for q, r in enumerate(self.rows)}
        step, new = [], []
        for b, ctx in enumerate(contexts):
            q = where.get(id(ctx))
            (step if q is not None and len(ctx) == self.fed[q] + 1 else new).append(b)
        lp0 = lp1 = None
        out = None
        stale = [where[id(contexts[b])] for b in new if id(contexts[b]) in where]
        if step or stale:  # rows not stepped now have left (or are re-prefilled): out of the caches
            kept = sorted(where[id(contexts[b])] for b in step) if step else sorted(set(range(len(self.rows))) - set(stale))
            order = self.base.keep(kept)
            self.pert.keep(kept)
            self.rows = [self.rows[q] for q in order]
            self.fed = [self.fed[q] for q in order]
        if step:
            toks = torch.tensor([r[-1] for r in self.rows])
            lp0, lp1 = self.base.step(toks), self.pert.step(toks)
            self.fed = [len(r) for r in self.rows]
            pos = {id(r): q for q, r in enumerate(self.rows)}
            d = (torch.log_softmax(lp1, -1) - torch.log_softmax(lp0, -1)) / self.eps
            out = d.new_zeros((len(contexts), d.shape[1]))
            out[torch.tensor(step)] = d[torch.tensor([pos[id(contexts[b])] for b in step])]
        if new:
            ctxs = [contexts[b] for b in new]
            l0, l1 = self.base.prefill(ctxs), self.pert.prefill(ctxs)
            self.rows += ctxs
            self.fed += [len(c) for c in ctxs]
            d = (torch.log_softmax(l1, -1) - torch.log_softmax(l0, -1)) / self.eps
            if out is None:
                out = d.new_zeros((len(contexts), d.shape[1]))
            out[torch.tensor(new)] = d
        return out

    def __call__(self, contexts: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        if self.lam == 0 or not contexts:
            return logits
        d = self.delta(contexts).to(logits.device, logits.dtype)
        v = min(d.shape[1], logits.shape[1])
        out = logits.clone()
        out[:, :v] += self.lam * d[:, :v]
        return out

    logits_processor = __call__

    @torch.no_grad()
    def delta_forced(self, ids: list[int], start: int) -> torch.Tensor:
        """Delta [len(ids) - start, V] at the positions predicting ids[start:], teacher-forced (no caches)."""
        x = torch.tensor([ids])
        lp = [torch.log_softmax(m(input_ids=x).logits[0, start - 1 : len(ids) - 1].float(), -1)
              for m in (self.proxy, self.perturbed)]
        return (lp[1] - lp[0]) / self.eps
