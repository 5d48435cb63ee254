"""A decode-step attention for CPU decoding, registered with transformers as "potstill_cpu".

One new token per row attends over the KV cache. PyTorch's CPU SDPA kernel (flash attention for
CPU) is built for long queries; for a single query per row its blocking overhead costs about ten
times what two small batched matmuls cost (measured on this 2-core machine: ~1.8 ms vs ~0.16 ms
per layer at batch 32, 9 query / 3 KV heads, 160 cached positions). So: grouped-query attention
as matmuls (no repeat of K/V: the query heads of one KV group are stacked as rows), softmax in
float32. Prefill (several query positions), dropout, soft-capping and attention-weight outputs
go to transformers' own SDPA path unchanged. The mask is SDPA's (boolean, True = attend).
"""

from __future__ import annotations

import torch

NAME = "potstill_cpu"
_registered = False


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query [B, H, q, D], key/value [B, KV, L, D] -> ([B, q, H, D], None), as transformers expects."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q, d = query.shape
    if q != 1 or dropout or kwargs.get("softcap") is not None or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kv = key.shape[1]
    scores = torch.matmul(query.reshape(b, kv, h // kv, d), key.transpose(-1, -2)).float()
    scores = scores * (scaling if scaling is not None else d**-0.5)  # [B, KV, G, L]
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, -scores.shape[-1] :]  # [B, 1, 1, L]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, KV, G, D]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def use_decode_attention(model) -> bool:
    """Switch a CPU model that runs SDPA attention to the decode attention; False when it cannot."""
    global _registered
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or next(model.parameters()).device.type != "cpu":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not _registered:
        AttentionInterface.register(NAME, decode_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError):
        return False
    return True
