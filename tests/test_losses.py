"""Tests for potstill.train.losses: dense full-vocabulary references, zero at teacher == student,
padding, dtypes, chunking and sum semantics. Tiny sizes (V=50, k=5, N=12): the file runs in seconds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from potstill.train.losses import (
    LOSSES,
    LossConfig,
    ce_loss,
    distill_loss,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    skew_rkl,
    stored_slots,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
)

N, V, K = 12, 50, 5
INF = float("inf")

# (kind, params): every KD kind, with jsd/skl/srkl at interior and end-point parameters.
KD_CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skl", {"alpha": 0.1}),
    ("skl", {"alpha": 0.0}),
    ("srkl", {"alpha": 0.1}),
    ("srkl", {"alpha": 0.4}),
    ("tvd", {}),
]
KD_IDS = [f"{k}-{'-'.join(f'{a}{b}' for a, b in p.items())}" for k, p in KD_CASES]


# -- independent dense references (float64, plain Python over lists of probabilities) -------------


def ref_kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def ref_divergence(kind: str, p: list[float], q: list[float], beta: float = 0.5, alpha: float = 0.1) -> float:
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return ref_kl(p, q)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return ref_kl(q, p)
    if kind == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if kind == "skl":
        return ref_kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q, strict=True)])
    if kind == "srkl":
        return ref_kl(q, [(1 - alpha) * x + alpha * y for x, y in zip(p, q, strict=True)])
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    raise AssertionError(kind)


def ref_softmax(row: list[float], t: float = 1.0) -> list[float]:
    top = max(row)
    e = [math.exp((x - top) / t) for x in row]
    s = sum(e)
    return [x / s for x in e]


# -- inputs ----------------------------------------------------------------------------------------


def make_capture(logits: torch.Tensor, k: int, keep: dict[int, int] | None = None):
    """A teacher's stored top-k from full logits: (ids, logprobs, tail); rows in `keep` hold fewer entries."""
    lp = torch.log_softmax(logits.double(), -1)
    lps, ids = lp.topk(k, dim=-1)
    for r, c in (keep or {}).items():
        ids[r, c:] = 0
        lps[r, c:] = -INF
    kept_mass = lps.exp().sum(-1)
    tail = torch.log((1 - kept_mass).clamp_min(0))
    if k == logits.shape[-1]:
        tail[:] = -INF
    return ids, lps.float(), tail.float()


def random_case(seed: int, k: int = K, keep: dict[int, int] | None = None, n: int = N, v: int = V):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, v, generator=g) * 2
    student = torch.randn(n, v, generator=g) * 2
    targets = torch.randint(0, v, (n,), generator=g)
    return (student, targets, *make_capture(teacher, k, keep))


def ref_temper(probs: list[float], t: float) -> list[float]:
    """b_j^(1/T) / sum_i b_i^(1/T): a distribution over buckets tempered as if each bucket were a token."""
    powered = [x ** (1 / t) if x > 0 else 0.0 for x in probs]
    s = sum(powered)
    return [x / s for x in powered]


def ref_buckets(student, ids, lps, tail, t: float):
    """Per row: teacher and student probabilities over {stored ids} + {rest}, each side bucketed at
    T=1 (plain sums of probabilities) and then tempered the same way."""
    out = []
    for r in range(student.shape[0]):
        stored = [(int(i), float(lp)) for i, lp in zip(ids[r], lps[r], strict=True) if lp > -INF]
        base = [math.exp(lp) for _, lp in stored] + [math.exp(float(tail[r]))]
        qf = ref_softmax(student[r].double().tolist())
        keep = {i for i, _ in stored}
        qt = [qf[i] for i, _ in stored] + [sum(x for j, x in enumerate(qf) if j not in keep)]
        out.append((ref_temper(base, t), ref_temper(qt, t)))
    return out


def kd(kind: str, params: dict, p, q):
    return divergence(p, q, LossConfig(kind=kind, **params))


# -- (a) k = V: the bucket loss is the dense full-vocabulary divergence ----------------------------


