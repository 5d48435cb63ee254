"""Tokens: tokenizer identity, the pad id, chat-template ids and per-row sampling seeds.

    tokenizer_hash(tok)        # sha256 of the vocabulary: captures and students record it
    pad_token_id(tok)          # the id that fills padded positions (masked out, so any id works)
    chat_ids(tok, messages)    # the chat template's token ids, as a plain list
    row_seed(seed, row_id)     # one completion's seed, independent of the batch it lands in
    token_pieces(tok)          # the bytes each token id spells (exact for byte-level vocabularies)
"""

from __future__ import annotations

import hashlib
import json

from potstill.utils import bytes_to_unicode, sha256_text


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


def is_byte_level(tokenizer) -> bool:
    """True when the tokenizer's decoder is GPT-2 byte-level (its pieces spell bytes exactly)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    return "ByteLevel" in kinds


def token_pieces(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for; None for special tokens and ids with no known bytes.

    Byte-level vocabularies are read exactly through the byte alphabet. Others use
    decode([id]) (approximate: a SentencePiece word-start marker may decode without its space).
    """
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    pieces: list[bytes | None] = [None] * size
    if is_byte_level(tokenizer):
        inverse = {c: b for b, c in bytes_to_unicode().items()}
        for token, i in vocab.items():
            if i not in special and all(c in inverse for c in token):
                pieces[i] = bytes(inverse[c] for c in token)
        return pieces
    for i in range(size):
        if i not in special:
            text = tokenizer.decode([i])
            pieces[i] = text.encode() if text and "\ufffd" not in text else None
    return pieces
