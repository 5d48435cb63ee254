"""int8 quantisation of a local float32 CPU model, allowed only behind a fidelity gate.

`quantize_engine(engine, "int8", prompt_ids)` is the one place a local teacher becomes int8: it
teacher-forces a small calibration set (the prompts with the float32 model's own sampled
completions, or given completions) under the float32 model, keeps its top-k log-probs + one tail
bucket per position and each linear input's largest magnitude per channel, replaces the model's
decoder-layer `nn.Linear` modules by `Int8Linear` (int8 weights with a scale per output channel,
int8 activations with a scale per token computed at run time, SmoothQuant-balanced; int32 products by
`torch._int_mm`, which uses VNNI on AVX-512 CPUs), teacher-forces the same tokens again, and measures
KL(fp32 || int8) over those k + 1 buckets (nats per completion token, the measure eval's KL column
uses). Above the bar (`MAX_KL`, the issue's 1e-3 nats/token, unless the caller sets another) it
refuses with a PotstillError; the measurement is returned for the capture manifest. The tied output
head stays float32 unless `head=True`.

Why per token: one activation scale per forward (torch.ao's dynamic quantisation, used before) lets
the few outlier channels of one token set the step for every row of the batch; on the embedded
SmolLM2-135M that cost 1.27 nats/token of KL, per-token scales 0.040, with SmoothQuant (alpha 0.5)
0.017 (bench generate's prompts; weights alone, activations float32: 0.0036, so the 1e-3 bar is out of
int8's reach on this model whatever the activations do).

    record = quantize_engine(teacher, "int8", [teacher.encode_chat(m) for m in messages[:8]], k=20)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from potstill.errors import PotstillError

if TYPE_CHECKING:
    from potstill.lm.engine import Engine

QUANTIZE_MODES = ("none", "int8")
MAX_KL = 1e-3
"""The fidelity bar: top-k (+ tail) KL of the int8 model to the float32 one, nats per token."""
QUANTIZE_HEAD = False
"""Quantise the (tied, 49,152-wide) output head too (bench generate measures both)."""
SCHEME = "int8 weights per output channel, int8 activations per token, SmoothQuant alpha 0.5, torch._int_mm"
SMOOTH_ALPHA = 0.5
"""SmoothQuant's migration strength: per input channel j, s_j = max|x_j|^a / max|W_:,j|^(1 - a)."""
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


class Int8Linear(torch.nn.Module):
    """`x @ W.T + b` in int8: weights with a scale per output channel, activations with a scale per
    token (row) computed at run time, products summed in int32 (`torch._int_mm`). With `smooth`
    (SmoothQuant, Xiao et al. 2023), activation channel j is divided and weight column j multiplied
    by `smooth[j]` before rounding (exact in float), so outlier channels share their range with the
    weights."""

    def __init__(self, linear: torch.nn.Linear, smooth: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth[None, :]
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("inv_smooth", None if smooth is None else 1 / smooth)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        x = x * self.inv_smooth if self.inv_smooth is not None else x.float().clone()  # a copy, divided in place
        step = x.abs().amax(1, keepdim=True).clamp_(min=1e-12).div_(127)
        q = x.div_(step).round_().to(torch.int8)  # |x / step| <= 127 by construction
        y = torch.mul(torch._int_mm(q, self.weight_int8.t()), step).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)


def _targets(model, head: bool) -> dict[str, torch.nn.Linear]:
    """The Linear modules int8 replaces, by name: the decoder layers' (and the output head with `head`)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", base)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    out = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".")}
    if head and isinstance(model.get_output_embeddings(), torch.nn.Linear):
        out[next(n for n, m in model.named_modules() if m is model.get_output_embeddings())] = model.get_output_embeddings()
    return out


@contextmanager
def input_maxima(model, head: bool = True):
    """While open, record each target Linear's input magnitude maximum per channel (SmoothQuant's
    calibration) into the yielded dict (name -> [in_features])."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in _targets(model, head).items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def smoothing(linear: torch.nn.Linear, input_max: torch.Tensor | None, alpha: float = SMOOTH_ALPHA) -> torch.Tensor | None:
    """SmoothQuant's per-input-channel factor for `linear`, None without calibration."""
    if input_max is None:
        return None
    w = linear.weight.detach().float().abs().amax(0).clamp(min=1e-5)
    return (input_max.clamp(min=1e-5) ** alpha / w ** (1 - alpha)).clamp(min=1e-5)


def quantize_model(model, head: bool = QUANTIZE_HEAD, input_max: dict[str, torch.Tensor] | None = None) -> int:
    """Replace the decoder layers' nn.Linear modules (and the output head with `head`) by `Int8Linear`,
    in place, SmoothQuant-balanced where `input_max` (from `input_maxima`) has the module. Returns how
    many Linear modules were replaced. A tied head's embedding stays float32 (the head gets an int8 copy)."""
    check_quantizable(model, "int8")
    if not hasattr(torch, "_int_mm"):
        raise PotstillError(f"quantize int8: this torch ({torch.__version__}) has no int8 matmul")
    input_max = input_max or {}
    modules = dict(model.named_modules())
    targets = _targets(model, head)
    for name, linear in targets.items():
        q = Int8Linear(linear, smoothing(linear, input_max.get(name)))
        if linear is model.get_output_embeddings():
            model.set_output_embeddings(q)
        else:
            parent, attr = name.rsplit(".", 1)
            setattr(modules[parent], attr, q)
    return len(targets)


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
    with input_maxima(engine.model, head) as input_max:  # SmoothQuant's calibration, in the same pass
        reference = reference_buckets(engine, prompts, completions, k or 20)
    replaced = quantize_model(engine.model, head, input_max)
    kl, tokens = bucket_kl(engine, prompts, completions, reference)
    engine.quantized = {"mode": mode, "head": head, "linear_modules": replaced, "scheme": SCHEME,
                        "kl_topk": kl, "max_kl": bar, "k": k or 20, "calibration_prompts": len(prompts),
                        "calibration_tokens": tokens}
    if not kl <= bar:
        raise PotstillError(f"quantize {mode}: top-{k or 20} KL to the float32 model is {kl:.2e} nats/token over "
                            f"{tokens} calibration tokens, above the bar of {bar:.0e}; use --quantize none")
    return engine.quantized


def quantized_copy(engine: Engine, head: bool = QUANTIZE_HEAD, input_max: dict[str, torch.Tensor] | None = None) -> Engine:
    """A second engine over an int8 copy of `engine`'s float32 model (the bench's int8 rows)."""
    import copy

    from potstill.lm.engine import Engine

    model = copy.deepcopy(engine.model)
    replaced = quantize_model(model, head, input_max)
    other = Engine(model, engine.tokenizer, name=f"{engine.name} int8")
    other.quantized = {"mode": "int8", "head": head, "linear_modules": replaced, "scheme": SCHEME}
    return other
