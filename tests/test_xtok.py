"""Cross-tokenizer distillation: byte alignment, vocab mapping, ULD / mapped KL vs dense references, training.

Teacher and student tokenizers really differ here: the tiny byte-level BPE of tests/tiny.py (A),
another byte-level BPE trained on other text with another vocab size (B), and a character-level
WordLevel tokenizer that is not byte-level (C).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from potstill.errors import PotstillError
from potstill.train.losses import student_bucket_logprobs
from potstill.train.uld import XtokLossConfig, mapped_kl, merge_mapped, uld_loss, xtok_loss
from potstill.train.xtok import align_starts, byte_ends, is_byte_level, token_pieces, vocab_map
from tests.tiny import CHAT_TEMPLATE, make_tiny_model, save_tiny_model

OTHER_CORPUS = [
    "Rain falls on the town; the poem is quiet and short.",
    "Paris and Rome are capitals. France, Italy: two countries.",
    "Blue, red, green are colors; cats and dogs are animals.",
    "Practice a language every day and you learn it well.",
    "Gravity: all masses attract each other, says one sentence.",
    "Ten nine eight seven six five four three two one.",
]
MULTI = "héllo wörld 😀 naïve café!"


def make_other_tokenizer(vocab_size: int = 420):
    """Tokenizer B: byte-level BPE on different text with a different vocab size (different merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(OTHER_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
    return fast


def make_char_tokenizer():
    """Tokenizer C: one token per character (WordLevel, not byte-level)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(OTHER_CORPUS) + MULTI + "abcdefghijklmnopqrstuvwxyz\n"))
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tok_b():
    return make_other_tokenizer()


# -- alignment ---------------------------------------------------------------------------------


def test_alignment_on_hand_made_pieces():
    text = "héllo wörld"  # é = c3 a9, ö = c3 b6
    t_pieces = [b"h\xc3", b"\xa9llo", b" w", b"\xc3\xb6", b"rld"]  # teacher splits inside é
    s_pieces = [b"h", b"\xc3\xa9", b"llo", b" ", b"w\xc3\xb6rld"]
    t_ends = byte_ends([0, 1, 2, 3, 4], text, t_pieces)
    s_ends = byte_ends([0, 1, 2, 3, 4], text, s_pieces)
    assert t_ends.tolist() == [2, 6, 8, 10, 13]
    assert s_ends.tolist() == [1, 3, 6, 7, 13]
    ti, si = align_starts(t_ends, s_ends)
    # starts: teacher 0,2,6,8,10; student 0,1,3,6,7 -> shared starts 0 and 6 ("llo" vs " w" follow "hé")
    assert ti.tolist() == [0, 2] and si.tolist() == [0, 3]
    assert byte_ends([0, 1], "hx", t_pieces) is None  # tokens that do not spell the text
    # a completion cut inside ö: the text ends in U+FFFD (3 bytes) and the cut token has no text position
    cut = byte_ends([0, 1, 2, 3], "héllo w\ufffd", [b"h", b"\xc3\xa9llo", b" w", b"\xc3"])
    assert cut.tolist() == [1, 6, 8, -1]
    # an invalid byte mid-text (a random teacher samples byte tokens): offsets shift by U+FFFD's 3 bytes
    bad = byte_ends([0, 1, 2], "a\ufffdbc", [b"a", b"\x99", b"bc"])
    assert bad.tolist() == [1, 4, 6]
    ti, si = align_starts(np.array([1, 4, -1, 9]), np.array([1, 2, 4, 9]))
    assert ti.tolist() == [0, 1, 2] and si.tolist() == [0, 1, 3]


def test_byte_ends_real_tokenizers(tiny_tokenizer, tok_b):
    char = make_char_tokenizer()
    assert is_byte_level(tiny_tokenizer) and is_byte_level(tok_b) and not is_byte_level(char)
    data = MULTI.encode()
    for tok in (tiny_tokenizer, tok_b, char):
        ids = tok(MULTI, add_special_tokens=False)["input_ids"]
        pieces = token_pieces(tok) if is_byte_level(tok) else None
        ends = byte_ends(ids, MULTI, pieces, tok)
        assert ends is not None and ends[-1] == len(data)
        for j in range(len(ids)):  # the bytes up to each end are what the first j+1 tokens spell
            spelled = tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids[: j + 1]))
            if "\ufffd" not in spelled:
                assert data[: ends[j]] == spelled.encode()
    ids = tiny_tokenizer(MULTI, add_special_tokens=False)["input_ids"]
    ends = byte_ends(ids, MULTI, token_pieces(tiny_tokenizer))
    boundaries = {len(MULTI[:i].encode()) for i in range(len(MULTI) + 1)}
    assert any(e not in boundaries for e in ends), "the tiny BPE should split the emoji inside its bytes"
    char_ends = byte_ends(char(MULTI, add_special_tokens=False)["input_ids"], MULTI, None, char)
    assert char_ends.tolist() == [len(MULTI[: i + 1].encode()) for i in range(len(MULTI))]


def test_vocab_map(tiny_tokenizer, tok_b):
    ta, tb = token_pieces(tiny_tokenizer), token_pieces(tok_b)
    m = vocab_map(ta, tb, tiny_tokenizer.eos_token_id, tok_b.eos_token_id)
    assert m[tiny_tokenizer.eos_token_id] == tok_b.eos_token_id
    hits = [i for i in range(len(ta)) if m[i] >= 0 and i != tiny_tokenizer.eos_token_id]
    assert len(hits) > 256  # every byte plus shared merges
    assert all(ta[i] == tb[m[i]] for i in hits)
    b_set = {p for p in tb if p}
    assert all(ta[i] not in b_set for i in range(len(ta)) if m[i] < 0 and ta[i])
    assert len(ta) != len(tb) and any(m[i] < 0 and ta[i] for i in range(len(ta)))  # they really differ


# -- losses vs dense references -------------------------------------------------------------------


def _topk_capture(p_dense: np.ndarray, k: int):
    """Teacher top-k as a capture stores it: log-probs, tail log-prob, ids."""
    order = np.argsort(-p_dense, axis=-1)[:, :k]
    top = np.take_along_axis(p_dense, order, axis=-1)
    tail = np.log(np.clip(1.0 - top.sum(-1), 1e-30, None))
    return torch.tensor(np.log(top), dtype=torch.float32), torch.tensor(tail, dtype=torch.float32), order


def _uld_dense(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Full ULD: L1 between descending-sorted probabilities, zero-padded to one length."""
    n = max(p.shape[1], q.shape[1])
    ps = -np.sort(-np.pad(p, ((0, 0), (0, n - p.shape[1]))), axis=1)
    qs = -np.sort(-np.pad(q, ((0, 0), (0, n - q.shape[1]))), axis=1)
    return np.abs(ps - qs).sum(1)


def test_uld_matches_dense_reference():
    g = torch.Generator().manual_seed(0)
    vt, vs, a = 23, 37, 6
    p = torch.softmax(torch.randn(a, vt, generator=g, dtype=torch.float64) * 2, -1).numpy()
    logits = torch.randn(a, vs, generator=g) * 2
    q = torch.softmax(logits.double(), -1).numpy()
    lp, tail, _ = _topk_capture(p, vt)  # everything stored: ULD is exact
    got = uld_loss(logits, lp, torch.full((a,), float("-inf")))
    np.testing.assert_allclose(got.numpy(), _uld_dense(p, q), atol=2e-5)
    k = 5  # top-5 + tail: head ranks exactly, the rest as one bucket; a lower bound of full ULD
    lp, tail, _ = _topk_capture(p, k)
    got = uld_loss(logits, lp, tail).numpy()
    ps, qs = -np.sort(-p, 1), -np.sort(-q, 1)
    ref = np.abs(ps[:, :k] - qs[:, :k]).sum(1) + np.abs(ps[:, k:].sum(1) - qs[:, k:].sum(1))
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert (got <= _uld_dense(p, q) + 1e-5).all() and (got > 0.01).all()
    # padding slots (mass codec, fewer entries on a row) = the same row without them
    padded = torch.cat([lp[:, :3], torch.full((a, 2), float("-inf"))], 1)
    tail3 = torch.log1p(-lp[:, :3].exp().sum(1))
    np.testing.assert_allclose(uld_loss(logits, padded, tail3).numpy(), uld_loss(logits, lp[:, :3], tail3).numpy(),
                               atol=1e-6)


def test_uld_zero_when_sorted_distributions_equal():
    g = torch.Generator().manual_seed(1)
    vs = 40
    logits = torch.randn(4, vs, generator=g) * 3
    q = torch.softmax(logits.double(), -1).numpy()
    perm = np.random.default_rng(0).permutation(vs)  # the teacher: same probabilities on other ids
    p = q[:, perm]
    for k in (vs, 7):
        lp, tail, _ = _topk_capture(p, k)
        got = uld_loss(logits, lp, tail if k < vs else torch.full((4,), float("-inf")))
        assert got.abs().max() < 1e-5, (k, got)
    lp, tail, _ = _topk_capture(p, 7)
    assert (uld_loss(logits * 0.5, lp, tail) > 0.01).all()


def test_mapped_kl_matches_dense_reference():
    g = torch.Generator().manual_seed(2)
    vt, vs, a, k = 30, 25, 5, 8
    p = torch.softmax(torch.randn(a, vt, generator=g, dtype=torch.float64) * 2, -1).numpy()
    logits = torch.randn(a, vs, generator=g, requires_grad=True)
    q = torch.softmax(logits.detach().double(), -1).numpy()
    mapping = np.full(vt, -1)
    mapping[:18] = np.random.default_rng(1).permutation(vs)[:18]  # 18 teacher tokens exist in the student vocab
    lp, tail, ids = _topk_capture(p, k)
    mapped = torch.tensor(mapping[ids])
    got = mapped_kl(logits, lp, tail, mapped)
    ref = []
    for r in range(a):
        m = mapping[ids[r]] >= 0
        pt = p[r, ids[r][m]]
        qs = q[r, mapping[ids[r][m]]]
        pb, qb = np.append(pt, 1 - pt.sum()), np.append(qs, 1 - qs.sum())
        ref.append((pb * np.log(pb / qb)).sum())
    np.testing.assert_allclose(got.detach().numpy(), ref, atol=2e-5)
    got.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # a student that puts the teacher's probability on each mapped string (and the rest elsewhere) scores 0
    r = 0
    m = mapping[ids[r]] >= 0
    target = np.full(vs, 0.0)
    target[mapping[ids[r][m]]] = p[r, ids[r][m]]
    free = np.setdiff1d(np.arange(vs), mapping[ids[r][m]])
    target[free] = (1 - target.sum()) / len(free)
    zero = mapped_kl(torch.tensor(np.log(target), dtype=torch.float32)[None], lp[:1], tail[:1], mapped[:1])
    assert abs(float(zero)) < 1e-5


def test_mapped_kl_merges_teacher_ids_that_map_to_one_student_id():
    """A non-injective map (SentencePiece "▁the" and "the" both spell the student's "the"): the student's
    mass for a shared id is counted once, so its bucket masses sum to <= 1 and the KL is >= 0."""
    g = torch.Generator().manual_seed(4)
    vt, vs, a, k = 30, 25, 6, 8
    p = torch.softmax(torch.randn(a, vt, generator=g, dtype=torch.float64) * 2, -1).numpy()
    mapping = np.random.default_rng(2).integers(0, 6, vt)  # 30 teacher ids onto 6 student ids
    mapping[25:] = -1
    lp, tail, ids = _topk_capture(p, k)
    mapped = torch.tensor(mapping[ids])
    assert any(len(set(r[r >= 0].tolist())) < int((r >= 0).sum()) for r in mapped.numpy())  # collisions
    # students: random ones, and the one that puts each student id's merged teacher mass on it (the minimiser)
    target = np.full((a, vs), 1e-9)
    for r in range(a):
        for i in ids[r]:
            if mapping[i] >= 0:
                target[r, mapping[i]] += p[r, i]
        free = target[r] < 1e-8
        target[r, free] = (1 - target[r, ~free].sum()) / free.sum()
    students = [torch.randn(a, vs, generator=torch.Generator().manual_seed(s)) * 3 for s in range(4)]
    for logits in [*students, torch.tensor(np.log(target), dtype=torch.float32)]:
        q = torch.softmax(logits.double(), -1).numpy()
        got = mapped_kl(logits, lp, tail, mapped).numpy()
        ref = []
        for r in range(a):  # dense reference: one bucket per distinct student id + other
            sids = sorted({int(mapping[i]) for i in ids[r] if mapping[i] >= 0})
            pt = np.array([p[r, [i for i in ids[r] if mapping[i] == s]].sum() for s in sids])
            qs = q[r, sids]
            assert qs.sum() <= 1 + 1e-12
            pb, qb = np.append(pt, 1 - pt.sum()), np.append(qs, 1 - qs.sum())
            ref.append((pb * np.log(pb / qb)).sum())
        assert (got >= -1e-6).all(), got
        np.testing.assert_allclose(got, ref, atol=2e-5)
    assert np.abs(got).max() < 1e-5  # the minimiser is at 0 (counting its shared ids twice gave -0.03 to -0.18)
    # the student's bucket masses as the loss sees them
    live = (mapped >= 0) & (lp > -np.inf)
    _, first = merge_mapped(torch.zeros(a, k), mapped, live)
    qb = student_bucket_logprobs(logits, mapped.clamp_min(0), valid=first).exp()
    assert (qb[:, :k].sum(-1) <= 1 + 1e-6).all() and torch.allclose(qb.sum(-1), torch.ones(a))


@pytest.mark.parametrize("t", [0.5, 2.0, 4.0])
def test_uld_and_mapped_kl_zero_at_equality_for_every_temperature(t):
    """Both sides tempered the same way over the same buckets: equal buckets give 0 at any T (k < V)."""
    g = torch.Generator().manual_seed(5)
    vs, k = 200, 6
    logits = torch.randn(3, vs, generator=g) * 2
    q = torch.softmax(logits.double(), -1).numpy()
    p = q[:, np.random.default_rng(3).permutation(vs)]
    lp, tail, _ = _topk_capture(p, k)
    assert uld_loss(logits, lp, tail, t).abs().max() < 1e-5
    lp, tail, ids = _topk_capture(q, k)  # the teacher is the student, mapped one to one
    assert mapped_kl(logits, lp, tail, torch.tensor(ids), t).abs().max() < 1e-5


def test_xtok_loss_with_all_weight_on_ce_ignores_an_infinite_kd_term():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(6))
    targets = torch.tensor([1, 2, 3])
    lp = torch.log(torch.tensor([[0.5, 0.5]]))
    tail = torch.tensor([float("-inf")])
    mapped = torch.tensor([[1, 2]])
    logits[0, 1] = float("-inf")  # the student gives a mapped teacher entry probability 0: KL = inf
    out = xtok_loss(logits, targets, torch.tensor([0]), lp, tail, mapped, XtokLossConfig("uld_kl", ce_weight=1.0))
    assert out["kd_sum"] == float("inf")
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert float(out["loss_sum"]) == pytest.approx(float(ce))


def test_xtok_loss_mixes_ce_and_text_only():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 20, generator=g, requires_grad=True)
    targets = torch.randint(0, 20, (6,), generator=g)
    lp = torch.log_softmax(torch.randn(2, 4, generator=g), -1) - 0.1
    tail = torch.log1p(-lp.exp().sum(-1))
    mapped = torch.tensor([[1, -1, 3, 4], [5, 6, -1, -1]])
    pos = torch.tensor([0, 3])
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    for kind in ("uld", "uld_kl"):
        out = xtok_loss(logits, targets, pos, lp, tail, mapped, XtokLossConfig(kind=kind, ce_weight=0.3))
        kd = uld_loss(logits[pos], lp, tail).sum()
        if kind == "uld_kl":
            kd = kd + mapped_kl(logits[pos], lp, tail, mapped).sum()
        assert torch.allclose(out["loss_sum"], 0.7 * kd + 0.3 * ce, atol=1e-5) and out["aligned"] == 2
    text_only = xtok_loss(logits, targets, pos, None, None, None, XtokLossConfig(text_only=True))
    assert torch.allclose(text_only["loss_sum"], ce, atol=1e-5) and text_only["kd_sum"] == 0.0
    with pytest.raises(ValueError, match="uld"):
        XtokLossConfig(kind="fkl")