@pytest.mark.parametrize(("kind", "params"), KD_CASES, ids=KD_IDS)
@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 4.0])
def test_full_vocab_equals_dense_reference(kind, params, t):
    """k = V: Hinton's dense tempered KD, softmax(z / T) on both sides over the whole vocabulary."""
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(N, V, generator=g) * 2, torch.randn(N, V, generator=g) * 2
    ids, lps, tail = make_capture(teacher, V)
    p = teacher_bucket_logprobs(lps, tail, t)
    q = student_bucket_logprobs(student, ids, t)
    assert p.shape == q.shape == (N, V + 1)
    got = kd(kind, params, p, q)
    want = [
        ref_divergence(
            kind,
            ref_softmax(teacher[r].double().tolist(), t),
            ref_softmax(student[r].double().tolist(), t),
            **params,
        )
        for r in range(N)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-4, atol=1e-5)


# -- (b) k < V: the bucket loss is the dense divergence over {id_1..id_k, rest} --------------------


@pytest.mark.parametrize(("kind", "params"), KD_CASES, ids=KD_IDS)
@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_partition_equals_dense_reference(kind, params, t):
    # rows 2 and 5 kept fewer entries (padding id 0, -inf), row 7 kept none (tail = everything)
    student, targets, ids, lps, tail = random_case(2, keep={2: 3, 5: 1, 7: 0})
    cfg = LossConfig(kind=kind, temperature=t, **params)
    p = teacher_bucket_logprobs(lps, tail, t)
    q = student_bucket_logprobs(student, ids, t, valid=stored_slots(lps))
    want = [ref_divergence(kind, pt, qt, **params) for pt, qt in ref_buckets(student, ids, lps, tail, t)]
    want = torch.tensor(want, dtype=torch.float32)
    torch.testing.assert_close(divergence(p, q, cfg), want, rtol=1e-4, atol=1e-5)
    out = distill_loss(student, targets, ids, lps, tail, cfg)
    assert out["kd_sum"] == pytest.approx(t * t * float(want.sum()), rel=1e-4, abs=1e-5)
    assert float(out["loss_sum"].detach()) == pytest.approx(out["kd_sum"], rel=1e-6)


