"""Attack 7 (issue 14): reading the watermark's green lists off the served top_logprobs.

The attacker knows the public weights the server runs. It asks `/v1/completions` for one token
with `logprobs=20` after prompts of its choice (token ids), recomputes the public log-probs of
the same prompt, and reads each returned id's green bit from the difference (0 or delta, up to
a shared offset). With log-probs reported after the green-list bias, a handful of queries give
every bit exactly; the protection must leave the attacker no better than a guess (the served text
stays watermarked under the key: tests/test_serve.py::test_watermark_is_applied, same default policy).
"""

from __future__ import annotations

import httpx
import pytest
import torch

from potstill.bench.steal_attack import bits_from_logprobs
from potstill.guard.openai_api import TokenText
from potstill.guard.watermark import Watermark, WatermarkConfig
from tests.guard_fixtures import live_server, one_torch_thread, wm_key
from tests.tiny import make_tiny_model, make_tiny_tokenizer

N_QUERIES, K = 8, 20


@pytest.fixture(scope="module")
def teacher():
    from potstill.teachers.hf import HFTeacher

    with one_torch_thread():
        tok = make_tiny_tokenizer()
        yield HFTeacher(make_tiny_model(tok, seed=3, init=0.15), tok, name="tiny")


@pytest.fixture(scope="module")
def wm_cfg(teacher):
    # today's scheme: h = 1 LeftHash, default gamma and delta
    return WatermarkConfig(key=wm_key("steal"), vocab_size=len(teacher.tokenizer))


@pytest.fixture(scope="module")
def server(teacher, wm_cfg, tmp_path_factory):
    with live_server(teacher, tmp_path_factory.mktemp("steal"), watermark=wm_cfg) as srv:
        yield srv, srv.keys.create("attacker", max_top_logprobs=None)[1]


def text_to_id(teacher) -> dict[str, int]:
    """The attacker's map from a returned token string to its id (strings that are unique only)."""
    tt, seen = TokenText(teacher.tokenizer), {}
    for i in range(len(teacher.tokenizer)):
        seen.setdefault(tt.text(i), []).append(i)
    return {s: ids[0] for s, ids in seen.items() if len(ids) == 1}


def attacker_prompts(teacher, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    specials = set(teacher.tokenizer.all_special_ids)
    ids = [i for i in range(len(teacher.tokenizer)) if i not in specials]
    return [[ids[j] for j in torch.randint(0, len(ids), (6,), generator=g).tolist()] for _ in range(n)]


@torch.no_grad()
def public_logprobs(teacher, prompt: list[int]) -> torch.Tensor:
    return torch.log_softmax(teacher.model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)


def steal(server, teacher, prompts) -> list[tuple[list[int], list[int], list[bool] | None]]:
    """(prompt, returned ids, estimated green bits or None) per query."""
    srv, secret = server
    lookup, out = text_to_id(teacher), []
    for s, prompt in enumerate(prompts):
        r = httpx.post(srv.base + "/completions", headers={"Authorization": f"Bearer {secret}"}, timeout=60,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "logprobs": K, "seed": s})
        assert r.status_code == 200, r.text
        top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        pairs = [(lookup[t], lp) for t, lp in top.items() if t in lookup]
        ids, lps = [p[0] for p in pairs], [p[1] for p in pairs]
        out.append((prompt, ids, bits_from_logprobs(ids, lps, public_logprobs(teacher, prompt))))
    return out


def test_top_logprobs_do_not_give_away_the_green_list(server, teacher, wm_cfg):
    wm = Watermark(wm_cfg)
    claimed = right = seen = 0
    for prompt, ids, bits in steal(server, teacher, attacker_prompts(teacher, N_QUERIES)):
        seen += len(ids)
        if bits is None:
            continue
        for t, b in zip(ids, bits, strict=True):
            claimed += 1
            right += b == wm.is_green(prompt, t)
    assert seen >= 60  # returned ids whose string names one id (byte pieces of UTF-8 characters collide)
    # unprotected (bias applied before the reported log-probs): 160 of 160 bits exact.
    # Independent lists agree on gamma^2 + (1-gamma)^2 = 62.5% of ids; 0.8 is > 4 sd above that.
    assert claimed == 0 or right / claimed < 0.8, f"attacker read {right}/{claimed} green bits off {N_QUERIES} queries"


