"""Loading: a model spec to a local directory, and the dtype to run it in.

    resolve_model_dir("embedded")          # -> $POTSTILL_HOME/models/... (converted from GGUF once)
    resolve_model_dir("embedded:gemma3-270m")  # the optional Gemma 3 270M, if its package is installed
    pick_dtype("auto")                     # bf16 where the CPU/GPU has it natively, else float32
"""

from __future__ import annotations

from pathlib import Path

import torch

from potstill.errors import PotstillError


def resolve_model_dir(spec: str) -> Path:
    """'embedded' | 'embedded:KEY' | model dir | .gguf file -> a local HF model directory."""
    from potstill.lm.embedded import convert_gguf, embedded_model_dir, is_embedded

    if is_embedded(spec):
        return embedded_model_dir(spec)
    path = Path(spec)
    if path.suffix == ".gguf":
        return convert_gguf(path)
    if not (path / "config.json").exists():
        raise PotstillError(f"{spec}: not a model directory (no config.json), .gguf file or 'embedded[:KEY]'")
    return path


def pick_dtype(name: str) -> torch.dtype:
    """'auto' -> bf16 when the CPU has native bf16 (or a CUDA device is used), else float32."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and cpu_has_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
