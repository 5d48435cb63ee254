"""Fresh students: a randomly initialised llama-style model with the teacher's tokenizer.

`fresh:<size>` takes a parameter budget ("30m", "0.1b") or explicit shape ("layers=4,hidden=256")
or "auto" (half the teacher's parameters). Width comes from a table of tidy sizes; depth fills the
budget. Embeddings are tied, as in small modern LMs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from potstill.errors import PotstillError

WIDTHS = [64, 128, 192, 256, 384, 512, 576, 768, 1024, 1536, 2048]


def parse_size(text: str) -> float:
    text = text.strip().lower()
    mult = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text[-1:], 1.0)
    number = text[:-1] if text[-1:] in "kmb" else text
    return float(number) * mult


def shape_for_budget(params: float, vocab: int) -> tuple[int, int]:
    """(hidden, layers) whose llama-style parameter count is closest to `params`, depth/width ~ 1/32..1/8."""
    best = None
    for h in WIDTHS:
        per_layer = 4 * h * h + 3 * h * int(8 * h / 3)
        layers = round((params - vocab * h) / per_layer)
        if layers < 2:
            continue
        total = vocab * h + layers * per_layer
        aspect_penalty = abs((h / layers) / 24 - 1)
        score = abs(total - params) / params + 0.1 * aspect_penalty
        if best is None or score < best[0]:
            best = (score, h, layers)
    if best is None:
        raise PotstillError(f"fresh student: a budget of {params:.3g} parameters is too small for vocab {vocab}")
    return best[1], best[2]


def fresh_student(teacher_dir: str | Path, size: str, seed: int = 0):
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    tcfg = AutoConfig.from_pretrained(teacher_dir)
    vocab = tcfg.vocab_size
    if "=" in size:
        kv = dict(part.split("=", 1) for part in size.split(","))
        hidden, layers = int(kv.get("hidden", 256)), int(kv.get("layers", 4))
    else:
        if size == "auto":
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                budget = sum(p.numel() for p in AutoModelForCausalLM.from_config(tcfg).parameters()) / 2
        else:
            try:
                budget = parse_size(size)
            except ValueError:
                raise PotstillError(f"fresh student: {size!r} is not a size like 30m or layers=4,hidden=256") from None
        hidden, layers = shape_for_budget(budget, vocab)
    heads = max(1, hidden // 64)
    kv_heads = heads if heads < 3 else max(1, heads // 3)
    while heads % kv_heads:
        kv_heads -= 1
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(8 * hidden / 3) // 32 * 32 or 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=getattr(tcfg, "max_position_embeddings", 2048),
        bos_token_id=tcfg.bos_token_id,
        eos_token_id=tcfg.eos_token_id,
        pad_token_id=getattr(tcfg, "pad_token_id", None),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    info: dict[str, Any] = {"method": "fresh", "hidden_size": hidden, "layers": layers, "heads": heads}
    return model, info
