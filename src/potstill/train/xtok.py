"""Cross-tokenizer training data: a capture made with the teacher's tokenizer, re-read with the student's.

    potstill train --capture runs/cap --student pretrained:runs/other-tok-model --loss uld --teacher embedded

For each capture row (train/loop.py calls `XtokPlan.build` when `--loss` is uld or uld_kl):
1. the prompt messages are rendered with the STUDENT's chat template, and the teacher's
   completion_text is tokenized with the student tokenizer (no special tokens added);
2. both tokenizations are placed on the UTF-8 bytes of the text: each token's byte span comes
   from its piece (byte-level BPE pieces spell bytes exactly, so a token that ends inside a
   multi-byte character is placed exactly -- character offset mappings cannot say that; other
   tokenizers fall back to decoding prefixes). A row whose tokens do not spell its text keeps
   its CE positions but gets no aligned positions (counted in the stats);
3. token-span alignment: a student position and a teacher position are aligned when the tokens
   they predict START at the same byte, i.e. both models have read exactly the same text and
   predict what comes next (equivalently: the previous student and teacher tokens end at the
   same character; the first completion token is always aligned). Positions inside a span where
   the boundaries differ get CE only. This is token-span alignment by exact boundaries, the
   simplest and parameter-free case: MinED (Wan et al. 2024, "Knowledge Fusion of Large Language
   Models") aligns tokens by minimum edit distance and DSKD (Zhang et al. 2024, "Dual-Space
   Knowledge Distillation for Large Language Models") learns the alignment with cross-model
   attention; both also use the unaligned positions, at the price of approximate matches;
4. the teacher's top-k at aligned positions is kept, with each entry mapped to the student id
   spelling the same bytes (-1 when no single student token does; the teacher's EOS maps to the
   student's EOS) for the `uld_kl` loss.
Losses: train/uld.py. CE runs on every student completion token, aligned or not.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import numpy as np
import torch

from potstill.errors import PotstillError
from potstill.lm.tokens import chat_ids, is_byte_level, token_pieces  # noqa: F401  (re-exported)
from potstill.train.data import Batch, Example, collate
from potstill.train.uld import XtokLossConfig, xtok_loss

# -- token pieces and byte spans ---------------------------------------------------------------


def byte_ends(ids, text: str, pieces: list[bytes | None] | None = None, tokenizer=None) -> np.ndarray | None:
    """End byte offset (in text.encode()) of every token of `ids`; None if the tokens do not spell `text`.

    Special tokens (piece None) are 0 bytes long. With `pieces`, spans come from the pieces;
    without, from decoding prefixes with `tokenizer` (exact for any tokenizer, O(T^2)). When the
    tokens' bytes are not valid UTF-8 (a sampled byte token, a completion cut mid-character), the
    stored text holds U+FFFD in their place: offsets are mapped through that lossy decoding, and a
    token ending inside an undecodable run gets -1 (no text position to align on).
    """
    data = text.encode()
    ends = np.zeros(len(ids), dtype=np.int64)
    if pieces is not None:
        pos = 0
        for j, i in enumerate(ids):
            piece = pieces[int(i)] if 0 <= int(i) < len(pieces) else None
            pos += len(piece) if piece else 0
            ends[j] = pos
        spelled = b"".join(pieces[int(i)] or b"" for i in ids)
    else:
        spelled = b""
        for j in range(len(ids)):
            spelled = tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=True).encode()
            ends[j] = len(spelled)
    if spelled == data:
        return ends
    offsets = _lossy_offsets(spelled, text)
    return None if offsets is None else offsets[ends]


def _lossy_offsets(spelled: bytes, text: str) -> np.ndarray | None:
    """Text byte offset of each offset into `spelled`, when `text` is spelled decoded with U+FFFD for
    invalid bytes; -1 where the decoder holds an unfinished sequence. None if that decoding is not `text`."""
    if spelled.decode("utf-8", errors="replace") != text:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = np.full(len(spelled) + 1, -1, dtype=np.int64)
    out[0] = n = 0
    for i in range(len(spelled)):
        n += len(decoder.decode(spelled[i : i + 1]).encode())
        if decoder.getstate()[0] == b"":
            out[i + 1] = n
    return out


def align_starts(teacher_ends: np.ndarray, student_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (teacher i, student j) whose tokens start at the same byte, each side's first such token.

    A token's start is the previous token's end (0 for the first). Zero-length tokens (specials)
    share their start with the next token; the first of a run is taken.
    """
    t_start = np.concatenate([[0], teacher_ends[:-1]]) if len(teacher_ends) else np.zeros(0, np.int64)
    s_start = np.concatenate([[0], student_ends[:-1]]) if len(student_ends) else np.zeros(0, np.int64)
    first_t: dict[int, int] = {}
    for i, s in enumerate(t_start.tolist()):
        if s >= 0:  # -1: a start inside an undecodable byte run, not a text position
            first_t.setdefault(s, i)
    t_idx, s_idx, seen = [], [], set()
    for j, s in enumerate(s_start.tolist()):
        if s >= 0 and s in first_t and s not in seen:
            seen.add(s)
            t_idx.append(first_t[s])
            s_idx.append(j)
    return np.asarray(t_idx, dtype=np.int64), np.asarray(s_idx, dtype=np.int64)


