"""A secret-keyed green-list watermark (Kirchenbauer et al. 2023, "KGW") and its exact detector.

While sampling, every candidate token `v` after context `c` (the previous h tokens) is "green"
when a keyed hash of (key, c, v) falls below `gamma`, and green logits get `+delta`. Text from
the watermarked model therefore holds more green tokens than the `gamma` fraction that any text
written without the key holds. Detection counts green tokens and asks how surprising that count
is under X ~ Binomial(n, gamma): an exact one-sided p-value, computed in log space so that
1e-300 is still a number.

The hash is computed on int64 tensors for a whole [B, V] logit matrix at once (splitmix64
mixing with wrap-around arithmetic, the key's 64-bit seeds taken from sha256(key)), so each id is
green with probability gamma independently (Bernoulli, not an exact gamma fraction per row).

Two seeding schemes:
- `self_hash=False` ("LeftHash"): the seed is an ordered hash of the h context tokens.
- `self_hash=True` ("Min-SelfHash", after Kirchenbauer et al.'s reliability paper, simplified):
  the seed is min(hash(t) for t in context + [candidate]); changing a context token only moves
  the green list when that token held the minimum, which makes the mark sturdier under edits.

What the API reports (`cfg.served_logprobs`, `Watermark.report_processor`, applied by the engine
after sampling). Log-probs computed after the bias give the green lists away: served minus
public log-probs of the top-k ids is 0 or delta, so one top-20 query reads 20 exact bits (issue
14, attack 7; `potstill bench steal` measures it). The default, 'decoy', reports the model's
log-probs biased by the green lists of a second key derived from this one (HMAC): they reveal
nothing of the sampling lists, and a distiller who trains on them still learns a mark that
`potstill detect` tests for (guard/detect_keys.py). 'unbiased' reports the model's own.

Scoring counts each distinct (seed, token) pair once: the pair the hash actually sees. For
LeftHash that is the (context, token) pair; for SelfHash two contexts sharing their minimum give
the same coin, and counting it twice would break the binomial null. Repeating a green phrase
100 times therefore adds nothing.

    wm = Watermark(WatermarkConfig(key=secrets.token_hex(32), vocab_size=49152))
    teacher.complete_ids(prompt_ids, params, logits_processor=wm.logits_processor)
    detect_ids(prompt_ids[0] + completion_ids, cfg, ignore_first=len(prompt_ids[0])).p_value
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from potstill.errors import PotstillError
from potstill.guard.watermark_config import WatermarkConfig


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)
_GOLDEN = _i64(0x9E3779B97F4A7C15)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _fmix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of 64-bit words with good avalanche (int64 wraps).

    Works in place on a copy, so a [B, V] call allocates two buffers rather than ten.
    """
    x = x.clone()
    tmp = torch.empty_like(x)
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp &= (1 << (64 - shift)) - 1  # logical shift
        x ^= tmp
        if mult is not None:
            x *= mult
    return x


def _unbiased(contexts: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """The report processor of 'unbiased' served log-probs: the model's own logits."""
    return logits


class GreenCount(NamedTuple):
    """Distinct (context, token) pairs scored, and how many of them were green."""

    scored: int
    green: int


@dataclass
class WatermarkScore:
    """The detection statistics for one text (or many texts scored together)."""

    tokens_scored: int
    green: int
    gamma: float
    z: float
    p_value: float
    """Exact P[X >= green] for X ~ Binomial(tokens_scored, gamma); underflows to 0 below ~1e-308."""
    log10_p: float
    """log10 of p_value; finite far beyond float range."""

    @classmethod
    def from_counts(cls, scored: int, green: int, gamma: float) -> WatermarkScore:
        z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma)) if scored else 0.0
        log_p = binomial_logsf(green, scored, gamma)
        return cls(scored, green, gamma, z, math.exp(log_p), log_p / math.log(10))

    @property
    def green_fraction(self) -> float:
        return self.green / self.tokens_scored if self.tokens_scored else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "green_fraction": self.green_fraction}