def test_bucket_partition_with_id_zero():
    """A padding id 0 never removes the real id 0's mass from the student's tail; a real id 0 is kept."""
    student = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[7, 3, 0, 0, 0], [0, 7, 3, 0, 0], [0, 0, 0, 0, 0]])
    lps = torch.tensor([[-1.0, -2.0, -INF, -INF, -INF], [-1.0, -2.0, -3.0, -INF, -INF], [-INF] * 5])
    q = student_bucket_logprobs(student, ids, valid=stored_slots(lps))
    full = torch.log_softmax(student, -1)
    torch.testing.assert_close(q.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(
        q[0, -1], torch.logsumexp(full[0, [i for i in range(V) if i not in (7, 3)]], 0)
    )
    torch.testing.assert_close(q[1, 0], full[1, 0])
    torch.testing.assert_close(
        q[1, -1], torch.logsumexp(full[1, [i for i in range(V) if i not in (0, 7, 3)]], 0)
    )
    assert q[2, -1] == 0.0 and (q[:, :5][~stored_slots(lps)] == -INF).all()


# -- teacher == student ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "params"), KD_CASES, ids=KD_IDS)
def test_zero_when_teacher_is_student(kind, params):
    student, targets, _, _, _ = random_case(4)
    ids, lps, tail = make_capture(student, K, keep={1: 2, 6: 0})
    cfg = LossConfig(kind=kind, **params)
    q = student_bucket_logprobs(student, ids, valid=stored_slots(lps))
    p = teacher_bucket_logprobs(lps, tail, vocab_size=V, tail_floor=cfg.tail_floor)
    torch.testing.assert_close(divergence(p, q, cfg), torch.zeros(N), rtol=0, atol=1e-6)
    # k = V: exact at any temperature
    ids_v, lps_v, tail_v = make_capture(student, V)
    cfg2 = LossConfig(kind=kind, temperature=2.0, **params)
    assert abs(distill_loss(student, targets, ids_v, lps_v, tail_v, cfg2)["kd_sum"]) < 1e-5
    # and a different student is penalised at every position with a stored entry (row 6 has only the tail)
    other = student + torch.randn(N, V, generator=torch.Generator().manual_seed(5))
    got = divergence(p, student_bucket_logprobs(other, ids, valid=stored_slots(lps)), cfg)
    assert (got[stored_slots(lps).any(-1)] > 1e-4).all() and abs(float(got[6])) < 1e-6


@pytest.mark.parametrize(("kind", "params"), KD_CASES, ids=KD_IDS)
@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 4.0])
def test_zero_at_every_temperature_when_teacher_is_student(kind, params, t):
    """k < V (V = 1000, k = 5, some rows padded): a student equal to the teacher is at zero loss and
    zero gradient at every T. Tempering the student over the vocabulary but the teacher over buckets
    left it ~0.8-2 nats/token off at T = 2-4."""
    n, v = 8, 1000
    logits = torch.randn(n, v, generator=torch.Generator().manual_seed(20)) * 2
    ids, lps, tail = make_capture(logits, K, keep={1: 2, 6: 0})
    z = logits.clone().requires_grad_(True)
    out = distill_loss(z, torch.zeros(n, dtype=torch.long), ids, lps, tail, LossConfig(kind, temperature=t, **params))
    assert abs(out["kd_sum"]) < 1e-6 * n
    out["loss_sum"].backward()
    if kind != "tvd":  # |p - q| has no gradient at 0: float noise picks a sign
        assert float(z.grad.abs().max()) < 1e-5
    # the T=1 bucket masses are what a fit moves towards: a student with the teacher's bucket masses but a
    # different shape inside the tail is also at zero, one with another tail mass is not
    tail_ids = torch.ones(n, v, dtype=torch.bool).scatter_(1, ids, False)
    tail_ids[[1, 6]] = True
    tail_ids[1].scatter_(0, ids[1, :2], False)
    reshaped = logits + torch.where(tail_ids, torch.randn(n, v, generator=torch.Generator().manual_seed(21)), 0.0)
    resc = torch.logsumexp(logits.masked_fill(~tail_ids, -INF), -1) - torch.logsumexp(
        reshaped.masked_fill(~tail_ids, -INF), -1)
    reshaped = torch.where(tail_ids, reshaped + resc[:, None], reshaped)
    cfg = LossConfig(kind, temperature=t, **params)
    assert abs(distill_loss(reshaped, torch.zeros(n, dtype=torch.long), ids, lps, tail, cfg)["kd_sum"]) < 1e-5 * n
    moved = torch.where(tail_ids, logits - 1.0, logits)
    assert distill_loss(moved, torch.zeros(n, dtype=torch.long), ids, lps, tail, cfg)["kd_sum"] > 1e-3


def test_ce_weight_one_ignores_an_infinite_kd_term():
    """ce_weight = 1 leaves the KD term out: an infinite rkl (empty teacher tail, no floor) must not give NaN."""
    student, targets, ids, lps, tail = random_case(18)
    tail[:] = -INF
    logits = student.clone().requires_grad_(True)
    out = distill_loss(logits, targets, ids, lps, tail, LossConfig(kind="rkl", tail_floor=0.0, ce_weight=1.0))
    assert out["kd_sum"] == INF
    assert float(out["loss_sum"].detach()) == pytest.approx(float(F.cross_entropy(student, targets, reduction="sum")))
    out["loss_sum"].backward()
    assert torch.isfinite(logits.grad).all()


# -- padding, infinities, gradients, dtypes -------------------------------------------------------


@pytest.mark.parametrize("kind", list(LOSSES))
def test_padding_and_edge_rows_give_finite_losses_and_gradients(kind):
    student, targets, ids, lps, tail = random_case(6, keep={0: 1, 3: 0, 4: 4})
    tail[8] = -INF  # a stored tail of exactly 0 (rounding): floored, so rkl stays finite
    logits = student.clone().requires_grad_(True)
    cfg = LossConfig(kind=kind, ce_weight=0.3 if kind != "ce" else 0.0, temperature=1.5)
    out = distill_loss(logits, targets, ids, lps, tail, cfg)
    out["loss_sum"].backward()
    assert math.isfinite(float(out["loss_sum"].detach())) and math.isfinite(out["kd_sum"])
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # k = V with the teacher's tail -inf: the tail bucket is empty on both sides
    ids_v, lps_v, tail_v = make_capture(torch.randn(N, V), V)
    logits.grad = None
    distill_loss(logits, targets, ids_v, lps_v, tail_v, cfg)["loss_sum"].backward()
    assert torch.isfinite(logits.grad).all()