# -- training from a capture made with another tokenizer ---------------------------------------------

PROMPTS = [{"instruction": t} for t in [
    "Name a color.", "Say hello to the rain.", "Count to three.", "What is the capital of France?",
    "Write a short poem.", "List two animals.", "Explain gravity.", "Summarize the text.",
    "Name three numbers.", "How to learn a language?", "Best way to rest?", "Describe Rome.",
]]


@pytest.fixture(scope="module")
def capture_a(tmp_path_factory, tiny_model_dir):
    from potstill.capture.generate import generate
    from potstill.config import GenerateConfig

    root = tmp_path_factory.mktemp("xtok")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    cfg = GenerateConfig(teacher=str(tiny_model_dir), prompts=str(prompts), out=str(root / "cap"), max_new_tokens=16,
                         top_k=8, batch_size=6, heldout=0.2, dtype="float32", temperature=0.7)
    generate(cfg, log=lambda *_: None)
    return root / "cap"


@pytest.fixture(scope="module")
def student_b(tmp_path_factory, tok_b):
    return save_tiny_model(tmp_path_factory.mktemp("student-b"), make_tiny_model(tok_b, layers=2, seed=1), tok_b)


def _train_cfg(capture, out, student, teacher, **kw):
    from potstill.config import TrainConfig

    base = dict(capture=str(capture), out=str(out), student=f"pretrained:{student}", teacher=str(teacher),
                loss="uld_kl", ce_weight=0.5, max_steps=30, batch_size=4, warmup_steps=3, lr=1e-2,
                checkpoint_every=0, bf16="off")
    base.update(kw)
    return TrainConfig(**base)


