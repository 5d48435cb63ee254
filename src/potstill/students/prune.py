"""Depth pruning: drop the decoder layers whose removal changes the hidden states least.

Each layer's importance is its block influence (ShortGPT, Men et al. 2024): the mean angular
change it makes to the residual stream, 1 - cos(h_in, h_out), measured with forward hooks on
calibration prompts. The least influential layers go; the rest keep their order and weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def decoder_layers(model) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no model.layers ModuleList to prune")
    return layers


@torch.no_grad()
def block_influence(model, calibration: list[list[int]], max_tokens: int = 8192) -> list[float]:
    """Per-layer mean (1 - cosine) between each layer's input and output hidden states."""
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(idx):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            captured[idx] = (h_in.detach(), h_out.detach())

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for ids in calibration:
            if count >= max_tokens:
                break
            model(input_ids=torch.tensor([ids], device=next(model.parameters()).device))
            for i, (h_in, h_out) in captured.items():
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                sums[i] += float((1 - cos).sum())
            count += len(ids)
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


def keep_layers(model, keep: list[int]) -> None:
    """Keep only the given decoder layers (in order), renumbering them for the KV cache."""
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)


def prune_depth(model, calibration: list[list[int]], keep: int) -> dict[str, Any]:
    """Prune `model` in place to `keep` layers by block influence. Returns what was done."""
    scores = block_influence(model, calibration)
    n = len(scores)
    ranked = sorted(range(n), key=lambda i: scores[i])
    dropped = sorted(ranked[: n - keep])
    kept = [i for i in range(n) if i not in dropped]
    keep_layers(model, kept)
    return {
        "method": "prune:depth (block influence, 1 - cos(h_in, h_out))",
        "layers_before": n,
        "layers_after": len(kept),
        "dropped_layers": dropped,
        "block_influence": [round(s, 6) for s in scores],
    }