def test_tail_floor():
    student, targets, ids, lps, tail = random_case(7)
    tail[:] = -INF
    assert math.isfinite(distill_loss(student, targets, ids, lps, tail, LossConfig(kind="rkl"))["kd_sum"])
    assert (
        distill_loss(student, targets, ids, lps, tail, LossConfig(kind="rkl", tail_floor=0.0))["kd_sum"]
        == INF
    )
    # an empty tail bucket (ids cover V) is -inf whatever the capture says
    p = teacher_bucket_logprobs(
        torch.log_softmax(torch.randn(2, 4), -1), torch.tensor([-3.0, 0.0]), vocab_size=4
    )
    assert (p[:, -1] == -INF).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_computed_in_float32(dtype):
    student, targets, ids, lps, tail = random_case(8, keep={2: 2})
    low = student.to(dtype).requires_grad_(True)
    assert student_bucket_logprobs(low, ids).dtype == torch.float32
    assert teacher_bucket_logprobs(lps.to(dtype), tail.to(dtype)).dtype == torch.float32
    for kind in LOSSES:
        cfg = LossConfig(kind=kind, ce_weight=0.5 if kind != "ce" else 0.0)
        out = distill_loss(low, targets, ids, lps, tail, cfg)
        ref = distill_loss(low.detach().float(), targets, ids, lps, tail, cfg)
        assert out["loss_sum"].dtype == torch.float32
        torch.testing.assert_close(out["loss_sum"], ref["loss_sum"], rtol=1e-6, atol=1e-5)
        low.grad = None
        out["loss_sum"].backward()
        assert low.grad.dtype == dtype and torch.isfinite(low.grad.float()).all()


# -- chunking, masks, sums ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fkl", "jsd", "srkl", "tvd", "ce"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_chunked_equals_unchunked(kind, use_mask):
    student, targets, ids, lps, tail = random_case(9, keep={1: 2, 10: 0})
    mask = torch.rand(N, generator=torch.Generator().manual_seed(9)) > 0.3 if use_mask else None
    cfg = LossConfig(kind=kind, ce_weight=0.2 if kind != "ce" else 0.0, temperature=2.0)
    results = []
    for chunk in (None, 1, 5, 100):
        logits = student.clone().requires_grad_(True)
        out = distill_loss(logits, targets, ids, lps, tail, cfg, mask=mask, chunk_size=chunk)
        out["loss_sum"].backward()
        results.append((out, logits.grad))
    (base, base_grad), *rest = results
    for out, grad in rest:
        assert out["count"] == base["count"] == (N if mask is None else int(mask.sum()))
        torch.testing.assert_close(out["loss_sum"], base["loss_sum"], rtol=1e-6, atol=1e-5)
        assert out["kd_sum"] == pytest.approx(base["kd_sum"], rel=1e-6, abs=1e-5)
        assert out["ce_sum"] == pytest.approx(base["ce_sum"], rel=1e-6, abs=1e-5)
        torch.testing.assert_close(grad, base_grad, rtol=1e-5, atol=1e-7)


def test_chunking_bounds_memory_kept_for_backward():
    """Chunks are recomputed in backward, so no [N, V] float32 temporaries wait for it."""
    student, targets, ids, lps, tail = random_case(17, n=48)
    logits = student.clone().requires_grad_(True)

    def saved_bytes(chunk):
        seen = {}

        def pack(x):
            if x.shape[-1:] == (V,) and x.data_ptr() != logits.data_ptr():  # [n, V] tensors only
                seen[x.data_ptr()] = x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = distill_loss(
                logits, targets, ids, lps, tail, LossConfig("jsd", ce_weight=0.5), chunk_size=chunk
            )
        out["loss_sum"].backward()
        return sum(seen.values())

    full = 48 * V * 4
    assert saved_bytes(None) > full  # unchunked: float32 copies of the logits are kept
    assert saved_bytes(4) == 0


