"""Anti-distillation sampling served over real HTTP, beside the watermark: both tilts in one sampler,
the watermark still detected, and the returned top_logprobs are the tilted distribution's."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest

from potstill.config import AntidistillConfig
from potstill.guard.watermark import Watermark, WatermarkConfig, detect_ids
from potstill.lm.sampling import chain_processors
from potstill.lm.types import SamplingParams
from tests.guard_fixtures import WATERMARK_KEY, live_server, one_torch_thread, tiny_teacher
from tests.pipeline_fixtures import PROMPTS
from tests.tiny import make_tiny_model, save_tiny_model

LAMBDA = 3.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("antidistill-serve")
    with one_torch_thread():
        teacher = tiny_teacher()
        save_tiny_model(tmp / "proxy", make_tiny_model(teacher.tokenizer, layers=1, seed=1, init=0.3), teacher.tokenizer)
        (tmp / "protect.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
        ad = AntidistillConfig(antidistill=LAMBDA, proxy=str(tmp / "proxy"), protect=str(tmp / "protect.jsonl"))
        wm = WatermarkConfig(key=WATERMARK_KEY, gamma=0.25, delta=4.0, vocab_size=len(teacher.tokenizer))
        with live_server(teacher, tmp, watermark=wm, antidistill=ad, max_tokens_cap=64) as srv:
            secret = srv.keys.create("tester", max_top_logprobs=None)[1]
            yield teacher, ad, wm, srv, openai.OpenAI(base_url=srv.base, api_key=secret, max_retries=0, timeout=60)


def test_watermark_still_detected_under_the_tilt(setup):
    teacher, _, wm, _, client = setup
    texts = [client.completions.create(model="tiny", prompt="The", max_tokens=32, seed=100 + s).choices[0].text
             for s in range(8)]
    ids = [teacher.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    score = detect_ids(ids, wm)
    assert score.tokens_scored > 50 and score.p_value < 1e-6


def test_top_logprobs_are_the_tilted_distributions(setup):
    """The first token's returned top-5 equal teacher + lambda * Delta + the served watermark bias (the decoy key's
    under the default served-log-prob policy) computed here, not the clean ones."""
    from potstill.guard.antidistill import AntidistillProcessor

    teacher, ad, wm, _, client = setup
    got = client.completions.create(model="tiny", prompt="The", max_tokens=1, logprobs=5, seed=3).choices[0]
    served = {t.strip(): v for t, v in got.logprobs.top_logprobs[0].items()}
    ids = [list(teacher.tokenizer("The")["input_ids"])]
    params = SamplingParams(max_new_tokens=1, top_logprobs=5, seed=3)
    with one_torch_thread():
        tilt = AntidistillProcessor.load(ad, teacher)
        report = Watermark(wm).report_processor()
        tilted = teacher.complete_ids(ids, params, logits_processor=chain_processors(tilt, report))[0]
        clean = teacher.complete_ids(ids, params, logits_processor=report)[0]

    def as_dict(c):
        return {teacher.tokenizer.decode([int(i)]).strip(): float(v) for i, v in zip(c.topk_ids[0], c.topk_logprobs[0], strict=True)}

    want, plain = as_dict(tilted), as_dict(clean)
    common = sorted(set(served) & set(want))
    assert len(common) >= 3
    assert np.allclose([served[k] for k in common], [want[k] for k in common], atol=2e-3)
    shared = sorted(set(served) & set(plain))
    assert served != plain and (not shared or max(abs(served[k] - plain[k]) for k in shared) > 0.05)
