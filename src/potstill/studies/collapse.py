"""`potstill study collapse`: distil a distillation of a distillation, and watch what drifts.

    potstill study collapse --generations 3 --out runs/study-collapse

Generation 0 is the teacher. Generation i+1 is a student trained (default: forward KL on the
stored top-k) on a capture that `potstill generate` takes from generation i on the same prompts,
with the same sampling (temperature 1, so a capture is a sample of the model's own distribution).

The student: one architecture for every generation, and by default (`--init same`) every
generation starts from the SAME initial weights — `prune:depth` of the teacher, pruned once on
generation 0's calibration prompts — so the only thing passed from one generation to the next is
data, as in the model-collapse experiments that fine-tune one base model per generation
(Shumailov et al., 2024). `--init previous` continues from the previous student's weights instead
(drift then also accumulates in the weights); a `fresh:<size>` student works too.

Per generation, on its own samples (all prompts): distinct-1/2/3 (unique / total token n-grams over
all completions; corpus-level distinct-n falls as a corpus grows, so the table compares every
generation on the same number of tokens: each generation's completions, in row-id order, cut to
the smallest generation's total, `distinct_n_equal`), mean completion length, and the mean entropy of the model's full next-token
distribution teacher-forced on its own samples. On held-out prompts: fidelity to generation 0,
KL(gen0 ‖ gen i) on gen 0's held-out capture rows (teacher-forced on gen 0's text, gen 0's stored
top-k + tail bucket; for gen 0 itself this is only the codec's rounding, ≈ 0), and the NLL of the
reference answers. Writes results.json, table.md and drift.png under --out.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from potstill.config import opt
from potstill.errors import PotstillError
from potstill.lm.tokens import pad_token_id
from potstill.studies.common import fmt_s, heldout_inputs, measure
from potstill.utils import stable_hash, write_json


@dataclass
class CollapseConfig:
    teacher: str = opt("embedded", "Generation 0: 'embedded', a model dir or a .gguf file.")
    prompts: str = opt("builtin:seed_tasks", "Prompts (with reference answers for the NLL column).")
    out: str = opt("runs/study-collapse", "Output directory (gen-N/capture, gen-N/student, results, PNG).")
    generations: int = opt(3, "Student generations after the teacher.")
    student: str = opt("prune:depth:0.3", "Student architecture, the same every generation.")
    init: str = opt("same", "same: every generation starts from one initialisation; previous: from the last student.")
    loss: str = opt("fkl", "Training loss on the previous generation's capture (fkl, ce, rkl, ...).")
    max_prompts: int | None = opt(None, "Use at most this many prompts.")
    max_new_tokens: int = opt(64, "Completion length of every generation's capture.")
    top_k: int = opt(20, "Top-k stored per token.")
    heldout: float = opt(0.15, "Fraction of prompts held out (never trained on, in any generation).")
    steps: int = opt(40, "Optimizer steps per generation.")
    lr: float = opt(3e-4, "Peak learning rate (warm-up + cosine, one full schedule per generation).")
    warmup_steps: int = opt(5, "Warm-up steps.")
    batch_size: int = opt(8, "Sequences per optimizer step.")
    max_seq_len: int = opt(256, "Truncate prompt+completion to this many tokens.")
    gen_batch_size: int = opt(16, "Decoding batch size.")
    dtype: str = opt("auto", "Decoding dtype of every generation: auto (bf16 where the CPU has it), float32.")
    seed: int = opt(0, "Seed for sampling, the split, the student's init and data order.")
    entropy_rows: int = opt(64, "Own samples (the first N rows) the entropy is measured on; 0 = all.")

    def __post_init__(self) -> None:
        if self.generations < 1 or self.steps < 1:
            raise PotstillError("study collapse: generations and steps must be >= 1")
        if self.init not in ("same", "previous"):
            raise PotstillError(f"study collapse: init must be same/previous, not {self.init!r}")


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Unique n-grams / total n-grams over all sequences (0 when there are none)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def truncate_to_tokens(sequences: list[list[int]], budget: int) -> list[list[int]]:
    """The sequences in order, cut so that they hold exactly `budget` tokens in all (the last one partly)."""
    out, left = [], budget
    for s in sequences:
        if left <= 0:
            break
        out.append(list(s[:left]))
        left -= len(out[-1])
    return out


def completions(capture_dir: str | Path) -> list[list[int]]:
    """A capture's completion ids in row-id order (the same prompts line up across generations)."""
    from potstill.capture.store import Capture

    rows = Capture.open(capture_dir).rows(columns=["id", "completion_ids"])
    return [r["completion_ids"].tolist() for r in sorted(rows, key=lambda r: r["id"])]