def test_mask_equals_selecting_rows_and_ignores_garbage():
    student, targets, ids, lps, tail = random_case(10)
    mask = torch.ones(N, dtype=torch.bool)
    mask[[0, 4, 5]] = False
    student[0] = float("nan")  # masked-out rows may hold anything
    lps[4] = -INF
    tail[4] = -INF
    logits = student.clone().requires_grad_(True)
    cfg = LossConfig(kind="jsd")
    out = distill_loss(logits, targets, ids, lps, tail, cfg, mask=mask)
    out["loss_sum"].backward()
    ref = distill_loss(student[mask], targets[mask], ids[mask], lps[mask], tail[mask], cfg)
    assert out["count"] == 9
    torch.testing.assert_close(out["loss_sum"], ref["loss_sum"])
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()


def test_batch_8_equals_four_accumulated_batches_of_2():
    """Sum semantics: one batch of 8 sequences == 4 micro-batches of 2, each normalised by the step's count."""
    g = torch.Generator().manual_seed(11)
    n, d = 8 * 3, 16  # 8 sequences x 3 positions
    hidden = torch.randn(n, d, generator=g)
    student, targets, ids, lps, tail = random_case(11, n=n, keep={5: 2, 17: 0})
    mask = torch.rand(n, generator=g) > 0.4  # uneven unmasked counts per micro-batch
    cfg = LossConfig(kind="fkl", ce_weight=0.25, temperature=2.0)
    head = torch.randn(d, V, generator=g)

    def run(splits):
        w = head.clone().requires_grad_(True)
        n_total = int(mask.sum())
        total = 0.0
        for rows in splits:
            out = distill_loss(
                hidden[rows] @ w, targets[rows], ids[rows], lps[rows], tail[rows], cfg, mask=mask[rows]
            )
            (out["loss_sum"] / n_total).backward()
            total += float(out["loss_sum"].detach())
        return total, w.grad

    one_loss, one_grad = run([slice(0, n)])
    acc_loss, acc_grad = run([slice(s, s + 6) for s in range(0, n, 6)])
    assert acc_loss == pytest.approx(one_loss, rel=1e-6)
    torch.testing.assert_close(acc_grad, one_grad, rtol=1e-5, atol=1e-7)


def test_empty_input_gives_zero_that_backpropagates():
    student, targets, ids, lps, tail = random_case(12)
    logits = student.clone().requires_grad_(True)
    out = distill_loss(logits, targets, ids, lps, tail, LossConfig(), mask=torch.zeros(N, dtype=torch.bool))
    assert (
        out["count"] == 0 and float(out["loss_sum"].detach()) == 0.0 and out["kd_sum"] == out["ce_sum"] == 0.0
    )
    out["loss_sum"].backward()
    assert (logits.grad == 0).all()


# -- CE, mixing, temperature ----------------------------------------------------------------------


def test_ce_matches_torch_and_text_only_falls_back_to_ce():
    student, targets, ids, lps, tail = random_case(13)
    torch.testing.assert_close(ce_loss(student, targets), F.cross_entropy(student, targets, reduction="none"))
    want = float(F.cross_entropy(student, targets, reduction="sum"))
    out = distill_loss(student, targets, ids, lps, tail, LossConfig(kind="ce"))
    assert float(out["loss_sum"].detach()) == pytest.approx(want, rel=1e-6) and out["kd_sum"] == 0.0
    text_only = distill_loss(student, targets, None, None, None, LossConfig(kind="rkl", ce_weight=0.3))
    assert float(text_only["loss_sum"].detach()) == pytest.approx(want, rel=1e-6) and text_only[
        "ce_sum"
    ] == pytest.approx(want)


