"""Settings of the benchmarks whose modules import torch, declared apart so `potstill --help` stays light.

Decoding settings are GenerateConfig's (same defaults unless a field states the bench's own choice).
"""

from __future__ import annotations

from dataclasses import dataclass

from potstill.config import GenerateConfig, derive, opt


@dataclass
class BenchDecodeConfig:
    """What every decoding bench takes: a local model, prompts, a completion length, a dtype."""

    teacher: str = derive(GenerateConfig, "teacher", note="A local one: the bench decodes it in-process.")
    prompts: str = derive(GenerateConfig, "prompts", "builtin:seed_tasks")
    max_new_tokens: int = derive(GenerateConfig, "max_new_tokens", 64)
    dtype: str = derive(GenerateConfig, "dtype")


@dataclass
class BenchGenerateConfig(BenchDecodeConfig):
    """`potstill bench generate`: completion tokens/s of naive and batched model.generate against potstill's engine."""

    n: int = opt(0, "Prompts for the batched decoders (0: all).")
    batch_size: int = derive(GenerateConfig, "batch_size", note="Also model.generate's batch.")
    k: int = derive(GenerateConfig, "top_k", note="Top log-probs per token for the decoders that return them.")
    naive_prompts: int = opt(8, "Prompts for the one-at-a-time model.generate anchor.")
    quantize: str = derive(GenerateConfig, "quantize", "int8", "Here: 'int8' adds rows for the engine over int8 "
                           "copies of the (float32) model, with and without the output head, and their KL to it.")
    out: str = opt("runs/bench/generate.json", "JSON results.")


@dataclass
class BenchServeConfig(BenchDecodeConfig):
    """`potstill bench serve`: completion tokens/s served over HTTP to concurrent clients vs the local engine."""

    n: int = opt(64, "Prompts (one request each).")
    batch_size: int = derive(GenerateConfig, "batch_size", 32, "Here: locally and by the server (its max_batch_size).")
    clients: int = opt(64, "Concurrent HTTP clients, each request its own seed.")
    rounds: int = opt(2, "Alternating local/served rounds (medians reported).")
    out: str = opt("runs/bench/serve.json", "JSON results.")
