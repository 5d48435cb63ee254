"""Text-only distillers: the green-mass statistic catches a ce student the argmax count barely sees,
and its null holds on wrong keys, a never-trained model, a model of unwatermarked text and the
unwatermarked teacher.

Tokenizer-free: a tiny random llama over 256 ids plays the watermarked teacher; students of the same
shape are fit by a few steps of plain cross-entropy on its samples (text only, no log-probs).
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from potstill.guard.greenmass import (
    GreenMassConfig,
    argmax_score,
    detect_model_mass,
    normal_logsf,
    null_key,
    null_zs,
    score_table,
    suspect_table,
)
from potstill.guard.watermark import Watermark, WatermarkConfig
from tests.detect_fixtures import tiny_llama as tiny_llama_v
from tests.guard_fixtures import one_torch_thread, wm_key

V = 256
KEY = wm_key("greenmass-secret")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def tiny_llama(seed: int):
    return tiny_llama_v(seed, vocab=V)


@torch.no_grad()
def sample(model, wm: Watermark | None, n: int, length: int, seed: int) -> list[list[int]]:
    """n sequences from a random first token, through the watermark processor when given (KV cache)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, 1), generator=g)
    x, past = ids, None
    for _ in range(length - 1):
        out = model(input_ids=x, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
        if wm is not None:
            logits = wm.logits_processor(ids.tolist(), logits)
        x = torch.multinomial(logits.softmax(-1), 1, generator=g)
        ids = torch.cat([ids, x], dim=1)
    return ids.tolist()


def ce_student(data: list[list[int]], steps: int, seed: int = 1):
    """A fresh tiny llama fit by plain cross-entropy on the sequences (text only)."""
    model = tiny_llama(seed).train()
    t = torch.tensor(data)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = t[torch.randint(0, len(t), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def cfg():
    return WatermarkConfig(key=KEY, vocab_size=V)


@pytest.fixture(scope="module")
def world(cfg):
    teacher = tiny_llama(0)
    served = sample(teacher, Watermark(cfg), n=48, length=40, seed=0)  # what the distiller collected
    clean = sample(teacher, None, n=48, length=40, seed=1)
    probes = served[:16]  # the owner scores a few served answers (its query log)
    return types.SimpleNamespace(teacher=teacher, served=served, clean=clean, probes=probes,
                                 student=ce_student(served, steps=3))


def test_text_only_student_caught_where_argmax_is_weaker(cfg, world):
    """Both statistics of the suspect's distribution convict a 3-step ce student; on these flat tiny
    models the logit statistic is the strong one (on the embedded teacher's students the mass one is:
    README, `potstill study detect-power`), far beyond the argmax count on the same positions."""
    table = suspect_table(world.student, None, world.probes, cfg)
    old = argmax_score(table, cfg)
    mass = score_table(table, cfg, GreenMassConfig())
    logit = score_table(table, cfg, GreenMassConfig(statistic="logit"))
    print("argmax:", old.p_value, "\nmass:", mass.summary(), "\nlogit:", logit.summary())
    assert mass.p_value < 1e-6 and logit.p_value < 1e-6
    assert logit.log10_p < old.log10_p - 5 and logit.p_rank == pytest.approx(1 / 201)
    assert mass.green_mass > cfg.gamma and mass.contexts > 100 and mass.positions == 16 * 40
    d = mass.to_dict()
    assert cfg.check_fingerprint(d["key_fingerprint"]) and KEY not in repr(d) and d["null_keys"] == 200


def test_null_controls_uniform(cfg, world):
    """20 null controls: 17 wrong keys on the student, a never-trained model, a ce student of the
    teacher's unwatermarked text and the unwatermarked teacher, under our key: none below 0.01."""
    gm = GreenMassConfig()
    table = suspect_table(world.student, None, world.probes, cfg)
    nulls = null_zs(table, cfg, gm)
    ps = [score_table(table, WatermarkConfig(key=null_key(10**6 + i), vocab_size=V), gm, nulls).p_value
          for i in range(17)]
    for model in (tiny_llama(7), ce_student(world.clean, steps=3), world.teacher):
        ps.append(detect_model_mass(model, None, world.probes, cfg, gm).p_value)
    print(sorted(ps))
    assert len(ps) == 20 and min(ps) > 0.01
    assert sum(p > 0.5 for p in ps) >= 5  # spread over (0, 1), not piled up at 1 (a test that cannot fire)


@pytest.mark.parametrize("statistic", ["mass", "logit"])
def test_random_key_z_is_standard_normal(cfg, world, statistic):
    """KS check of the analytic null: 300 random keys' z on the watermarked student's table ~ N(0, 1)."""
    table = suspect_table(world.student, None, world.probes, cfg)
    zs = sorted(null_zs(table, cfg, GreenMassConfig(statistic=statistic, null_keys=300)))
    n = len(zs)
    cdf = [1 - math.exp(normal_logsf(z)) for z in zs]
    ks = max(max((i + 1) / n - c, c - i / n) for i, c in enumerate(cdf))
    assert ks < 1.36 / math.sqrt(n), ks  # 5% critical value
    mean = sum(zs) / n
    assert abs(mean) < 0.25 and 0.8 < (sum((z - mean) ** 2 for z in zs) / (n - 1)) ** 0.5 < 1.2


def test_selfhash_and_logit_statistic(world):
    """The pair bookkeeping also holds when contexts share coins (Min-SelfHash), for both statistics."""
    cfg = WatermarkConfig(key=KEY, vocab_size=V, self_hash=True)
    served = sample(world.teacher, Watermark(cfg), n=48, length=40, seed=2)
    student = ce_student(served, steps=4)
    for stat in ("mass", "logit"):
        gm = GreenMassConfig(statistic=stat, null_keys=100)
        hit = detect_model_mass(student, None, served[:8], cfg, gm)
        null = detect_model_mass(tiny_llama(7), None, served[:8], cfg, gm)
        assert hit.p_value < 1e-6 and hit.pairs < hit.positions * 64, hit.summary()
        assert null.p_value > 0.01 and 0.8 < null.null_sd < 1.25, null.summary()


class CopyModel(torch.nn.Module):
    """Never trained: predicts the token that followed the last earlier occurrence of the current one
    (uniform where the current token is new)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, V)
        for i in range(b):
            row, last = input_ids[i].tolist(), {}
            for t, tok in enumerate(row):
                if tok in last:
                    logits[i, t, row[last[tok] + 1]] = 8.0
                last[tok] = t
        return types.SimpleNamespace(logits=logits)


def test_copying_watermarked_input_is_not_evidence(cfg, world):
    gm = GreenMassConfig(null_keys=100)
    long = sample(world.teacher, Watermark(cfg), n=8, length=120, seed=3)  # tokens recur: a copier has work
    naive = score_table(suspect_table(CopyModel(), None, long, cfg, exclude_input_pairs=False), cfg, gm)
    assert naive.p_value < 1e-6  # why the filter exists: copies of green pairs look radioactive
    table = suspect_table(CopyModel(), None, long, cfg)
    res = score_table(table, cfg, gm)
    assert table.input_pairs_skipped > 0 and res.p_value > 0.01


def test_normal_tail_and_bad_config():
    assert math.exp(normal_logsf(0.0)) == pytest.approx(0.5)
    assert normal_logsf(40.0) == pytest.approx(-40**2 / 2 - math.log(40 * math.sqrt(2 * math.pi)), abs=1e-3)
    assert normal_logsf(36.9) > normal_logsf(37.1) > normal_logsf(50)
    from potstill.errors import PotstillError

    with pytest.raises(PotstillError, match="statistic"):
        GreenMassConfig(statistic="median")


def test_potstill_detect_cli_reports_statistic_null_and_controls(tmp_path, tiny_model_dir, prompts_file, monkeypatch):
    """`potstill detect` on open weights: the green-mass statistic by default, its random-key null and
    the reference models' results in the JSON; `--statistic argmax` keeps the older count."""
    from click.testing import CliRunner

    from potstill.cli import app
    from tests.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_model

    tok = make_tiny_tokenizer()
    control = save_tiny_model(tmp_path / "control", make_tiny_model(tok, seed=3), tok)
    monkeypatch.setenv("POTSTILL_WATERMARK_KEY", KEY)
    out = tmp_path / "d.json"
    args = ["detect", "--suspect", str(tiny_model_dir), "--prompts", str(prompts_file), "--max-tokens", "60",
            "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--null-keys", "30", "--controls", str(control)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["statistic"] == "mass" and d["null_keys"] == 30 and 0 < d["positions"] <= 60 and d["contexts"] > 0
    assert 0 < d["p_value"] <= 1 and 0 < d["p_rank"] <= 1 and len(d["controls"]) == 1
    assert d["controls"][0]["model"] == str(control) and d["controls"][0]["p_value"] > 0.01
    assert "control" in res.output and "random keys" in res.output
    res = CliRunner().invoke(app, [*args, "--statistic", "argmax"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["tokens_scored"] <= 60
    bad = CliRunner().invoke(app, [*args, "--statistic", "median"])
    assert bad.exit_code != 0 and "statistic" in bad.output