def test_ce_weight_mix_is_the_weighted_sum():
    student, targets, ids, lps, tail = random_case(14, keep={3: 1})
    grads = {}
    for name, cfg in [
        ("kd", LossConfig("srkl", ce_weight=0.0)),
        ("ce", LossConfig("ce")),
        ("mix", LossConfig("srkl", ce_weight=0.3)),
    ]:
        logits = student.clone().requires_grad_(True)
        out = distill_loss(logits, targets, ids, lps, tail, cfg)
        out["loss_sum"].backward()
        grads[name] = (out, logits.grad)
    (kd_out, kd_grad), (ce_out, ce_grad), (mix_out, mix_grad) = grads["kd"], grads["ce"], grads["mix"]
    assert float(mix_out["loss_sum"].detach()) == pytest.approx(
        0.7 * kd_out["kd_sum"] + 0.3 * ce_out["ce_sum"], rel=1e-6
    )
    assert mix_out["kd_sum"] == pytest.approx(kd_out["kd_sum"]) and mix_out["ce_sum"] == pytest.approx(
        ce_out["ce_sum"]
    )
    assert kd_out["ce_sum"] == pytest.approx(ce_out["ce_sum"])  # CE is logged even when not trained on
    torch.testing.assert_close(mix_grad, 0.7 * kd_grad + 0.3 * ce_grad)
    all_ce = distill_loss(student, targets, ids, lps, tail, LossConfig("fkl", ce_weight=1.0))
    assert float(all_ce["loss_sum"]) == pytest.approx(ce_out["ce_sum"], rel=1e-6)


def test_temperature_and_t2_scaling():
    student, targets, ids, lps, tail = random_case(15)
    args = (student, targets, ids, lps, tail)
    t1 = distill_loss(*args, LossConfig("fkl"))["kd_sum"]
    assert t1 == pytest.approx(distill_loss(*args, LossConfig("fkl", scale_t2=False))["kd_sum"], rel=1e-7)
    t2 = distill_loss(*args, LossConfig("fkl", temperature=2.0))["kd_sum"]
    t2_raw = distill_loss(*args, LossConfig("fkl", temperature=2.0, scale_t2=False))["kd_sum"]
    assert t2 == pytest.approx(4.0 * t2_raw, rel=1e-6)
    assert t2_raw < t1  # softer distributions are closer
    # a higher temperature flattens both sides' buckets towards uniform
    q_hot = student_bucket_logprobs(student, ids, temperature=100.0)
    assert float((q_hot.exp() - 1 / (K + 1)).abs().max()) < float(
        (student_bucket_logprobs(student, ids).exp() - 1 / (K + 1)).abs().max()
    )


def test_jsd_and_skew_end_points():
    student, _, ids, lps, tail = random_case(16, keep={0: 2})
    p = teacher_bucket_logprobs(lps, tail)
    q = student_bucket_logprobs(student, ids, valid=stored_slots(lps))
    fkl, rkl = forward_kl(p, q), reverse_kl(p, q)
    torch.testing.assert_close(jsd(p, q, 0.0), fkl)
    torch.testing.assert_close(jsd(p, q, 1.0), rkl)
    torch.testing.assert_close(skew_kl(p, q, 0.0), fkl)
    torch.testing.assert_close(skew_rkl(p, q, 0.0), rkl)
    torch.testing.assert_close(skew_kl(p, q, 1.0), torch.zeros(N), atol=1e-6, rtol=0)
    # the formula's own limits: jsd / beta -> fkl, jsd / (1 - beta) -> rkl
    torch.testing.assert_close(jsd(p, q, 1e-4) / 1e-4, fkl, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(jsd(p, q, 1 - 1e-4) / 1e-4, rkl, rtol=2e-2, atol=1e-4)
    assert float(jsd(p, q, 0.5).max()) <= math.log(2) + 1e-6
    with pytest.raises(ValueError, match="beta"):
        jsd(p, q, 1.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "kl"}, "kind"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": INF}, "temperature"),
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.1}, "beta"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"ce_weight": -0.1}, "ce_weight"),
        ({"ce_weight": 1.5}, "ce_weight"),
        ({"scale_t2": "yes"}, "scale_t2"),
        ({"tail_floor": 1.0}, "tail_floor"),
        ({"tail_floor": -1e-6}, "tail_floor"),
    ],
)
def test_loss_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_loss_config_accepts_end_points():
    for kind in LOSSES:
        LossConfig(
            kind=kind, beta=0.0, alpha=0.0, ce_weight=1.0, temperature=0.5, scale_t2=False, tail_floor=0.0
        )
    LossConfig(kind="jsd", beta=1.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="not a divergence"):
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), LossConfig(kind="ce"))