def vocab_map(teacher_pieces: list[bytes | None], student_pieces: list[bytes | None],
              teacher_eos: int | None = None, student_eos: int | None = None) -> np.ndarray:
    """[V_teacher] int64: the student id whose piece has the same bytes, -1 when none (EOS -> EOS)."""
    by_bytes: dict[bytes, int] = {}
    for i, piece in enumerate(student_pieces):
        if piece:
            by_bytes.setdefault(piece, i)
    out = np.array([by_bytes.get(p, -1) if p else -1 for p in teacher_pieces], dtype=np.int64)
    if teacher_eos is not None and student_eos is not None and 0 <= teacher_eos < len(out):
        out[teacher_eos] = student_eos
    return out


# -- examples and batches --------------------------------------------------------------------


@dataclass
class XtokExample(Example):
    """An Example in the student's tokens, with the teacher's top-k at the aligned positions only."""

    kd_index: np.ndarray | None = None  # [A] index among this example's completion targets
    mapped_ids: np.ndarray | None = None  # [A, k] student id of each teacher entry, -1 when none
    text_bytes: int = 0  # UTF-8 bytes of the completion text (for NLL per byte)


@dataclass
class XtokBatch(Batch):
    kd_pos: torch.Tensor | None = None  # [A] rows of the learned positions that are aligned
    mapped_ids: torch.Tensor | None = None  # [A, k]


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The student's prompt ids: its own chat template, or 'role: content' lines without one."""
    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, messages)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def xtok_examples(rows, student_tok, teacher_tok, max_seq_len: int = 512) -> tuple[list[XtokExample], dict]:
    """Capture rows -> examples in the student's tokens, and alignment statistics."""
    s_pieces = token_pieces(student_tok) if is_byte_level(student_tok) else None
    t_pieces = token_pieces(teacher_tok) if is_byte_level(teacher_tok) else None
    mapping = vocab_map(t_pieces or token_pieces(teacher_tok), s_pieces or token_pieces(student_tok),
                        teacher_tok.eos_token_id, student_tok.eos_token_id)
    stats = {"rows": 0, "student_tokens": 0, "teacher_tokens": 0, "aligned": 0, "unspelled_rows": 0,
             "mapped_mass": 0.0}
    out = []
    for row in rows:
        text = row.get("completion_text") or ""
        prompt = np.asarray(render_prompt(student_tok, row["prompt"]), dtype=np.int64)
        completion = np.asarray(student_tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if len(completion) == 0 or len(prompt) >= max_seq_len:
            continue
        keep = min(len(completion), max_seq_len - len(prompt))
        t_ids = row["completion_ids"]
        topk = row.get("topk")
        t_ends = byte_ends(t_ids, text, t_pieces, teacher_tok)
        s_ends = byte_ends(completion, text, s_pieces, student_tok)
        kept_bytes = int(s_ends[:keep].max()) if s_ends is not None else len(text.encode())
        ex = XtokExample(np.concatenate([prompt, completion[:keep]]), len(prompt), None, None, None,
                         text_bytes=kept_bytes)
        if topk is not None and t_ends is not None and s_ends is not None:
            ti, si = align_starts(t_ends, s_ends[:keep])
            ok = ti < len(topk.ids)
            ti, si = ti[ok], si[ok]
            ex.kd_index = si
            ex.topk_ids, ex.topk_logprobs, ex.tail_logprob = topk.ids[ti], topk.logprobs[ti], topk.tail_logprob[ti]
            ex.mapped_ids = np.where(ex.topk_logprobs > -np.inf, mapping[ex.topk_ids], -1)
            probs = np.exp(ex.topk_logprobs.astype(np.float64))
            stats["mapped_mass"] += float(np.where(ex.mapped_ids >= 0, probs, 0.0).sum())
            stats["aligned"] += len(si)
        elif topk is not None:
            stats["unspelled_rows"] += 1
        stats["rows"] += 1
        stats["student_tokens"] += keep
        stats["teacher_tokens"] += len(t_ids)
        out.append(ex)
    stats["aligned_fraction"] = stats["aligned"] / max(1, stats["student_tokens"])
    stats["mapped_mass"] = stats["mapped_mass"] / max(1, stats["aligned"])  # mean teacher mass on mapped entries
    return out, stats


def xtok_collate(examples: list[XtokExample], pad_id: int) -> XtokBatch:
    """`collate` for the student's tokens, plus the aligned teacher entries (rows of kd_pos)."""
    base = collate([Example(e.input_ids, e.prompt_len, None, None, None) for e in examples], pad_id)
    batch = XtokBatch(**vars(base))
    if not all(e.kd_index is not None for e in examples):
        batch.kd_pos = torch.zeros(0, dtype=torch.long)
        return batch
    k = max(e.topk_logprobs.shape[1] for e in examples)
    pos, lps, tails, mapped, offset = [], [], [], [], 0
    for e in examples:
        pos.append(e.kd_index + offset)
        offset += len(e.input_ids) - e.prompt_len
        pad = k - e.topk_logprobs.shape[1]
        lps.append(np.pad(e.topk_logprobs, ((0, 0), (0, pad)), constant_values=-np.inf))
        mapped.append(np.pad(e.mapped_ids, ((0, 0), (0, pad)), constant_values=-1))
        tails.append(e.tail_logprob)
    batch.kd_pos = torch.from_numpy(np.concatenate(pos)).long()
    batch.topk_logprobs = torch.from_numpy(np.concatenate(lps).astype(np.float32))
    batch.tail_logprob = torch.from_numpy(np.concatenate(tails).astype(np.float32))
    batch.mapped_ids = torch.from_numpy(np.concatenate(mapped)).long()
    return batch


# -- the plan the training loop uses -------------------------------------------------------------


def load_teacher_tokenizer(manifest: dict, spec: str, capture_dir: str):
    """The teacher's tokenizer: `spec` (--teacher), else the embedded model's of that name; it must match the
    capture's hash."""
    from transformers import AutoTokenizer

    from potstill.lm.embedded import EMBEDDED
    from potstill.lm.loading import resolve_model_dir
    from potstill.lm.tokens import tokenizer_hash

    teacher = manifest.get("teacher") or {}
    want = teacher.get("tokenizer_sha256")
    tried = []
    candidates = [spec] + [f"embedded:{key}" for key, m in EMBEDDED.items() if m.name == teacher.get("name")]
    for candidate in dict.fromkeys(candidates):
        try:
            tok = AutoTokenizer.from_pretrained(resolve_model_dir(candidate))
        except Exception:  # not a model dir here: try the next candidate
            tried.append(candidate)
            continue
        if want is None or tokenizer_hash(tok) == want:
            return tok
        tried.append(candidate)
    raise PotstillError(
        f"a cross-tokenizer loss needs the tokenizer of the capture's teacher ({teacher.get('name')!r}); "
        f"none of {tried} matches: pass --teacher MODEL_DIR",
        where=f"{capture_dir}/manifest.json: teacher.tokenizer_sha256",
    )


@dataclass
class XtokPlan:
    """Examples, collate and loss for a cross-tokenizer run (what train/loop.py swaps in)."""

    examples: list[XtokExample]
    loss_cfg: XtokLossConfig
    stats: dict

    @classmethod
    def build(cls, capture, student_tok, cfg, log=print) -> XtokPlan:
        teacher_tok = load_teacher_tokenizer(capture.manifest, cfg.teacher, cfg.capture)
        examples, stats = xtok_examples(capture.rows(split="train"), student_tok, teacher_tok, cfg.max_seq_len)
        if not examples:
            raise PotstillError("no training rows (split 'train') with completion text", where=cfg.capture)
        ce_weight = cfg.ce_weight
        if ce_weight == 0.0:  # ULD is blind to which token is which: only CE can teach the student's ids
            ce_weight = 0.5
            log(f"notice: --loss {cfg.loss} always mixes in CE on the student's tokens; ce_weight 0 -> 0.5")
        loss_cfg = XtokLossConfig(kind=cfg.loss, temperature=cfg.temperature, ce_weight=ce_weight,
                                  text_only=capture.text_only)
        log(f"cross-tokenizer ({cfg.loss}): {stats['rows']} rows, {stats['student_tokens']} student tokens "
            f"for {stats['teacher_tokens']} teacher tokens, {stats['aligned_fraction']:.1%} aligned, "
            f"{stats['mapped_mass']:.1%} of aligned teacher mass on single student tokens")
        return cls(examples, loss_cfg, stats)

    @staticmethod
    def collate(examples: list[XtokExample], pad_id: int) -> XtokBatch:
        return xtok_collate(examples, pad_id)

    def loss(self, logits: torch.Tensor, batch: XtokBatch) -> dict:
        return xtok_loss(logits, batch.targets, batch.kd_pos, batch.topk_logprobs, batch.tail_logprob,
                         batch.mapped_ids, self.loss_cfg)


@torch.no_grad()
def text_nll(model, examples: list[XtokExample], pad_id: int, batch_size: int = 8) -> dict:
    """Student NLL of the teacher's completion text in its own tokens: per token and per UTF-8 byte."""
    from potstill.train.data import student_logits
    from potstill.train.losses import ce_loss

    was_training = model.training
    model.eval()
    total = tokens = nbytes = 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        batch = xtok_collate(chunk, pad_id)
        total += float(ce_loss(student_logits(model, batch), batch.targets).sum())
        tokens += batch.n_targets
        nbytes += sum(e.text_bytes for e in chunk)
    model.train(was_training)
    return {"nll_per_token": total / max(1, tokens), "nll_per_byte": total / max(1, nbytes), "tokens": tokens}
