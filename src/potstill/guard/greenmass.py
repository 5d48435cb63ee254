"""Open-weights radioactivity from the suspect's whole next-token distribution, not only its argmax.

A student trained on watermarked text (even text only, plain cross-entropy) learns to put a little
more probability on the tokens that were green after each context. Its argmax moves only where that
tilt flips the top token; its distribution moves everywhere. So at every scored position t of the
probe sequences (the same positions as detect.py's argmax test: t >= h, outside the prompt) we read
the suspect's top-K next-token probabilities q_t(v) and score

    T = sum over (t, v in top-K) of x_tv * (green(context_t, v) - gamma)

with x_tv = q_t(v) ("mass": the excess probability mass on the green list, the default) or the
log-probability centred over the position's top-K ("logit": a regression of logit on greenness).

The null, for a suspect that never saw our key. The coin green(c, v) depends only on the pair
(seed(c, v), v) the hash sees, and distinct pairs get independent Bernoulli(gamma) coins. Summing x
over every entry that maps to the same pair (repeated contexts, and SelfHash contexts sharing their
minimum) gives T = sum_p a_p (g_p - gamma), so under the null T has mean 0 and variance
gamma (1 - gamma) sum_p a_p^2 exactly, whatever the suspect's own distribution is and however the
positions overlap: z = T / sd is the analytic z (normal tail for the p-value; thousands of bounded
terms). Entries whose pair the suspect has already read in its input are dropped (it may copy
them: see detect.py), with the real key's seeds.

That null is then checked, not assumed: the same table is scored under `null_keys` random keys
(each a suspect-independent key, so each z_r is a draw from the null). Reported: their mean and sd,
the exact rank p-value (1 + #{z_r >= z}) / (R + 1) (never below 1 / (R + 1)), and the headline
p-value, Phi-bar((z - mean_R) / sd_R): the real z against the random-key distribution's estimated
mean and sd, normal tail (with R = 200 keys the sd is known to about +-5 %).

    table = suspect_table(model, tok, seqs, cfg, prompt_lengths=lens)
    result = score_table(table, cfg, GreenMassConfig())
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from potstill.errors import PotstillError
from potstill.guard.greenmass_config import GreenMassConfig
from potstill.guard.watermark import Watermark, WatermarkConfig, WatermarkScore

_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: folds a token id into a pair key


@dataclass
class SuspectTable:
    """What the suspect revealed at every scored position: its top-K ids and their probabilities."""

    contexts: torch.Tensor  # [N, h] context ids (the h ids before position t)
    tokens: torch.Tensor  # [N, K] the suspect's top-K next-token ids
    logprobs: torch.Tensor  # [N, K] their log-probabilities (float32)
    keep: torch.Tensor  # [N, K] False where the suspect had read that pair in its input
    sequences: int
    positions: int

    @property
    def input_pairs_skipped(self) -> int:
        return int((~self.keep).sum())


@dataclass
class GreenMassResult:
    """One open-weights detection with the mass/logit statistic and its random-key null."""

    mode: str
    statistic: str
    contexts: int  # distinct (context) windows scored
    pairs: int  # distinct (seed, token) pairs the statistic sums over
    positions: int
    sequences: int
    input_pairs_skipped: int
    top_k: int
    gamma: float
    green_mass: float  # mean over positions of the top-K mass on green ids / top-K mass
    z: float  # analytic z (exact null mean and variance)
    p_analytic: float
    null_keys: int
    null_mean: float
    null_sd: float
    z_calibrated: float
    p_rank: float
    p_value: float
    log10_p: float
    key_fingerprint: str
    context_width: int
    controls: list[dict[str, Any]] = field(default_factory=list)
    """Reference models scored the same way under our key (`--controls`): each should be > alpha."""

    def detected(self, alpha: float = 1e-4) -> bool:
        return self.pairs > 0 and self.p_value < alpha

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, alpha: float = 1e-4) -> str:
        verdict = "WATERMARK FOUND" if self.detected(alpha) else "no evidence"
        null = (f"vs {self.null_keys} random keys: z_r mean {self.null_mean:+.2f} sd {self.null_sd:.2f}, "
                f"calibrated z={self.z_calibrated:.2f}, rank p={self.p_rank:.3g}" if self.null_keys else "no random keys")
        return (
            f"{verdict} (alpha={alpha:g}): p={self.p_value:.3g} (log10 p={self.log10_p:.1f}); {self.statistic} "
            f"statistic, analytic z={self.z:.2f} (p={self.p_analytic:.3g}); {null}; green mass "
            f"{self.green_mass:.1%} vs {self.gamma:.0%} by chance over {self.contexts} contexts, {self.pairs} pairs, "
            f"{self.positions} positions in {self.sequences} sequences [key {self.key_fingerprint}, h={self.context_width}]"
            + "".join(f"\n  control {c['model']}: p={c['p_value']:.3g} (calibrated z={c['z_calibrated']:.2f})"
                      for c in self.controls)
        )


def normal_logsf(z: float) -> float:
    """ln P[N(0,1) >= z], accurate far into the tail (erfc, then the asymptotic series)."""
    if z < 37:
        return math.log(0.5 * math.erfc(z / math.sqrt(2)))
    return -z * z / 2 - math.log(z * math.sqrt(2 * math.pi)) + math.log1p(-1 / (z * z))


def null_key(i: int) -> str:
    """The i-th random null key: fixed, public and therefore never anyone's secret."""
    return f"potstill-null-{i}-" + hashlib.sha256(f"potstill-null-key-{i}".encode()).hexdigest()[:32]