def _measure(model_dir, capture_dir, teacher_tok, split="train"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.capture.store import Capture
    from potstill.train.uld import uld_loss
    from potstill.train.xtok import text_nll, xtok_collate, xtok_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples, stats = xtok_examples(Capture.open(capture_dir).rows(split=split), tok, teacher_tok)
    batch = xtok_collate(examples, tok.pad_token_id)
    from potstill.train.data import student_logits

    with torch.no_grad():
        logits = student_logits(model, batch)
        uld = float(uld_loss(logits[batch.kd_pos], batch.topk_logprobs, batch.tail_logprob).mean())
    return uld, text_nll(model, examples, tok.pad_token_id)["nll_per_token"], stats


def test_training_across_tokenizers_lowers_uld_and_nll(tmp_path, capture_a, student_b, tiny_model_dir, tiny_tokenizer):
    from potstill.train.loop import train

    uld0, nll0, stats = _measure(student_b, capture_a, tiny_tokenizer)
    assert 0.2 < stats["aligned_fraction"] < 1.0 and stats["unspelled_rows"] == 0
    lines = []
    summary = train(_train_cfg(capture_a, tmp_path / "s", student_b, tiny_model_dir), log=lines.append)
    assert any("cross-tokenizer (uld_kl)" in ln for ln in lines)
    uld1, nll1, _ = _measure(tmp_path / "s", capture_a, tiny_tokenizer)
    assert uld1 < 0.7 * uld0, (uld0, uld1)
    assert nll1 < nll0 - 1.0, (nll0, nll1)
    # control: the same run with CE only (ce_weight 1) matches the teacher's sorted distributions less well
    train(_train_cfg(capture_a, tmp_path / "ce", student_b, tiny_model_dir, ce_weight=1.0), log=lambda *_: None)
    uld_ce, nll_ce, _ = _measure(tmp_path / "ce", capture_a, tiny_tokenizer)
    assert uld1 < uld_ce, (uld1, uld_ce)
    assert summary["final"]["kd"] > 0
    prov = json.loads((tmp_path / "s" / "provenance.json").read_text())
    assert prov["loss"]["kind"] == "uld_kl" and prov["loss"]["ce_weight"] == 0.5


def test_mismatch_refused_without_xtok_loss(tmp_path, capture_a, student_b, tiny_model_dir):
    from potstill.train.loop import train

    with pytest.raises(PotstillError, match="--loss uld"):
        train(_train_cfg(capture_a, tmp_path / "s", student_b, tiny_model_dir, loss="fkl"), log=lambda *_: None)
    # the teacher's tokenizer must be found: a model dir with another tokenizer is refused by hash
    with pytest.raises(PotstillError, match="--teacher"):
        train(_train_cfg(capture_a, tmp_path / "s2", student_b, student_b), log=lambda *_: None)


@pytest.mark.slow
def test_real_teacher_to_other_tokenizer(tmp_path):
    """SmolLM2 (49k byte-level BPE) capture -> a student whose 600-token BPE is trained on the capture's text."""
    from potstill.bench.xtok import run
    from potstill.capture.generate import generate
    from potstill.config import GenerateConfig

    generate(GenerateConfig(teacher="embedded", prompts="builtin:seed_tasks", out=str(tmp_path / "cap"),
                            max_new_tokens=24, max_prompts=16, heldout=0.25, top_k=20, batch_size=12),
             log=lambda *_: None)
    res = run(str(tmp_path / "cap"), str(tmp_path / "out"), ["uld_kl"], steps=30, vocab=600, hidden=64, layers=2,
              lr=1e-2, log=lambda *_: None)
    init, trained = res["runs"]["init"], res["runs"]["uld_kl"]
    assert res["teacher_vocab"] > 40000 and res["student_vocab"] <= 600
    assert init["aligned_fraction"] > 0.3 and init["rows"] >= 4
    assert trained["nll_per_byte"] < init["nll_per_byte"] - 0.1 and trained["uld"] < init["uld"]
    assert (tmp_path / "out" / "xtok.png").stat().st_size > 0 and (tmp_path / "out" / "xtok.json").exists()