def equal_token_distinct(corpora: list[list[list[int]]]) -> tuple[int, list[dict[str, float]]]:
    """distinct-1/2/3 of every corpus cut to the smallest corpus's token count: (that count, per corpus)."""
    budget = min((sum(map(len, c)) for c in corpora), default=0)
    rows = [{f"distinct_{n}_equal": distinct_n(truncate_to_tokens(c, budget), n) for n in (1, 2, 3)} for c in corpora]
    return budget, rows


def own_entropy(model, examples, pad_id: int, batch_size: int = 8) -> float:
    """Mean entropy (nats) of the model's full next-token distribution at each completion position."""
    import torch

    from potstill.train.data import collate, student_logits

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            batch = collate(examples[s : s + batch_size], pad_id)
            logp = torch.log_softmax(student_logits(model, batch).float(), dim=-1)
            total += float(-(logp.exp() * logp).sum())
            n += batch.n_targets
    return total / max(n, 1)


def sample_stats(capture_dir: str | Path, model, tokenizer, entropy_rows: int = 0) -> dict[str, Any]:
    """Diversity of a generation's own samples (all of them) and its entropy on the first `entropy_rows`."""
    import numpy as np

    from potstill.capture.store import Capture
    from potstill.train.data import examples_from_capture

    capture = Capture.open(capture_dir)
    seqs = [r["completion_ids"].tolist() for r in capture.rows(columns=["completion_ids", "finish_reason"])]
    stops = [r["finish_reason"] == "stop" for r in capture.rows(columns=["finish_reason"])]
    examples = examples_from_capture(capture, split=None, max_seq_len=4096)
    examples = examples[:entropy_rows] if entropy_rows else examples
    pad = pad_token_id(tokenizer)
    return {
        **{f"distinct_{n}": distinct_n(seqs, n) for n in (1, 2, 3)},
        "mean_length": float(np.mean([len(s) for s in seqs])) if seqs else 0.0,
        "stop_fraction": float(np.mean(stops)) if stops else 0.0,
        "samples": len(seqs),
        "entropy": own_entropy(model, examples, pad),
        "entropy_tokens": int(sum(len(e.input_ids) - e.prompt_len for e in examples)),
    }


