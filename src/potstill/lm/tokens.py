"""Tokens: tokenizer identity, the pad id, chat-template ids and per-row sampling seeds.

    tokenizer_hash(tok)        # sha256 of the vocabulary: captures and students record it
    pad_token_id(tok)          # the id that fills padded positions (masked out, so any id works)
    chat_ids(tok, messages)    # the chat template's token ids, as a plain list
    row_seed(seed, row_id)     # one completion's seed, independent of the batch it lands in
"""

from __future__ import annotations

import hashlib

from potstill.utils import sha256_text


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), independent of file layout."""
    vocab = tokenizer.get_vocab()
    return sha256_text("\n".join(f"{t}\t{i}" for t, i in sorted(vocab.items(), key=lambda x: x[1])))


def pad_token_id(tokenizer, fallback: int = 0) -> int:
    """The tokenizer's pad id, or `fallback` when it has none.

    Padded positions are masked out (attention mask, loss mask), so the id only has to be a valid
    one: 0 for scoring and training; a decoder passes its first EOS id (what `generate` pads with).
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else fallback


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """`apply_chat_template(..., tokenize=True)` as a list of ids, whichever shape transformers returns
    (a list, or a BatchEncoding / dict with `input_ids`, as transformers 5 does)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def row_seed(base_seed: int, key: str | int) -> int:
    """A 63-bit seed for one completion, from the run seed and the row's id."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
