"""A tiny random llama over a small vocabulary and random id sequences: the watermark detection tests' world."""

from __future__ import annotations

import torch

V = 32



def tiny_llama(seed: int, vocab: int = V):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def random_sequences(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, length), generator=g).tolist()