def binomial_logsf(k: int, n: int, p: float) -> float:
    """Natural log of P[X >= k] for X ~ Binomial(n, p), exact (summed in log space).

    The sum starts at the end nearest the mode, where terms are largest, and stops once a term
    is below 1e-17 of the running total (the terms fall geometrically from there).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    lp, lq = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)

    def log_pmf(i: int) -> float:
        return lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq

    upper = k > n * p
    # upper tail: sum i = k, k+1, ... (decreasing terms); else 1 - P[X <= k-1], summed downward
    i, step, stop = (k, 1, n + 1) if upper else (k - 1, -1, -1)
    total = -math.inf
    while i != stop:
        t = log_pmf(i)
        total = max(total, t) + math.log1p(math.exp(-abs(total - t)))
        if t < total - 40.0:
            break
        i += step
    if upper:
        return total
    lower = math.exp(total)
    return math.log1p(-lower) if lower < 1.0 else -math.inf


class Watermark:
    """Green lists for one config: the logits processor for sampling and the scorer for detection."""

    def __init__(self, cfg: WatermarkConfig):
        self.cfg = cfg
        digest = hashlib.sha256(cfg.key.encode("utf-8")).digest()
        # three independent 64-bit seeds: context chain, candidate term, SelfHash token hash
        self._seed_ctx = _i64(int.from_bytes(digest[0:8], "little"))
        self._seed_tok = _i64(int.from_bytes(digest[8:16], "little"))
        self._seed_min = _i64(int.from_bytes(digest[16:24], "little"))
        self._threshold = int(cfg.gamma * (1 << 53))  # green iff the top 53 bits < gamma * 2^53
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- the hash ----------------------------------------------------------------------------
    def _token_hash(self, tokens: torch.Tensor) -> torch.Tensor:
        return _fmix((tokens + 1) * _GOLDEN ^ self._seed_min)

    def _context_seed(self, contexts: torch.Tensor) -> torch.Tensor:
        """[N, h] context ids -> [N] int64 seeds (LeftHash: ordered chain; SelfHash: min hash)."""
        if self.cfg.self_hash:
            return self._token_hash(contexts).amin(dim=1)
        s = torch.full(contexts.shape[:1], self._seed_ctx, dtype=torch.int64, device=contexts.device)
        for j in range(contexts.shape[1]):
            s = _fmix(s + (contexts[:, j] + 1) * _GOLDEN)
        return s

    def pair_seeds(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The seed the hash sees for each (context row, candidate): [N, h] x [N, K] -> [N, K]."""
        ctx = self._context_seed(contexts.long())[:, None]
        if self.cfg.self_hash:
            return torch.minimum(ctx, self._token_hash(tokens.long()))
        return ctx.expand(-1, tokens.shape[-1])

    def _token_term(self, tokens: torch.Tensor) -> torch.Tensor:
        return _fmix((tokens.long() + 1) * _GOLDEN ^ self._seed_tok)

    def _vocab_terms(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, V] candidate terms, [1, V] SelfHash token hashes), cached per (V, device)."""
        key = (vocab_size, str(device))
        if key not in self._cache:
            vocab = torch.arange(vocab_size, device=device)[None, :]
            self._cache[key] = (self._token_term(vocab), self._token_hash(vocab))
        return self._cache[key]

    def _green(self, seeds: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return _srl(_fmix(seeds + term), 11) < self._threshold

    def green_from_seeds(self, seeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Green bits for (seed, token) pairs (broadcasting)."""
        return self._green(seeds, self._token_term(tokens))

    def green_mask(self, contexts: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """[B, h] LongTensor of context ids -> [B, V] BoolTensor, True where the id is green."""
        vocab_size = vocab_size or self.cfg.vocab_size
        if vocab_size is None:
            raise PotstillError("green_mask needs a vocab_size (none in the config)", where="watermark")
        contexts = contexts.long()
        if contexts.dim() != 2 or contexts.shape[1] != self.cfg.context_width:
            raise PotstillError(
                f"contexts must be [B, {self.cfg.context_width}], got {list(contexts.shape)}",
                where="watermark",
            )
        term, tok_hash = self._vocab_terms(vocab_size, contexts.device)
        ctx = self._context_seed(contexts)[:, None]  # [B, 1]
        seeds = torch.minimum(ctx, tok_hash) if self.cfg.self_hash else ctx
        return self._green(seeds, term)

    def is_green(self, context_ids: list[int], token: int) -> bool:
        """Is `token` green after `context_ids` (only the last h ids matter)?"""
        h = self.cfg.context_width
        if len(context_ids) < h:
            raise PotstillError(f"need at least {h} context ids, got {len(context_ids)}", where="watermark")
        ctx = torch.tensor([list(context_ids[-h:])])
        tok = torch.tensor([[token]])
        return bool(self.green_from_seeds(self.pair_seeds(ctx, tok), tok)[0, 0])

    # ---- sampling ------------------------------------------------------------------------------
    def logits_processor(self, contexts: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        """Add delta to the green ids of each row; rows with fewer than h context ids are left alone."""
        h = self.cfg.context_width
        if self.cfg.delta == 0:
            return logits
        rows = [i for i, c in enumerate(contexts) if len(c) >= h]
        if not rows:
            return logits
        ctx = torch.tensor([list(contexts[i][-h:]) for i in rows], device=logits.device)
        mask = self.green_mask(ctx, vocab_size=logits.shape[-1])
        out = logits.clone()
        out[rows] = out[rows] + mask.to(logits.dtype) * self.cfg.delta
        return out

    __call__ = logits_processor

    def report_processor(self):
        """The engine's `report_processor` for `cfg.served_logprobs`: what served log-probs are computed
        from. None ('biased': the distribution sampled from), the identity ('unbiased'), or the decoy
        key's green-list bias ('decoy', see `WatermarkConfig.logprob_config`)."""
        policy = self.cfg.served_logprobs
        if policy == "biased" or self.cfg.delta == 0:
            return None
        if policy == "unbiased":
            return _unbiased
        return Watermark(self.cfg.logprob_config()).logits_processor

    # ---- detection -----------------------------------------------------------------------------
    def pair_table(self, ids: list[int], start: int = 0) -> tuple[list[int], list[int], list[bool]]:
        """(seeds, tokens, green bits) for every position t >= max(h, start) of `ids`.

        Position t is token ids[t] after context ids[t-h:t]; the seeds are what dedup keys on.
        """
        h = self.cfg.context_width
        start = max(h, start)
        if len(ids) <= start:
            return [], [], []
        x = torch.tensor(ids, dtype=torch.long)
        if self.cfg.vocab_size is not None and (int(x.max()) >= self.cfg.vocab_size or int(x.min()) < 0):
            raise PotstillError(
                f"token id out of range for vocab_size {self.cfg.vocab_size}", where="watermark"
            )
        ctx = x.unfold(0, h, 1)[start - h : len(ids) - h]  # [N, h]: windows ending just before t
        tok = x[start:]
        seeds = self.pair_seeds(ctx, tok[:, None])[:, 0]
        green = self.green_from_seeds(seeds, tok)
        return seeds.tolist(), tok.tolist(), green.tolist()

    def score_ids(self, ids: list[int], ignore_first: int = 0, seen: set | None = None) -> GreenCount:
        """Count distinct (context, token) pairs and green ones in `ids`, skipping the first
        `ignore_first` positions (the prompt; they still serve as context). Pass one `seen` set
        to several calls to de-duplicate across texts; it is updated in place.
        """
        seen = set() if seen is None else seen
        scored = green = 0
        for s, t, g in zip(*self.pair_table(ids, ignore_first), strict=True):
            if (s, t) in seen:
                continue
            seen.add((s, t))
            scored += 1
            green += g
        return GreenCount(scored, green)


def detect_ids(
    ids: list[int] | list[list[int]], cfg: WatermarkConfig, ignore_first: int | list[int] = 0
) -> WatermarkScore:
    """Score one token id list, or several scored together (pairs de-duplicated across them)."""
    seqs = ids if ids and isinstance(ids[0], list) else [ids]
    skips = ignore_first if isinstance(ignore_first, list) else [ignore_first] * len(seqs)
    wm, seen = Watermark(cfg), set()
    scored = green = 0
    for seq, skip in zip(seqs, skips, strict=True):
        c = wm.score_ids(seq, skip, seen)
        scored, green = scored + c.scored, green + c.green
    return WatermarkScore.from_counts(scored, green, cfg.gamma)


def detect_text(text: str | list[str], tokenizer, cfg: WatermarkConfig) -> WatermarkScore:
    """Tokenise text (no special tokens) and score it. Re-tokenisation can differ from the ids the
    model sampled; that costs a little power, never validity."""
    texts = [text] if isinstance(text, str) else list(text)
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return detect_ids(ids, cfg)
