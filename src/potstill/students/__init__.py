"""Building the student: `pretrained:<path>`, `fresh:<size>`, or steps from the teacher joined by `+`:
`prune:depth[:N|:ratio]`, `prune:width[:ratio|:params]`, `moe:upcycle[:E[:K[:noise]]]`.

`build_student(spec, teacher_dir, calibration)` returns the model, its tokenizer and a dict that
says how it was made (which layers were dropped, which heads kept, ...), saved with the student's
provenance. Steps run in the order depth -> width -> moe whatever order they are written in.

    model, tok, info = build_student("prune:depth:0.5", teacher_dir, calibration_ids)
    model, tok, info = build_student("prune:width:60M", teacher_dir, calibration_ids)
    model, tok, info = build_student("prune:depth:0.5+moe:upcycle:4:2", teacher_dir, calibration_ids)
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
    if kind not in ("prune", "moe"):
        raise PotstillError(
            f"student {spec!r}: expected pretrained:<path>, fresh:<size>, prune:depth|width[:...] or moe:upcycle[:E[:K]]"
        )
    steps = parse_steps(spec)
    if ("depth" in steps or "width" in steps) and not calibration:
        raise PotstillError(f"student {spec!r}: pruning needs calibration prompts")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    info: dict[str, Any] = {"spec": spec, "teacher_params": count_params(model)["params"]}
    summary = []
    if "depth" in steps:
        from potstill.students.prune import prune_depth

        keep = parse_amount(steps["depth"] or "0.5", model.config.num_hidden_layers, spec)
        info.update(prune_depth(model, calibration, keep))
    if "width" in steps:
        from potstill.students.width import prune_width

        ratio, target = parse_width(steps["width"] or "0.5", spec)
        try:
            model, info["width"] = prune_width(model, calibration, ratio=ratio, params=target)
        except ValueError as e:
            raise PotstillError(f"student {spec!r}: {e}") from None
        w = info["width"]
        summary.append(
            f"width: MLP {w['intermediate_size'][0]}->{w['intermediate_size'][1]} channels, "
            f"heads {w['num_attention_heads'][0]}->{w['num_attention_heads'][1]} per layer"
        )
    if "moe" in steps:
        from potstill.students.moe import upcycle

        experts, top_k, noise = parse_moe(steps["moe"], spec)
        model, info["moe"] = upcycle(model, experts, top_k, noise, seed=seed)
        m = info["moe"]
        summary.append(f"moe: {experts} experts top-{top_k}, {m['active_params']:,} active of {m['params']:,}")
    info["params"] = count_params(model)["params"]
    if summary:
        info["summary"] = f"{'; '.join(summary)}; params {info['teacher_params']:,} -> {info['params']:,}"
    return model, tokenizer, info


def parse_steps(spec: str) -> dict[str, str]:
    """'prune:depth:0.5+moe:upcycle:4:2' -> {'depth': '0.5', 'moe': '4:2'}; each step at most once.

    Steps always run depth -> width -> moe, whatever order they are written in.
    """
    steps: dict[str, str] = {}
    for part in spec.split("+"):
        kind, _, arg = part.strip().partition(":")
        method, _, amount = arg.partition(":")
        if kind == "prune" and method in ("depth", "width"):
            name = method
        elif kind == "moe" and method == "upcycle":
            name = "moe"
        else:
            raise PotstillError(
                f"student {spec!r}: {part!r} is not prune:depth[:N|ratio], prune:width[:ratio|params] "
                "or moe:upcycle[:E[:K[:noise]]]"
            )
        if name in steps:
            raise PotstillError(f"student {spec!r}: {name} given twice")
        steps[name] = amount
    return steps


def parse_width(text: str, spec: str) -> tuple[float | None, float | None]:
    """'0.5' -> keep ratio; '60M' / '6e7' -> parameter target."""
    from potstill.students.fresh import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        raise PotstillError(f"student {spec!r}: {text!r} is not a keep ratio (0.5) or parameter count (60M)") from None
    if 0 < value <= 1:
        return value, None
    if value >= 1000:
        return None, value
    raise PotstillError(f"student {spec!r}: width {text!r} is neither a ratio in (0, 1] nor a parameter count")


def parse_moe(text: str, spec: str) -> tuple[int, int, float]:
    """'' -> (4, 2, 0); '8' -> (8, 2, 0); '8:1' -> (8, 1, 0); '4:2:0.01' -> noise 0.01."""
    parts = [p for p in text.split(":") if p] if text else []
    try:
        experts = int(parts[0]) if parts else 4
        top_k = int(parts[1]) if len(parts) > 1 else min(2, experts)
        noise = float(parts[2]) if len(parts) > 2 else 0.0
    except ValueError:
        raise PotstillError(f"student {spec!r}: moe:upcycle takes [:E[:K[:noise]]] (integers, then a float)") from None
    if len(parts) > 3 or experts < 1 or not 1 <= top_k <= experts or noise < 0:
        raise PotstillError(f"student {spec!r}: moe:upcycle needs E >= 1, 1 <= K <= E, noise >= 0")
    return experts, top_k, noise


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
