"""evaluate/metrics.py: top-1 agreement ignores rows with no stored entry, reference answers end with the chat
template's end-of-turn, generation speed decodes a fixed number of tokens per prompt. Tiny models, seconds."""

from __future__ import annotations

import numpy as np
import torch

from potstill.capture.generate import end_of_turn_ids
from potstill.capture.prompts import Prompt
from potstill.evaluate import notes
from potstill.evaluate.metrics import fidelity, generation_speed, reference_examples
from potstill.train.data import Example
from tests.tiny import make_tiny_model, make_tiny_tokenizer


def _always_zero(tokenizer):
    """A tiny model whose logits are all 0: argmax (and greedy decoding) is always id 0."""
    model = make_tiny_model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_top1_agreement_skips_rows_without_stored_entries():
    tok = make_tiny_tokenizer()
    model = _always_zero(tok)
    k, inf = 3, float("-inf")
    ids = np.array([[5, 6, 7], [0, 0, 0], [0, 0, 0], [5, 6, 7]])  # rows 1 and 2: nothing stored (padding id 0)
    lps = np.array([[-0.5, -1.5, -2.5], [inf] * k, [inf] * k, [-0.5, -1.5, -2.5]], dtype=np.float32)
    tail = np.log1p(-np.exp(lps.astype(np.float64)).sum(1)).astype(np.float32)
    tail[[1, 2]] = 0.0
    ex = Example(np.arange(10, 16, dtype=np.int64), 2, ids, lps, tail)
    out = fidelity(model, [ex], pad_id=0)
    assert out["top1_agreement"] == 0.0  # the model says 0 everywhere; the teacher's top-1 is 5 where it has one
    stored = Example(ex.input_ids, 2, np.array([[0, 6, 7]] * 4), np.tile(lps[:1], (4, 1)), np.tile(tail[:1], 4))
    assert fidelity(model, [stored], pad_id=0)["top1_agreement"] == 1.0  # a real stored id 0 still counts


def test_reference_answers_end_with_the_templates_end_of_turn():
    """A tokenizer whose eos_token (<|endoftext|>) is not the template's end of turn (<|im_end|>)."""
    tok = make_tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != im_end
    prompts = [Prompt([{"role": "user", "content": "Say hi."}], reference="hi there")]
    [ex] = reference_examples(tok, prompts, end_of_turn_ids(tok))
    answer = ex.input_ids[ex.prompt_len :].tolist()
    assert answer[-1] == im_end and tok.eos_token_id not in answer
    assert tok.decode(answer[:-1]) == "hi there"


def test_generation_speed_decodes_a_fixed_number_of_tokens_per_prompt():
    tok = make_tiny_tokenizer()
    model = _always_zero(tok)
    model.generation_config.eos_token_id = 0  # every greedy step would stop at once
    prompts = [Prompt([{"role": "user", "content": f"Count to {i}."}]) for i in range(5)]
    out = generation_speed(model, tok, prompts, n_prompts=5, max_new_tokens=7, batch_size=2)
    assert out["gen_tokens"] == 35 and out["gen_tokens_per_s"] > 0
    note = notes([{"gen_prompts": 5, "gen_new_tokens_per_prompt": 7, "gen_batch_size": 2}])
    assert "lower bound" in note and "7 new tokens each (EOS ignored)" in note


def test_report_eval_table_states_that_the_bucket_kl_is_a_lower_bound():
    """The HTML report's eval table carries the same caveat as eval.md, under the table."""
    from potstill.evaluate.metrics import KL_NOTE
    from potstill.evaluate.report_html import eval_table

    html = eval_table("run", [{"model": "teacher", "kl": 0.0}, {"model": "student", "kl": 0.12}])
    assert "lower bound on the token-level KL" in KL_NOTE and "k and codec" in KL_NOTE
    assert KL_NOTE.split(":")[1].strip()[:40] in html and html.index("lower bound") > html.index("</table>")
