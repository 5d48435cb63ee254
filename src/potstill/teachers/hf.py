"""Local transformers teacher: the batched engine (potstill.lm.engine) plus what makes it a teacher.

`HFTeacher.load(spec)` accepts "embedded" (or "embedded:gemma3-270m"), a model directory (safetensors)
or a `.gguf` file (converted once and cached, see potstill.lm.embedded). Decoding, sampling and teacher forcing are
the engine's; a teacher adds loading from a spec, its identity for the capture manifest and
chat-message prompts.

    teacher = HFTeacher.load("embedded")
    out = teacher.complete([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=16))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from potstill.lm.embedded import embedded_model, is_embedded
from potstill.lm.engine import Engine, timed  # noqa: F401  (re-exported)
from potstill.lm.loading import cpu_has_bf16 as _cpu_has_bf16  # noqa: F401  (re-exported, old name)
from potstill.lm.loading import pick_dtype, resolve_model_dir  # noqa: F401  (re-exported)
from potstill.lm.sampling import SAMPLE_TOP  # noqa: F401  (re-exported)
from potstill.lm.tokens import chat_ids, pad_token_id, row_seed, tokenizer_hash  # noqa: F401  (re-exported)
from potstill.lm.types import Completion, LogitsProcessor, SamplingParams
from potstill.utils import sha256_file, sha256_text


class HFTeacher(Engine):
    """A local causal LM that answers prompts with completions and top-k log-probs."""

    local_ids = True  # decodes token ids itself: complete_ids, encode_chat, EOS kept in completions
    can_score = True  # teacher forcing: score_ids
    licence: str | None = None  # set for an embedded model whose terms reach its derivatives (Gemma)

    def __init__(self, model, tokenizer, name: str, model_dir: Path | None = None):
        super().__init__(model, tokenizer, name)
        self.model_dir = model_dir

    @classmethod
    def load(cls, spec: str, dtype: str = "float32", device: str | None = None) -> HFTeacher:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = resolve_model_dir(spec)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pick_dtype(dtype)).to(device)
        name = embedded_model(spec).name if is_embedded(spec) else Path(spec).name
        teacher = cls(model, tok, name=name, model_dir=model_dir)
        if is_embedded(spec) and embedded_model(spec).notice:  # its terms follow what is distilled from it
            teacher.licence = embedded_model(spec).licence
        return teacher

    # ---- identity -------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        weights = None
        if self.model_dir is not None:
            files = sorted(Path(self.model_dir).glob("*.safetensors"))
            weights = sha256_text("".join(sha256_file(f) for f in files)) if files else None
        vocab = self.tokenizer.get_vocab()
        return {
            "name": self.name,
            "backend": "hf",
            "weights_sha256": weights,
            "tokenizer_sha256": tokenizer_hash(self.tokenizer),
            "chat_template_sha256": sha256_text(self.tokenizer.chat_template or ""),
            "vocab_size": max(len(vocab), self.model.config.vocab_size),
            **({"licence": self.licence} if self.licence else {}),
            **({"quantize": self.quantized["mode"]} if self.quantized else {}),  # int8 rows are not fp32 rows
        }

    def complete(
        self,
        prompts: list[list[dict]],
        params: SamplingParams,
        seeds: list[int] | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> list[Completion]:
        return self.complete_ids([self.encode_chat(m) for m in prompts], params, seeds, logits_processor)