def run_collapse(cfg: CollapseConfig, log=print) -> dict[str, Any]:
    """Run generation 0..N; write results.json / table.md / drift.png; return the results."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.capture.generate import generate
    from potstill.capture.store import Capture
    from potstill.config import GenerateConfig, TrainConfig
    from potstill.lm.loading import resolve_model_dir
    from potstill.students import build_student
    from potstill.train.data import examples_from_capture
    from potstill.train.loop import train
    from potstill.utils import quiet_transformers

    quiet_transformers()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher_dir = resolve_model_dir(cfg.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)

    def capture_of(spec: str, directory: Path) -> str:
        generate(GenerateConfig(teacher=spec, prompts=cfg.prompts, out=str(directory), max_new_tokens=cfg.max_new_tokens,
                                top_k=cfg.top_k, heldout=cfg.heldout, max_prompts=cfg.max_prompts, temperature=1.0,
                                batch_size=cfg.gen_batch_size, seed=cfg.seed, dtype=cfg.dtype), log=log)
        return str(directory)

    log(f"[collapse] generation 0 ({cfg.teacher}): capture")
    captures = [capture_of(cfg.teacher, out / "gen-0" / "capture")]
    examples0, prompts0 = heldout_inputs(captures[0])
    from potstill.studies.report import write_collapse_outputs

    def finish(gens: list[dict[str, Any]], info: dict[str, Any], complete: bool) -> dict[str, Any]:
        """results.json/table.md/drift.png after every generation, so a stopped run still shows its curve."""
        budget, equal = equal_token_distinct([completions(c) for c in captures[: len(gens)]])
        for row, eq in zip(gens, equal, strict=True):
            row.update(eq, equal_tokens=budget)
        result = {"study": "collapse", "complete": complete, "config": asdict(cfg), "student_info": _jsonable(info),
                  "generations": gens, "equal_tokens": budget,
                  "timings": {"total_s": round(time.perf_counter() - t_start, 1)}}
        write_collapse_outputs(result, out)
        return result

    def measure_gen0() -> dict[str, Any]:
        teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        return _measure_generation(0, "teacher", teacher_model, tokenizer, captures[0], examples0, prompts0, cfg.entropy_rows)

    key0 = stable_hash({"teacher": str(teacher_dir), "capture": _capture_id(captures[0]), "rows": cfg.entropy_rows})
    gens = [_cached(out / "gen-0" / "measured.json", key0, measure_gen0)]
    log(f"[collapse] gen 0: {_brief(gens[0])} | elapsed {fmt_s(time.perf_counter() - t_start)}")

    train0 = examples_from_capture(Capture.open(captures[0]), split="train", max_seq_len=cfg.max_seq_len)
    calibration = [e.input_ids.tolist() for e in train0[:32]]
    init_model, _, info = build_student(cfg.student, teacher_dir, calibration, seed=cfg.seed)
    if info.get("dropped_layers") is not None:
        log(f"[collapse] student {cfg.student}: dropped layers {info['dropped_layers']} (once, for every generation)")
    finish(gens, info, complete=False)
    previous = None
    for g in range(1, cfg.generations + 1):
        t_gen = time.perf_counter()
        gdir = out / f"gen-{g}"
        tcfg = TrainConfig(capture=captures[-1], out=str(gdir / "student"), teacher=str(teacher_dir), student=cfg.student,
                           loss=cfg.loss, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps,
                           batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, checkpoint_every=0, seed=cfg.seed)
        key = stable_hash({"train": asdict(tcfg), "init": cfg.init, "generation": g, "parent": _capture_id(captures[-1])})
        marker = gdir / "trained.json"
        if marker.exists() and json.loads(marker.read_text()).get("key") == key:
            log(f"[collapse] gen {g}: student already trained in {gdir / 'student'} (reusing it)")
            model = AutoModelForCausalLM.from_pretrained(gdir / "student", dtype=torch.float32)
        else:
            shutil.rmtree(gdir / "capture", ignore_errors=True)  # its sampler (the student) is about to change
            model = copy.deepcopy(init_model if cfg.init == "same" or previous is None else previous)
            log(f"[collapse] gen {g}: training {cfg.student} on gen {g - 1}'s capture ({cfg.loss}, {cfg.steps} steps)")
            train(tcfg, log=lambda line, g=g: log(f"  [gen {g}] {line}"), model=model, tokenizer=tokenizer,
                  student_info=info)
            write_json(marker, {"key": key})
        log(f"[collapse] gen {g}: capture from the gen-{g} student")
        captures.append(capture_of(str(gdir / "student"), gdir / "capture"))
        model.float()
        key_g = stable_hash({"student": key, "capture": _capture_id(captures[-1]), "rows": cfg.entropy_rows})
        row = _cached(gdir / "measured.json", key_g, lambda g=g, model=model: _measure_generation(
            g, f"student gen {g}", model, tokenizer, captures[-1], examples0, prompts0, cfg.entropy_rows))
        row["seconds"] = round(time.perf_counter() - t_gen, 1)
        gens.append(row)
        finish(gens, info, complete=g == cfg.generations)
        previous = model
        per_gen = np.mean([r["seconds"] for r in gens[1:]])
        log(f"[collapse] gen {g}: {_brief(row)} | elapsed {fmt_s(time.perf_counter() - t_start)}, "
            f"eta {fmt_s(per_gen * (cfg.generations - g))}")
    return finish(gens, info, complete=True)


def _cached(path: Path, key: str, compute) -> dict[str, Any]:
    """A generation's measurements, reused when a rerun finds them for the same model and capture."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["row"]
    t0 = time.perf_counter()
    row = compute()
    row["measure_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(path, {"key": key, "row": row})
    return row


def _measure_generation(g: int, name: str, model, tokenizer, capture_dir, examples0, prompts0,
                        entropy_rows: int) -> dict[str, Any]:
    fid = measure(model, tokenizer, examples0, prompts0)
    row: dict[str, Any] = {"generation": g, "model": name, "capture": str(capture_dir),
                           "kl_to_gen0": fid.get("kl"), "top1_agreement_gen0": fid.get("top1_agreement"),
                           "nll_gen0_text": fid.get("nll_teacher_tokens"), "nll_reference": fid.get("nll_reference"),
                           "heldout_tokens": fid.get("tokens"), "reference_tokens": fid.get("reference_tokens")}
    row.update(sample_stats(capture_dir, model, tokenizer, entropy_rows))
    return row


def _capture_id(capture_dir: str) -> str:
    """The capture's content (its shards' sha256), not its manifest's timestamps."""
    manifest = json.loads((Path(capture_dir) / "manifest.json").read_text())
    return stable_hash([s.get("sha256") for s in manifest.get("shards", [])])


def _brief(row: dict[str, Any]) -> str:
    kl = row.get("kl_to_gen0")
    nll = row.get("nll_reference")
    return (f"distinct-2 {row['distinct_2']:.3f} (all {row['samples']} samples), entropy {row['entropy']:.3f}, KL(gen0‖·) "
            f"{'–' if kl is None else f'{kl:.4f}'}, reference NLL {'–' if nll is None else f'{nll:.3f}'}")


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
