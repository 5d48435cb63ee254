"""int8 dynamic quantisation of a local float32 CPU model, allowed only behind a fidelity gate.

`quantize_engine(engine, "int8", prompt_ids)` is the one place a local teacher becomes int8: it
teacher-forces a small calibration set (the prompts with the float32 model's own sampled
completions, or given completions) under the float32 model, keeps its top-k log-probs + one tail
bucket per position, quantises the model's decoder-layer `nn.Linear` modules in place
(`torch.ao.quantization.quantize_dynamic`: int8 weights with a scale per output channel,
activations quantised per forward at run time), teacher-forces the same tokens again, and measures KL(fp32 || int8) over those k + 1 buckets
(nats per completion token, the measure eval's KL column uses). Above `MAX_KL` (the issue's bar,
1e-3 nats/token) it refuses with a PotstillError; the measurement is returned for the capture
manifest. The tied output head stays float32 unless `head=True` (see QUANTIZE_HEAD for why).

    record = quantize_engine(teacher, "int8", [teacher.encode_chat(m) for m in messages[:8]], k=20)
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from potstill.errors import PotstillError

if TYPE_CHECKING:
    from potstill.lm.engine import Engine

QUANTIZE_MODES = ("none", "int8")
MAX_KL = 1e-3
"""The fidelity bar: top-k (+ tail) KL of the int8 model to the float32 one, nats per token."""
QUANTIZE_HEAD = False
"""Quantise the (tied, 49,152-wide) output head too. On the embedded teacher (bench generate, 32 prompts,
1,844 tokens) the head added speed but KL (1.27 -> 1.34 nats/token): it stays float32."""
CALIBRATION_PROMPTS = 8
CALIBRATION_TOKENS = 32


def check_quantizable(model, mode: str) -> None:
    """A one-line PotstillError unless `mode` is known and, for int8, the model is float32 on the CPU."""
    if mode not in QUANTIZE_MODES:
        raise PotstillError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, not {mode!r}")
    if mode == "none":
        return
    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":
        raise PotstillError(f"quantize {mode}: needs a float32 model on the CPU, not {str(p.dtype).removeprefix('torch.')} "
                            f"on {p.device.type} (use --dtype float32)")


def quantize_model(model, head: bool = QUANTIZE_HEAD) -> int:
    """Quantise the decoder layers' nn.Linear modules (and the output head with `head`) to int8, in place.

    Returns how many Linear modules were replaced."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    check_quantizable(model, "int8")
    spec = {torch.nn.Linear: per_channel_dynamic_qconfig}  # a scale per output channel: int8 weights lose less
    base = getattr(model, model.base_model_prefix, model)
    targets = [base.layers] if hasattr(base, "layers") else [base]
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao (not installed)
        warnings.simplefilter("ignore")
        for module in targets:
            quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)
        if head and isinstance(model.get_output_embeddings(), torch.nn.Linear):
            wrapper = torch.nn.Sequential(model.get_output_embeddings())  # the tied embedding itself stays float32
            quantize_dynamic(wrapper, spec, dtype=torch.qint8, inplace=True)
            model.set_output_embeddings(wrapper[0])
    return sum(type(m).__name__ == "Linear" and m.__module__.startswith("torch.ao.nn.quantized")
               for m in model.modules())


def _buckets(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[n, V] log-probs, [n, k] ids -> [n, k + 1]: the log-probs at `ids` and of all other ids together."""
    tail = torch.logsumexp(logprobs.scatter(1, ids, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([logprobs.gather(1, ids), tail], dim=-1)


@torch.no_grad()
def reference_buckets(engine: Engine, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                      k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's top-k ids and its k + 1 bucket log-probs at every completion position, teacher-forced."""
    out = []
    for _, parts in engine.forced_logprobs(prompt_ids, completion_ids):
        for _, lp in parts:
            ids = lp.topk(min(k, lp.shape[1]), dim=-1).indices
            out.append((ids, _buckets(lp, ids)))
    return out


@torch.no_grad()
def bucket_kl(engine: Engine, prompt_ids: list[list[int]], completion_ids: list[list[int]],
              reference: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """(mean KL(reference || engine's model) over the reference's buckets in nats per token, tokens)."""
    total, n, parts = 0.0, 0, iter(reference)
    for _, chunks in engine.forced_logprobs(prompt_ids, completion_ids):
        for _, lp in chunks:
            ids, p = next(parts)
            q = _buckets(lp, ids)
            total += float(torch.where(p.isfinite(), p.exp() * (p - q), 0.0).sum())
            n += len(lp)
    return total / max(n, 1), n


def calibration_completions(engine: Engine, prompt_ids: list[list[int]], seed: int = 0,
                            temperature: float = 1.0) -> list[list[int]]:
    """The (float32) model's own sampled completions of `prompt_ids`, CALIBRATION_TOKENS at most."""
    from potstill.lm.types import SamplingParams

    params = SamplingParams(max_new_tokens=CALIBRATION_TOKENS, temperature=temperature, top_logprobs=0, seed=seed)
    return [c.completion_ids for c in engine.complete_ids(prompt_ids, params, include_eos=True)]


def quantize_engine(engine: Engine, mode: str, prompt_ids: list[list[int]], completion_ids: list[list[int]] | None = None,
                    k: int = 20, seed: int = 0, temperature: float = 1.0, head: bool = QUANTIZE_HEAD,
                    max_kl: float | None = None) -> dict[str, Any] | None:
    """Quantise `engine`'s model in place behind the fidelity gate; the measurement (None for mode 'none').

    Calibration: the first CALIBRATION_PROMPTS of `prompt_ids` with `completion_ids` (default: the
    float32 model's own samples at `temperature`). An engine already quantised keeps its record.
    """
    if engine.quantized is not None:
        return engine.quantized
    check_quantizable(engine.model, mode)
    if mode == "none":
        return None
    bar = MAX_KL if max_kl is None else max_kl
    prompts = [list(p) for p in prompt_ids[:CALIBRATION_PROMPTS]]
    if completion_ids is None:
        completions = calibration_completions(engine, prompts, seed, temperature)
    else:
        completions = [list(c)[: 2 * CALIBRATION_TOKENS] for c in completion_ids[:CALIBRATION_PROMPTS]]
    reference = reference_buckets(engine, prompts, completions, k or 20)
    replaced = quantize_model(engine.model, head)
    kl, tokens = bucket_kl(engine, prompts, completions, reference)
    engine.quantized = {"mode": mode, "head": head, "linear_modules": replaced, "engine": torch.backends.quantized.engine,
                        "kl_topk": kl, "max_kl": bar, "k": k or 20, "calibration_prompts": len(prompts),
                        "calibration_tokens": tokens}
    if not kl <= bar:
        raise PotstillError(f"quantize {mode}: top-{k or 20} KL to the float32 model is {kl:.2e} nats/token over "
                            f"{tokens} calibration tokens, above the bar of {bar:.0e}; use --quantize none")
    return engine.quantized


def quantized_copy(engine: Engine, head: bool = QUANTIZE_HEAD) -> Engine:
    """A second engine over an int8 copy of `engine`'s float32 model (the bench's int8 row)."""
    import copy

    from potstill.lm.engine import Engine

    model = copy.deepcopy(engine.model)
    replaced = quantize_model(model, head)
    other = Engine(model, engine.tokenizer, name=f"{engine.name} int8")
    other.quantized = {"mode": "int8", "head": head, "linear_modules": replaced, "engine": torch.backends.quantized.engine}
    return other