def _pair_keys(seeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One int64 per (seed, token) pair (a 64-bit mix: distinct pairs collide with chance ~2^-64)."""
    return seeds * 0x100000001B3 ^ (tokens.long() + 1) * _MIX


@torch.no_grad()
def suspect_table(model, tokenizer, sequences: list[list[int]], cfg: WatermarkConfig, top_k: int = 64,
                  prompt_lengths: list[int] | None = None, max_positions: int = 20000,
                  batch_size: int = 4, exclude_input_pairs: bool = True) -> SuspectTable:
    """Run the suspect once under teacher forcing and keep its top-K at each scored position.

    Position t (max(h, prompt) <= t <= len(seq)) is the prediction read at index t-1 after context
    seq[t-h:t], as in detect_model. Stops after `max_positions` positions. `exclude_input_pairs=False`
    keeps the pairs the suspect has read (only to show why they are dropped: a copier looks radioactive).
    """
    from potstill.lm.tokens import pad_token_id

    wm, h = Watermark(cfg), cfg.context_width
    model = model.eval()
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer) if tokenizer is not None else 0
    starts = prompt_lengths or [0] * len(sequences)
    if len(starts) != len(sequences):
        raise PotstillError("prompt_lengths must have one entry per sequence", where="detect")
    ctxs, toks, lps, keeps, n_seqs, n_pos = [], [], [], [], 0, 0
    for b0 in range(0, len(sequences), batch_size):
        batch = [list(s) for s in sequences[b0 : b0 + batch_size]]
        width = max((len(s) for s in batch), default=0)
        if width == 0:
            continue
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        for i, seq in enumerate(batch):
            start = max(h, starts[b0 + i])
            if len(seq) < start or n_pos >= max_positions:
                continue
            end = min(len(seq), start + max_positions - n_pos - 1)
            n_seqs += 1
            lp = logits[i, start - 1 : end].float().log_softmax(-1)
            top_lp, top_id = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
            ctx = torch.tensor(seq, dtype=torch.long).unfold(0, h, 1)[start - h : end - h + 1]
            # drop candidates whose (seed, token) pair the suspect has read before position t
            s_in, t_in, _ = wm.pair_table(seq, h)
            first: dict[int, int] = {}
            for pos, k in enumerate(_pair_keys(torch.tensor(s_in, dtype=torch.long), torch.tensor(t_in)).tolist(), h):
                first.setdefault(k, pos)
            keys = _pair_keys(wm.pair_seeds(ctx, top_id), top_id)
            pos = torch.arange(start, end + 1)[:, None].expand_as(keys)
            seen_at = torch.tensor([first.get(k, 1 << 62) for k in keys.flatten().tolist()]).view_as(keys)
            ctxs.append(ctx)
            toks.append(top_id.cpu())
            lps.append(top_lp.cpu())
            keeps.append(seen_at >= pos if exclude_input_pairs else torch.ones_like(keys, dtype=torch.bool))
            n_pos += len(ctx)
    if not ctxs:
        raise PotstillError("no position to score (sequences shorter than the context width or the prompt)",
                            where="detect")
    return SuspectTable(torch.cat(ctxs), torch.cat(toks), torch.cat(lps), torch.cat(keeps), n_seqs, n_pos)


def coefficients(table: SuspectTable, statistic: str) -> torch.Tensor:
    """x_tv for every entry (0 where dropped): probability (mass) or centred log-probability (logit)."""
    keep = table.keep.float()
    if statistic == "mass":
        return table.logprobs.exp() * keep
    if statistic == "logit":
        lp = table.logprobs.clamp_min(-30.0)
        mean = (lp * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1.0)
        return (lp - mean) * keep
    raise PotstillError(f"unknown statistic {statistic!r}", where="detect")


@dataclass
class RawPairs:
    """The kept entries grouped by raw (context, token) pair, which every key maps to one coin."""

    contexts: torch.Tensor  # [M, h]
    tokens: torch.Tensor  # [M]
    inverse: torch.Tensor  # [E]: kept entry -> raw pair
    mask: torch.Tensor  # [N * K]: which entries are kept

    @classmethod
    def of(cls, table: SuspectTable) -> RawPairs:
        n, k = table.tokens.shape
        h = table.contexts.shape[1]
        mask = table.keep.flatten()
        ctx = table.contexts[:, None, :].expand(n, k, h).reshape(-1, h)[mask]
        tok = table.tokens.flatten()[mask]
        uniq, inv = torch.unique(torch.cat([ctx, tok[:, None]], 1), dim=0, return_inverse=True)
        return cls(uniq[:, :h].contiguous(), uniq[:, h].contiguous(), inv, mask)

    def aggregate(self, x: torch.Tensor) -> torch.Tensor:
        """Sum per-entry coefficients [N, K] into per-raw-pair ones [M] (float64)."""
        out = torch.zeros(len(self.tokens), dtype=torch.float64)
        return out.index_add_(0, self.inverse, x.flatten()[self.mask].double())


def key_z(raw: RawPairs, a_raw: torch.Tensor, cfg: WatermarkConfig) -> tuple[float, int]:
    """(analytic z, distinct (seed, token) pairs) of T = sum_p a_p (g_p - gamma) under one key."""
    wm = Watermark(cfg)
    seeds = wm.pair_seeds(raw.contexts, raw.tokens[:, None])[:, 0]
    g = wm.green_from_seeds(seeds, raw.tokens).double()
    uniq, inv = torch.unique(_pair_keys(seeds, raw.tokens), return_inverse=True)
    a = a_raw
    if len(uniq) < len(seeds):  # SelfHash: raw pairs sharing their minimum see one coin
        a = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, a_raw)
        g = torch.zeros(len(uniq), dtype=torch.float64).index_copy_(0, inv, g)
    t = float((a * (g - cfg.gamma)).sum())
    var = cfg.gamma * (1 - cfg.gamma) * float((a * a).sum())
    return (t / math.sqrt(var) if var > 0 else 0.0), len(uniq)


def null_zs(table: SuspectTable, cfg: WatermarkConfig, gm: GreenMassConfig, raw: RawPairs | None = None) -> list[float]:
    """The statistic's analytic z under each of `gm.null_keys` random keys: draws from the null."""
    raw = raw or RawPairs.of(table)
    a = raw.aggregate(coefficients(table, gm.statistic))
    return [key_z(raw, a, replace(cfg, key=null_key(i)))[0] for i in range(gm.null_keys)]


def green_mass(table: SuspectTable, cfg: WatermarkConfig) -> float:
    """Mean over positions of the share of the kept top-K mass that is green (gamma by chance)."""
    wm = Watermark(cfg)
    q = coefficients(table, "mass")
    g = wm.green_from_seeds(wm.pair_seeds(table.contexts, table.tokens), table.tokens).float()
    tot = q.sum(-1)
    ok = tot > 0
    return float(((q * g).sum(-1)[ok] / tot[ok]).mean()) if bool(ok.any()) else float("nan")


def argmax_score(table: SuspectTable, cfg: WatermarkConfig) -> WatermarkScore:
    """The older statistic from the same table: the suspect's top token, each (seed, token) pair once
    (as detect_model counts it), exact binomial p-value."""
    wm = Watermark(cfg)
    top = table.tokens[:, :1]
    seeds = wm.pair_seeds(table.contexts, top)
    keep = table.keep[:, 0]
    keys = _pair_keys(seeds, top)[:, 0][keep]
    green = wm.green_from_seeds(seeds, top)[:, 0][keep]
    uniq, inv = torch.unique(keys, return_inverse=True)
    g = torch.zeros(len(uniq), dtype=torch.long).index_copy_(0, inv, green.long())
    return WatermarkScore.from_counts(len(uniq), int(g.sum()), cfg.gamma)


def score_table(table: SuspectTable, cfg: WatermarkConfig, gm: GreenMassConfig,
                nulls: list[float] | None = None) -> GreenMassResult:
    """The key's z, the random keys' z's (`nulls`, computed unless given) and the p-values."""
    raw = RawPairs.of(table)
    z, pairs = key_z(raw, raw.aggregate(coefficients(table, gm.statistic)), cfg)
    nulls = null_zs(table, cfg, gm, raw) if nulls is None else nulls
    contexts = len(torch.unique(table.contexts[table.keep.any(-1)], dim=0))
    log_p_an = normal_logsf(z)
    if len(nulls) >= 2:
        nt = torch.tensor(nulls, dtype=torch.float64)
        mean, sd = float(nt.mean()), float(nt.std())
        zc = (z - mean) / sd if sd > 0 else 0.0
        p_rank = (1 + sum(n >= z for n in nulls)) / (len(nulls) + 1)
        log_p = normal_logsf(zc)
    else:
        mean, sd, zc, p_rank, log_p = float("nan"), float("nan"), z, float("nan"), log_p_an
    return GreenMassResult(
        mode="model", statistic=gm.statistic, contexts=contexts, pairs=pairs, positions=table.positions,
        sequences=table.sequences, input_pairs_skipped=table.input_pairs_skipped, top_k=table.tokens.shape[1],
        gamma=cfg.gamma, green_mass=green_mass(table, cfg), z=z, p_analytic=math.exp(log_p_an), null_keys=len(nulls),
        null_mean=mean, null_sd=sd, z_calibrated=zc, p_rank=p_rank, p_value=math.exp(log_p),
        log10_p=log_p / math.log(10), key_fingerprint=cfg.key_fingerprint(), context_width=cfg.context_width,
    )


def detect_model_mass(model, tokenizer, sequences: list[list[int]], cfg: WatermarkConfig,
                      gm: GreenMassConfig | None = None, prompt_lengths: list[int] | None = None,
                      max_positions: int = 20000, batch_size: int = 4) -> GreenMassResult:
    """suspect_table + score_table in one call."""
    gm = gm or GreenMassConfig()
    table = suspect_table(model, tokenizer, sequences, cfg, gm.top_k, prompt_lengths, max_positions, batch_size)
    return score_table(table, cfg, gm)
