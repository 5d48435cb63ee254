"""Building the student: `pretrained:<path>`, `fresh:<size>`, `prune:depth[:N|:ratio]`.

`build_student(spec, teacher_dir, calibration)` returns the model, its tokenizer and a dict that
says how it was made (which layers were dropped and why), saved with the student's provenance.

    model, tok, info = build_student("prune:depth:0.5", teacher_dir, calibration_ids)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from potstill.errors import PotstillError


def build_student(spec: str, teacher_dir: str | Path, calibration: list[list[int]] | None = None, seed: int = 0):
    """Make a student model from a spec. Returns (model, tokenizer, info)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, _, arg = spec.partition(":")
    if kind == "pretrained":
        if not arg or not (Path(arg) / "config.json").exists():
            raise PotstillError(f"student {spec!r}: {arg or '(empty)'} is not a model directory")
        model = AutoModelForCausalLM.from_pretrained(arg)
        return model, AutoTokenizer.from_pretrained(arg), {"spec": spec, "source": str(arg)}
    teacher_dir = Path(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    if kind == "fresh":
        from potstill.students.fresh import fresh_student

        model, info = fresh_student(teacher_dir, arg or "auto", seed=seed)
        return model, tokenizer, {"spec": spec, **info}
    if kind == "prune":
        method, _, amount = arg.partition(":")
        if method != "depth":
            raise PotstillError(f"student {spec!r}: unknown prune method {method!r} (supported: depth)")
        if not calibration:
            raise PotstillError(f"student {spec!r}: pruning needs calibration prompts")
        from potstill.students.prune import prune_depth

        model = AutoModelForCausalLM.from_pretrained(teacher_dir)
        info = prune_depth(model, calibration, parse_amount(amount or "0.5", model.config.num_hidden_layers, spec))
        return model, tokenizer, {"spec": spec, **info}
    raise PotstillError(f"student {spec!r}: expected pretrained:<path>, fresh:<size> or prune:depth[:N]")


def parse_amount(text: str, total: int, spec: str) -> int:
    """'0.5' -> keep half the layers; '15' -> keep 15 layers."""
    try:
        value = float(text)
    except ValueError:
        raise PotstillError(f"student {spec!r}: {text!r} is not a layer count or ratio") from None
    keep = round(total * value) if value < 1 else int(value)
    if not 1 <= keep <= total:
        raise PotstillError(f"student {spec!r}: keeps {keep} of {total} layers")
    return keep


def count_params(model) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    return {"params": total}
