"""Was suspect S distilled from our watermarked outputs? ("radioactivity", Sander et al. 2024)

A model trained on watermarked text learns the green lists: after context c it prefers the
tokens that were green after c. We test for that preference with the same exact binomial test
as for text (see watermark.py), in two modes:

- open weights (`detect_model`): run S under teacher forcing on token sequences we choose and
  score S's own argmax prediction at each position, given the real preceding h tokens;
- text only (`detect_generations`): score S's sampled generations like any text.

Validity rules (a null model must give uniform p-values, so a small p means something):
- each (context, token) pair the hash sees is counted once over everything scored;
- in open-weights mode, a prediction whose (context, token) pair the model has already read in
  its input (earlier in the same sequence) is not scored (`exclude_input_pairs`): any model can
  copy a pair it is shown, and when the inputs hold our watermarked text such copies are green
  far more often than gamma. A pair the model has not read has a key-independent green bit, so
  scoring the suspect's own samples, references or our own outputs is all valid; predicting
  the (unseen) next token of our text is allowed;
- positions inside the prompt part are skipped when the caller gives prompt lengths.

    result = detect_model(student, tok, sequences, WatermarkConfig(key=..., vocab_size=...))
    print(result.summary())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from potstill.guard.watermark import Watermark, WatermarkConfig, WatermarkScore


@dataclass
class DetectResult:
    """The outcome of one detection run: counts, the exact p-value and what was skipped."""

    mode: str  # "model" | "generations"
    tokens_scored: int
    green: int
    gamma: float
    z: float
    p_value: float
    log10_p: float
    sequences: int
    positions: int
    """Predictions (or tokens) looked at before de-duplication and filtering."""
    duplicates_skipped: int
    input_pairs_skipped: int
    key_fingerprint: str
    context_width: int

    @property
    def green_fraction(self) -> float:
        return self.green / self.tokens_scored if self.tokens_scored else 0.0

    def detected(self, alpha: float = 1e-4) -> bool:
        return self.tokens_scored > 0 and self.p_value < alpha

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "green_fraction": self.green_fraction}

    def summary(self, alpha: float = 1e-4) -> str:
        verdict = "WATERMARK FOUND" if self.detected(alpha) else "no evidence"
        return (
            f"{verdict} (alpha={alpha:g}): p={self.p_value:.3g} (log10 p={self.log10_p:.1f}), z={self.z:.2f}; "
            f"{self.green}/{self.tokens_scored} distinct pairs green ({self.green_fraction:.1%} vs "
            f"{self.gamma:.0%} by chance) from {self.positions} {self.mode} positions in "
            f"{self.sequences} sequences [key {self.key_fingerprint}, h={self.context_width}]"
        )


def _result(mode: str, cfg: WatermarkConfig, scored: int, green: int, **counts: int) -> DetectResult:
    s = WatermarkScore.from_counts(scored, green, cfg.gamma)
    return DetectResult(
        mode=mode,
        tokens_scored=s.tokens_scored,
        green=s.green,
        gamma=s.gamma,
        z=s.z,
        p_value=s.p_value,
        log10_p=s.log10_p,
        key_fingerprint=cfg.key_fingerprint(),
        context_width=cfg.context_width,
        **counts,
    )


@torch.no_grad()
def detect_model(
    suspect_model,
    tokenizer,
    prompts_or_texts: list[list[int]],
    cfg: WatermarkConfig,
    max_tokens: int = 20000,
    batch_size: int = 8,
    prompt_lengths: list[int] | None = None,
    exclude_input_pairs: bool = True,
) -> DetectResult:
    """Score the suspect's argmax next-token predictions on `prompts_or_texts` (token id lists).

    At position t (t >= h) the suspect has read ids[:t]; its argmax is scored as green or not
    after context ids[t-h:t] (t may equal len(ids): the prediction after the last token counts).
    `prompt_lengths[i]` skips predictions of positions inside sequence i's prompt. Stops after
    `max_tokens` scored pairs. Memory: one batch of logits is batch_size x length x vocab floats.
    """
    wm = Watermark(cfg)
    h = cfg.context_width
    model = suspect_model.eval()
    device = next(model.parameters()).device
    from potstill.lm.tokens import pad_token_id

    pad = pad_token_id(tokenizer) if tokenizer is not None else 0
    starts = prompt_lengths or [0] * len(prompts_or_texts)
    if len(starts) != len(prompts_or_texts):
        raise ValueError("prompt_lengths must have one entry per sequence")

    seen: set = set()
    scored = green = positions = dups = skipped_input = n_seqs = 0
    for b0 in range(0, len(prompts_or_texts), batch_size):
        batch = [list(s) for s in prompts_or_texts[b0 : b0 + batch_size]]
        width = max(len(s) for s in batch)
        if width == 0:
            continue
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):  # right padding: real positions never see a pad
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, : len(s)] = 1
        preds = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.argmax(-1).cpu()
        for i, seq in enumerate(batch):
            start = max(h, starts[b0 + i])
            if len(seq) < start:
                continue
            n_seqs += 1
            # the prediction read at index t-1 is scored after context seq[t-h:t], t = start..len(seq)
            ctx = torch.tensor(seq, dtype=torch.long).unfold(0, h, 1)[start - h :]
            pred = preds[i, start - 1 : len(seq)]
            seeds = wm.pair_seeds(ctx, pred[:, None])[:, 0]
            bits = wm.green_from_seeds(seeds, pred).tolist()
            first: dict = {}  # (seed, token) -> first position where the input itself holds the pair
            if exclude_input_pairs:
                s_in, t_in, _ = wm.pair_table(seq, h)
                for pos, key in enumerate(zip(s_in, t_in, strict=True), start=h):
                    first.setdefault(key, pos)
            for pos, (s, t, g) in enumerate(
                zip(seeds.tolist(), pred.tolist(), bits, strict=True), start=start
            ):
                positions += 1
                if first.get((s, t), pos) < pos:  # the model has read this pair: it may copy it
                    skipped_input += 1
                    continue
                if (s, t) in seen:
                    dups += 1
                    continue
                seen.add((s, t))
                scored += 1
                green += g
                if scored >= max_tokens:
                    break
            if scored >= max_tokens:
                break
        if scored >= max_tokens:
            break
    return _result(
        "model",
        cfg,
        scored,
        green,
        sequences=n_seqs,
        positions=positions,
        duplicates_skipped=dups,
        input_pairs_skipped=skipped_input,
    )


def detect_generations(
    texts: list[str] | list[list[int]],
    tokenizer,
    cfg: WatermarkConfig,
    prompt_lengths: list[int] | None = None,
    max_tokens: int | None = None,
) -> DetectResult:
    """Score the suspect's generations (strings, tokenised without special tokens, or id lists).

    Give id lists with `prompt_lengths` when each holds prompt + generation: the prompt ids then
    serve as context only.
    """
    wm = Watermark(cfg)
    seqs = [
        list(tokenizer(t, add_special_tokens=False)["input_ids"]) if isinstance(t, str) else list(t)
        for t in texts
    ]
    starts = prompt_lengths or [0] * len(seqs)
    seen: set = set()
    scored = green = positions = dups = 0
    for seq, start in zip(seqs, starts, strict=True):
        for s, t, g in zip(*wm.pair_table(seq, start), strict=True):
            positions += 1
            if (s, t) in seen:
                dups += 1
                continue
            seen.add((s, t))
            scored += 1
            green += g
            if max_tokens is not None and scored >= max_tokens:
                break
        if max_tokens is not None and scored >= max_tokens:
            break
    return _result(
        "generations",
        cfg,
        scored,
        green,
        sequences=len(seqs),
        positions=positions,
        duplicates_skipped=dups,
        input_pairs_skipped=0,
    )
