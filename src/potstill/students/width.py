"""Width pruning: keep the MLP channels and attention heads that write the most into the residual stream.

    model, info = prune_width(model, calibration, ratio=0.5)        # half the MLP channels, ~half the heads
    model, info = prune_width(model, calibration, params=60e6)     # solve the widths for a parameter count

Importance is measured by activation magnitude on calibration prompts (forward pre-hooks on
`down_proj` and `o_proj`, as in Minitron, Muralidharan et al. 2024), weighted by the norm of the
output weights so that a unit counts by what it actually adds to the residual stream:
- MLP channel i of a layer: mean over tokens of |a_i| * ||W_down[:, i]||, a = act(gate(x)) * up(x);
- attention head h: mean over tokens of ||W_o[:, h] o_h||, o_h the head's attention output.

Heads are pruned evenly *within* each KV group (grouped-query attention): every group keeps its
m most important query heads, so K/V projections stay whole and the result is still a plain
Llama-style config (num_attention_heads = m * num_key_value_heads, head_dim kept explicit). Counts
are uniform across layers (the config has one intermediate_size and one head count); which
channels and heads survive is chosen per layer. A parameter target can be met by several splits
(fewer heads and more channels or the reverse): each is tried with masks and the one whose
next-token distributions stay closest (KL) to the original's on calibration tokens is kept.
The pruned model is rebuilt from the new config with the sliced weights, so `save_pretrained` /
`AutoModelForCausalLM.from_pretrained` round-trip.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from potstill.students.prune import decoder_layers


def _attn_mlp(layer):
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in names):
        raise ValueError(f"{type(layer).__name__}: not a llama-style layer (self_attn.q/k/v/o_proj, mlp)")
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError(f"{type(mlp).__name__}: not a gated MLP (gate_proj/up_proj/down_proj)")
    return attn, mlp


def geometry(model) -> dict[str, int]:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"heads": heads, "kv_heads": kv, "group": heads // kv, "head_dim": head_dim,
            "intermediate": cfg.intermediate_size, "layers": cfg.num_hidden_layers}


@torch.no_grad()
def width_importance(model, calibration: list[list[int]], max_tokens: int = 8192):
    """Per layer: channel importance [I] and head importance [H] (means over calibration tokens)."""
    g = geometry(model)
    layers = decoder_layers(model)
    chan = [torch.zeros(g["intermediate"], dtype=torch.float64) for _ in layers]
    head = [torch.zeros(g["heads"], dtype=torch.float64) for _ in layers]

    def mlp_hook(i, down):
        col_norm = down.weight.float().norm(dim=0)  # [I]

        def fn(module, args):
            a = args[0].float().reshape(-1, col_norm.numel())
            chan[i] += (a.abs().sum(0) * col_norm).double()

        return fn

    def attn_hook(i, o_proj):
        w = o_proj.weight.float().reshape(o_proj.weight.shape[0], g["heads"], g["head_dim"])  # [hidden, H, D]

        def fn(module, args):
            o = args[0].float().reshape(-1, g["heads"], g["head_dim"])  # [T, H, D]
            contrib = torch.einsum("thd,khd->thk", o, w)  # each head's write into the residual stream
            head[i] += contrib.norm(dim=-1).sum(0).double()

        return fn

    handles = []
    for i, layer in enumerate(layers):
        attn, mlp = _attn_mlp(layer)
        handles.append(mlp.down_proj.register_forward_pre_hook(mlp_hook(i, mlp.down_proj)))
        handles.append(attn.o_proj.register_forward_pre_hook(attn_hook(i, attn.o_proj)))
    count = 0
    try:
        model.eval()
        device = next(model.parameters()).device
        for ids in calibration:
            if count >= max_tokens:
                break
            model(input_ids=torch.tensor([ids], device=device))
            count += len(ids)
    finally:
        for h in handles:
            h.remove()
    n = max(count, 1)
    return [c / n for c in chan], [h / n for h in head]


def unit_params(model) -> dict[str, int]:
    """Parameters per decoder layer that one MLP channel and one query head own (weights and biases)."""
    g = geometry(model)
    attn, mlp = _attn_mlp(decoder_layers(model)[0])
    per_chan = sum(p.numel() for m in (mlp.gate_proj, mlp.up_proj) for p in m.parameters()) // g["intermediate"]
    per_chan += mlp.down_proj.weight.numel() // g["intermediate"]
    per_head = sum(p.numel() for p in attn.q_proj.parameters()) // g["heads"]
    per_head += attn.o_proj.weight.numel() // g["heads"]
    return {"channel": per_chan, "head": per_head}


def _align(n: int, full: int) -> int:
    """Round channel counts to multiples of 8 on real-sized MLPs (matmul-friendly); exact on tiny ones."""
    step = 8 if full >= 256 else 1
    return max(step, int(round(n / step)) * step) if step > 1 else max(1, int(round(n)))


def width_candidates(model, params: float) -> list[tuple[int, int]]:
    """Every (channels per layer, query heads per KV group) that lands on `params` (one per head count)."""
    g = geometry(model)
    total = sum(p.numel() for p in model.parameters())
    unit = unit_params(model)
    out = []
    for m in range(g["group"], 0, -1):
        heads_cut = (g["group"] - m) * g["kv_heads"] * unit["head"] * g["layers"]
        channels = g["intermediate"] - (total - heads_cut - params) / (unit["channel"] * g["layers"])
        if 1 <= channels <= g["intermediate"]:
            out.append((min(g["intermediate"], _align(channels, g["intermediate"])), m))
    if not out:
        raise ValueError(f"no width reaches {params:.4g} parameters (the model has {total:,})")
    return out


def select_units(chan_imp, head_imp, channels: int, per_group: int, group: int):
    """Per layer: the `channels` most important channels and the `per_group` strongest heads of each KV group."""
    keep_chan, keep_heads = [], []
    for c_imp, h_imp in zip(chan_imp, head_imp, strict=True):
        keep_chan.append(torch.sort(torch.topk(c_imp, channels).indices).values)
        local = torch.topk(h_imp.reshape(-1, group), per_group, dim=1).indices  # [kv_heads, m]
        offsets = torch.arange(local.shape[0]).unsqueeze(1) * group
        keep_heads.append(sorted(int(h) for h in (local + offsets).flatten()))
    return keep_chan, keep_heads


@torch.no_grad()
def masked_kl(model, calibration, plans, max_tokens: int = 1024) -> list[float]:
    """KL(original || pruned) of next-token distributions on calibration tokens, for each plan.

    A plan is (keep_chan, keep_heads); pruning is simulated by zeroing the cut units' inputs to
    down_proj / o_proj (the same function as the sliced model, without rebuilding it).
    """
    g = geometry(model)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    seqs, n = [], 0
    for ids in calibration:
        if n >= max_tokens:
            break
        seqs.append(torch.tensor([ids[: max_tokens - n]], device=device))
        n += seqs[-1].shape[1]
    model.eval()
    ref = [torch.log_softmax(model(input_ids=ids).logits.float(), -1) for ids in seqs]
    out = []
    for keep_chan, keep_heads in plans:
        handles = []
        for i, layer in enumerate(layers):
            attn, mlp = _attn_mlp(layer)
            cmask = torch.zeros(g["intermediate"], device=device)
            cmask[keep_chan[i]] = 1
            hmask = torch.zeros(g["heads"], device=device)
            hmask[keep_heads[i]] = 1
            hmask = hmask.repeat_interleave(g["head_dim"])
            handles.append(mlp.down_proj.register_forward_pre_hook(lambda m, a, k=cmask: (a[0] * k.to(a[0].dtype),)))
            handles.append(attn.o_proj.register_forward_pre_hook(lambda m, a, k=hmask: (a[0] * k.to(a[0].dtype),)))
        try:
            kl = 0.0
            for ids, p in zip(seqs, ref, strict=True):
                q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
                kl += float((p.exp() * (p - q)).sum())
        finally:
            for h in handles:
                h.remove()
        out.append(kl / max(n, 1))
    return out


def plan_widths(model, ratio: float | None = None, params: float | None = None) -> list[tuple[int, int]]:
    """Candidate (channels kept per layer, query heads kept per KV group) for a keep ratio or a parameter target.

    A ratio gives one plan that cuts MLP channels and heads by a matching share. A parameter target
    can be met with several head counts (fewer heads, more channels): all are returned and
    prune_width keeps the one whose pruned model stays closest to the original on calibration.
    """
    g = geometry(model)
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"width ratio {ratio} is not in (0, 1]")
        return [(
            min(g["intermediate"], _align(g["intermediate"] * ratio, g["intermediate"])),
            max(1, min(g["group"], math.floor(g["group"] * ratio + 0.5))),
        )]
    return width_candidates(model, params)


def prune_width(model, calibration: list[list[int]], ratio: float | None = None, params: float | None = None):
    """Return (new model, info): `model` pruned to a keep ratio or a parameter target. `model` is not modified."""
    g = geometry(model)
    before = sum(p.numel() for p in model.parameters())
    chan_imp, head_imp = width_importance(model, calibration)
    plans = plan_widths(model, ratio, params)
    units = [select_units(chan_imp, head_imp, c, m, g["group"]) for c, m in plans]
    # several ways to meet a parameter target: measure each (importance norms of heads and channels
    # do not compare: on SmolLM2 they favour cutting heads, which costs twice the KL of the best split)
    kls = masked_kl(model, calibration, units) if len(plans) > 1 else None
    best = 0 if kls is None else min(range(len(plans)), key=kls.__getitem__)
    channels, per_group = plans[best]
    keep_chan, keep_heads = units[best]
    new = rebuild(model, keep_chan, keep_heads)
    after = sum(p.numel() for p in new.parameters())
    info: dict[str, Any] = {
        "method": "prune:width (activation magnitude x output-weight norm; heads within KV groups)",
        "params_before": before,
        "params_after": after,
        "intermediate_size": [g["intermediate"], channels],
        "num_attention_heads": [g["heads"], per_group * g["kv_heads"]],
        "num_key_value_heads": g["kv_heads"],
        "kept_heads": keep_heads,
        # share of each layer's total channel importance that the kept channels carry
        "kept_channel_importance": [
            round(float(c[k].sum() / c.sum().clamp_min(1e-30)), 4) for c, k in zip(chan_imp, keep_chan, strict=True)
        ],
    }
    if params is not None:
        info["params_target"] = int(params)
    if kls is not None:
        info["candidates"] = [
            {"intermediate_size": c, "num_attention_heads": m * g["kv_heads"], "calibration_kl": round(k, 5)}
            for (c, m), k in zip(plans, kls, strict=True)
        ]
    return new, info


@torch.no_grad()
def rebuild(model, keep_chan: list[torch.Tensor], keep_heads: list[list[int]]):
    """A fresh model of the same class with the narrower config and the kept rows/columns copied in."""
    g = geometry(model)
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.intermediate_size = int(keep_chan[0].numel())
    cfg.num_attention_heads = len(keep_heads[0])
    cfg.head_dim = g["head_dim"]  # explicit: hidden_size // heads no longer gives it
    state = model.state_dict()
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = _attn_mlp(layer)
        base = f"model.layers.{i}"  # decoder_layers() is model.model.layers
        rows = torch.cat([torch.arange(h * g["head_dim"], (h + 1) * g["head_dim"]) for h in keep_heads[i]])
        state[f"{base}.self_attn.q_proj.weight"] = attn.q_proj.weight[rows]
        if attn.q_proj.bias is not None:
            state[f"{base}.self_attn.q_proj.bias"] = attn.q_proj.bias[rows]
        state[f"{base}.self_attn.o_proj.weight"] = attn.o_proj.weight[:, rows]
        ch = keep_chan[i]
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            state[f"{base}.mlp.{name}.weight"] = lin.weight[ch]
            if lin.bias is not None:
                state[f"{base}.mlp.{name}.bias"] = lin.bias[ch]
        state[f"{base}.mlp.down_proj.weight"] = mlp.down_proj.weight[:, ch]
    new = model.__class__(cfg).to(dtype=next(model.parameters()).dtype)
    new.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    new.generation_config = model.generation_config
    return new.eval()
