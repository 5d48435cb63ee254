"""Sparse upcycling: a dense llama-style student becomes a Mixtral mixture-of-experts.

    moe, info = upcycle(dense, experts=4, top_k=2)

Each expert starts as a copy of the layer's dense MLP (Komatsuzaki et al. 2023, "Sparse
Upcycling"); the router is small random. Mixtral renormalises the top-k routing weights to sum to
one, so with identical experts the upcycled model computes exactly the dense function whatever
the router says; `noise` > 0 perturbs experts 1..E-1 so they start apart (then only approximately).

Why Mixtral: in transformers 5 `MixtralForCausalLM` is the llama block with the MLP replaced by a
top-k MoE and nothing else (same attention, RMSNorm, RoPE via `rope_parameters`, explicit
`head_dim`, `tie_word_embeddings`), so a llama/SmolLM2 student maps onto it weight for weight and
`AutoModelForCausalLM.from_pretrained` loads it unchanged. Qwen2-MoE adds a shared expert and
q/k/v biases, OLMoE a QK-norm: neither is the dense model plus experts.

Training adds the router load-balancing loss (Switch Transformer) with `router_aux_loss_coef`
from the config, see `potstill.train.data.student_logits(with_aux=True)`.
"""

from __future__ import annotations

from typing import Any

import torch

from potstill.errors import PotstillError

ROUTER_AUX_LOSS_COEF = 0.01  # Switch/upcycling papers' value; Mixtral's default 0.001 barely balances small runs


def _dense_keys(n_layers: int, tied: bool) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if not tied else set())
    for i in range(n_layers):
        p = f"model.layers.{i}."
        keys |= {p + n + ".weight" for n in ("input_layernorm", "post_attention_layernorm")}
        keys |= {p + "self_attn." + n + ".weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        keys |= {p + "mlp." + n + ".weight" for n in ("gate_proj", "up_proj", "down_proj")}
    return keys


def mixtral_config(dense_cfg, experts: int, top_k: int):
    from transformers import MixtralConfig

    heads = dense_cfg.num_attention_heads
    return MixtralConfig(
        vocab_size=dense_cfg.vocab_size,
        hidden_size=dense_cfg.hidden_size,
        intermediate_size=dense_cfg.intermediate_size,
        num_hidden_layers=dense_cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(dense_cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(dense_cfg, "head_dim", None) or dense_cfg.hidden_size // heads,
        hidden_act=dense_cfg.hidden_act,
        max_position_embeddings=dense_cfg.max_position_embeddings,
        initializer_range=dense_cfg.initializer_range,
        rms_norm_eps=dense_cfg.rms_norm_eps,
        pad_token_id=dense_cfg.pad_token_id,
        bos_token_id=dense_cfg.bos_token_id,
        eos_token_id=dense_cfg.eos_token_id,
        tie_word_embeddings=dense_cfg.tie_word_embeddings,
        attention_dropout=getattr(dense_cfg, "attention_dropout", 0.0),
        rope_parameters=dict(dense_cfg.rope_parameters),
        sliding_window=None,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_aux_loss_coef=ROUTER_AUX_LOSS_COEF,
        router_jitter_noise=0.0,
    )


@torch.no_grad()
def upcycle(dense, experts: int = 4, top_k: int = 2, noise: float = 0.0, seed: int = 0):
    """Return (MixtralForCausalLM, info) whose E experts per layer copy `dense`'s MLPs. `dense` is not modified."""
    from transformers import MixtralForCausalLM

    if not 1 <= top_k <= experts:
        raise PotstillError(f"moe:upcycle: top-k {top_k} must be between 1 and the number of experts ({experts})")
    cfg = dense.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral", "mixtral") or getattr(cfg, "mlp_bias", False) \
            or getattr(cfg, "attention_bias", False):
        raise PotstillError(f"moe:upcycle: needs a bias-free llama-style student, got {cfg.model_type!r}")
    state = dense.state_dict()
    tied = bool(cfg.tie_word_embeddings)
    extra = set(state) - _dense_keys(cfg.num_hidden_layers, tied) - ({"lm_head.weight"} if tied else set())
    if extra:
        raise PotstillError(f"moe:upcycle: {type(dense).__name__} has weights a Mixtral cannot hold: {sorted(extra)[:3]}")
    moe_cfg = mixtral_config(cfg, experts, top_k)
    moe = MixtralForCausalLM(moe_cfg).to(next(dense.parameters()).dtype)
    gen = torch.Generator().manual_seed(seed)
    new_state: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".mlp." not in key:
            new_state[key] = value
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate_up = torch.cat([state[p + "gate_proj.weight"], state[p + "up_proj.weight"]])  # [2I, H]: gate rows first
        down = state[p + "down_proj.weight"]  # [H, I]
        gu = gate_up.unsqueeze(0).repeat(experts, 1, 1)
        dn = down.unsqueeze(0).repeat(experts, 1, 1)
        if noise > 0:  # expert 0 stays the exact copy
            gu[1:] += noise * gate_up.std() * torch.randn(gu[1:].shape, generator=gen).to(gu.dtype)
            dn[1:] += noise * down.std() * torch.randn(dn[1:].shape, generator=gen).to(dn.dtype)
        new_state[p + "experts.gate_up_proj"] = gu
        new_state[p + "experts.down_proj"] = dn
        new_state[p + "gate.weight"] = (
            moe_cfg.initializer_range * torch.randn(experts, cfg.hidden_size, generator=gen)
        ).to(gate_up.dtype)
    moe.load_state_dict(new_state, strict=True)
    moe.generation_config = dense.generation_config
    return moe.eval(), {
        "method": "moe:upcycle (Mixtral; experts copy the dense MLP, router random small)",
        "experts": experts,
        "top_k": top_k,
        "noise": noise,
        "router_aux_loss_coef": moe_cfg.router_aux_loss_coef,
        **moe_params(moe),
        "dense_params": sum(v.numel() for v in dense.parameters()),
    }


def moe_params(model) -> dict[str, Any]:
    """Total parameters and active parameters per token (everything but the experts, plus top-k experts)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_local_experts
    return {"params": total, "active_params": active}


def is_moe(model) -> bool:
    return getattr(model.config, "router_aux_loss_coef", None) is not None