@pytest.mark.parametrize("policy", ["biased", "unbiased", "decoy"])
def test_served_logprobs_policy(teacher, wm_cfg, policy):
    """What the engine reports per policy; sampling (and so the text's mark) is the same for all three."""
    from dataclasses import replace

    from potstill.teachers.base import SamplingParams

    wm = Watermark(replace(wm_cfg, served_logprobs=policy))
    prompt = attacker_prompts(teacher, 1)[0]
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_logprobs=K)
    c = teacher.complete_ids([prompt], params, [5], logits_processor=wm.logits_processor,
                             report_processor=wm.report_processor())[0]
    raw = teacher.model(input_ids=torch.tensor([prompt])).logits[0, -1].float().detach()
    shown = {"biased": wm.logits_processor([prompt], raw[None])[0], "unbiased": raw,
             "decoy": Watermark(wm_cfg.logprob_config()).logits_processor([prompt], raw[None])[0]}[policy]
    expect = torch.log_softmax(shown, -1)
    assert torch.allclose(torch.as_tensor(c.topk_logprobs[0]), expect[torch.as_tensor(c.topk_ids[0])], atol=1e-4)
    assert c.sampled_logprob[0] == pytest.approx(float(expect[c.completion_ids[0]]), abs=1e-4)
    same = teacher.complete_ids([prompt], params, [5], logits_processor=wm.logits_processor)[0]
    assert same.completion_ids == c.completion_ids


def test_decoy_key_is_derived_and_recorded(wm_cfg, server):
    from potstill.guard.querylog import server_config

    decoy = wm_cfg.logprob_config()
    assert decoy.key != wm_cfg.key and len(decoy.key) == 64 and wm_cfg.key not in repr(decoy)
    assert [c.key for c in wm_cfg.detection_configs()] == [wm_cfg.key, decoy.key]
    pub = wm_cfg.public_dict()
    assert pub["served_logprobs"] == "decoy" and decoy.check_fingerprint(pub["logprob_key_fingerprint"])
    srv, _ = server
    recorded = server_config(srv.querylog_url)["watermark"]
    assert recorded["served_logprobs"] == "decoy" and recorded["context_width"] == 1
    assert recorded["scheme"] == "kgw-lefthash" and wm_cfg.check_fingerprint(recorded["key_fingerprint"])


def test_detection_settings_checked_against_the_log(wm_cfg, server):
    from dataclasses import replace

    from potstill.errors import PotstillError
    from potstill.guard.detect_keys import align_with_log

    url = server[0].querylog_url
    aligned, notes = align_with_log(replace(wm_cfg, served_logprobs="biased"), url)
    assert aligned.served_logprobs == "decoy" and notes == []
    with pytest.raises(PotstillError, match="context_width"):
        align_with_log(replace(wm_cfg, context_width=2), url)
    _, notes = align_with_log(replace(wm_cfg, key=wm_key("another")), url)
    assert notes and "fingerprint" in notes[0]


def test_fkl_student_of_decoy_logprobs_is_detected():
    """A student fit to the served (decoy-biased) distribution carries the decoy mark: `detect` finds it
    (Bonferroni over the two keys); a never-trained model does not trip it."""
    from potstill.guard.detect_keys import detect_model_keys
    from tests.detect_fixtures import V, random_sequences, tiny_llama

    cfg = WatermarkConfig(key=wm_key("decoy-fkl"), vocab_size=V)
    decoy = Watermark(cfg.logprob_config())
    teacher, student = tiny_llama(0), tiny_llama(1).train()
    data = torch.tensor(random_sequences(32, 24, seed=2))
    with torch.no_grad():
        logits = teacher(input_ids=data).logits.float()
        served = torch.log_softmax(decoy.logits_processor(
            [row[: t + 1] for row in data.tolist() for t in range(data.shape[1])], logits.reshape(-1, V)), -1)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for step in range(80):
        b = torch.arange(step % 2 * 16, step % 2 * 16 + 16)
        lq = torch.log_softmax(student(input_ids=data[b]).logits.float(), -1).reshape(-1, V)
        lp = served.reshape(32, -1, V)[b].reshape(-1, V)
        loss = (lp.exp() * (lp - lq)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    probes = random_sequences(64, 48, seed=3)
    res = detect_model_keys(student.eval(), None, probes, cfg)
    print(res.summary())
    assert res.p_value < 1e-6 and "best of 2 keys" in res.mode
    assert detect_model_keys(tiny_llama(5), None, probes, cfg).p_value > 0.01


def test_bench_steal_measures_the_protection(tmp_path):
    """`potstill bench steal` at toy scale: the log-prob reader is exact against 'biased', misled by 'decoy'."""
    import json

    from potstill.bench.steal import StealBenchConfig, bench_steal

    out = tmp_path / "steal.json"
    cfg = StealBenchConfig(configs="h1-lefthash/biased,h1-lefthash/decoy", max_queries=400, vocab=64,
                           distiller_completions=16, completion_tokens=16, students=False, out=str(out))
    with one_torch_thread():
        res = bench_steal(cfg, log=lambda m: None)
    assert json.loads(out.read_text())["configs"].keys() == res["configs"].keys()
    assert (tmp_path / "steal.md").read_text().count("| h1-lefthash/") == 4
    biased = res["configs"]["h1-lefthash/biased"]["attack"]["attackers"]["reads log-probs"]["curve"][-1]
    decoy = res["configs"]["h1-lefthash/decoy"]["attack"]["attackers"]["reads log-probs"]["curve"][-1]
    assert biased["queries"] == 400 and biased["precision"] > 0.97 and biased["recovered"] > 0.5
    assert decoy["precision"] < 0.8
