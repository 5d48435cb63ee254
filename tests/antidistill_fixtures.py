"""The tiny anti-distillation setting of tests/test_antidistill_e2e.py, and the measurement that sizes its margin.

    OMP_NUM_THREADS=1 PYTHONPATH=src python -u -m tests.antidistill_fixtures --seeds 10 --lambdas 3 10 \
        --out /tmp/adtest.json

A plain module (not a test module): the test imports it, and run as above it measures the effect.

Setting (all tiny, in memory, seconds per arm):
- teacher: a 2-layer tiny llama trained (`TEACHER_STEPS` Adam steps) on the protect set's references, so
  that its clean answers teach them: the capability the owner protects;
- protect set: the tiny-pipeline prompts that have reference answers (tests/pipeline_fixtures.PROMPTS);
- proxy: a fresh 1-layer tiny llama; the student starts from the same weights (the distiller fine-tunes a
  public base model that the owner also uses as its proxy), unless `student_seed` differs;
- distiller: asks the twelve prompts (no answers) `RECIPE["samples"]` times each over HTTP, through
  `potstill generate --teacher URL` (text and top-k log-probs), trains the student with `ce` on the text
  (studies/antidistill_http.py says why ce), and is scored by its NLL of the protect references.
Arms: the same teacher served with anti-distillation at lambda, and without it (lambda = 0, the clean
server), each on its own real uvicorn server on 127.0.0.1; one student per arm and seed, paired by seed.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.pipeline_fixtures import PROMPTS
from tests.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_model

KEY_ENV = "POTSTILL_ADTEST_API_KEY"  # the distiller's key, set while a server runs
TEACHER_STEPS, TEACHER_LR = 60, 1e-2
RECIPE: dict[str, Any] = {"samples": 4, "max_new_tokens": 16, "top_k": 4, "loss": "ce", "max_steps": 30,
                          "batch_size": 8, "lr": 3e-3}


@dataclass
class Setting:
    root: Path
    teacher: Any  # HFTeacher
    tokenizer: Any
    teacher_dir: Path
    proxy_dir: Path
    protect_file: Path
    prompts_file: Path
    protect: list  # Prompt, loaded from protect_file as the server loads them
    student: Any  # the initial weights of every arm's student
    teacher_protect_nll: float

    def antidistill(self, lam: float):
        from potstill.config import AntidistillConfig

        return AntidistillConfig(antidistill=lam, proxy=str(self.proxy_dir), protect=str(self.protect_file))


def build_setting(root: Path, student_seed: int = 1, teacher_steps: int = TEACHER_STEPS) -> Setting:
    """Teacher, proxy, student and files under `root` (module doc)."""
    import torch

    from potstill.capture.generate import end_of_turn_ids
    from potstill.capture.prompts import load_prompts
    from potstill.guard.antidistill import protect_examples, protect_loss_grad
    from potstill.teachers.hf import HFTeacher

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    protect_file, prompts_file = root / "protect.jsonl", root / "ask.jsonl"
    protect_file.write_text("".join(json.dumps({"instruction": p["instruction"], "output": p["output"]}) + "\n"
                                    for p in PROMPTS if p.get("output")))
    prompts_file.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "output"}) + "\n" for p in PROMPTS))
    protect = load_prompts(protect_file)

    model = make_tiny_model(tok, layers=2, seed=0)
    examples = protect_examples(tok, protect, end_of_turn_ids(tok, model.generation_config))
    opt = torch.optim.Adam(model.parameters(), lr=TEACHER_LR)
    for _ in range(teacher_steps):
        _, grads = protect_loss_grad(model, examples)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        opt.step()
    model.zero_grad(set_to_none=True)
    nll = protect_loss_grad(model, examples)[0]
    teacher_dir = save_tiny_model(root / "teacher", model.eval(), tok)
    proxy = make_tiny_model(tok, layers=1, seed=1)
    proxy_dir = save_tiny_model(root / "proxy", proxy, tok)
    student = proxy if student_seed == 1 else make_tiny_model(tok, layers=1, seed=student_seed)
    return Setting(root, HFTeacher(model, tok, name="tiny"), tok, teacher_dir, proxy_dir, protect_file, prompts_file,
                   protect, student, nll)


@contextmanager
def serving(setting: Setting, lam: float):
    """The teacher on a live server (anti-distillation at `lam`, off at 0); yields its base URL, with the
    distiller's key in $KEY_ENV."""
    from tests.guard_fixtures import live_server

    ad = setting.antidistill(lam) if lam else None
    tmp = setting.root / f"server-{lam:g}"
    tmp.mkdir(exist_ok=True)
    with live_server(setting.teacher, tmp, antidistill=ad, max_tokens_cap=64) as srv:
        os.environ[KEY_ENV] = srv.keys.create("distiller", rpm=100_000, tpm=100_000_000, max_top_logprobs=None)[1]
        try:
            yield srv.base
        finally:
            os.environ.pop(KEY_ENV, None)


def run_arm(setting: Setting, base_url: str, seed: int, out: Path, temperature: float = 1.0) -> dict[str, Any]:
    """One distiller against the server at `base_url`: capture, train, protect NLL (studies/antidistill_http.py)."""
    from potstill.studies.antidistill_http import HttpDistillConfig, distill_over_http

    cfg = HttpDistillConfig(model="tiny", tokenizer=str(setting.teacher_dir), http_api_key_env=KEY_ENV,
                            prompts=str(setting.prompts_file), temperature=temperature, seed=seed, **RECIPE)
    return distill_over_http(base_url, cfg, setting.student, setting.tokenizer, setting.protect, out)


def measure(root: Path, seeds: int, lambdas: list[float], student_seed: int = 1,
            temperature_baseline: bool = False) -> dict[str, Any]:
    """Every lambda's defended arm and the clean arm for seeds 0..seeds-1; paired differences and teacher costs.
    `temperature_baseline`: also, per lambda, the clean server sampled at the temperature costing the teacher as
    much (capped at the API's 2)."""
    from potstill.studies.antidistill_http import paired_difference, teacher_protect_cost

    setting = build_setting(root, student_seed)
    result: dict[str, Any] = {"seeds": seeds, "recipe": RECIPE, "student_seed": student_seed,
                              "teacher_protect_nll_trained": setting.teacher_protect_nll, "arms": {}}
    plan: dict[str, tuple[float, float]] = {"clean": (0.0, 1.0)}  # arm -> (lambda, temperature)
    costs = {"clean": teacher_protect_cost(setting.teacher, setting.antidistill(0.0), setting.protect)}
    for lam in lambdas:
        costs[f"lambda={lam:g}"] = c = teacher_protect_cost(setting.teacher, setting.antidistill(lam), setting.protect,
                                                            match=temperature_baseline)
        plan[f"lambda={lam:g}"] = (lam, 1.0)
        if temperature_baseline and "matched_temperature" in c:
            t = round(min(c["matched_temperature"], 2.0), 3)
            plan[f"T={t:g}"] = (0.0, t)
            costs[f"T={t:g}"] = teacher_protect_cost(setting.teacher, setting.antidistill(0.0), setting.protect, t)
    for lam in sorted({lam for lam, _ in plan.values()}):
        with serving(setting, lam) as url:
            for name, (arm_lam, t) in plan.items():
                if arm_lam != lam:
                    continue
                runs = [run_arm(setting, url, s, root / name.replace("=", "") / f"seed{s}", t) for s in range(seeds)]
                result["arms"][name] = {"lambda": lam, "temperature": t, "teacher": costs[name], "runs": runs,
                                        "protect_nll": [a["protect_nll"] for a in runs]}
                print(f"{name}: teacher protect NLL {costs[name]['served']:.3f} (cost {costs[name]['cost']:+.3f}); "
                      f"student protect NLL {[round(a['protect_nll'], 3) for a in runs]}; "
                      f"{sum(a['capture_seconds'] + a['train_seconds'] for a in runs) / seeds:.1f} s per run", flush=True)
    clean = result["arms"]["clean"]["protect_nll"]
    for name, arm in result["arms"].items():
        if name != "clean":
            arm["vs_clean"] = d = paired_difference(arm["protect_nll"], clean)
            print(f"{name} - clean: mean {d['mean']:+.3f} nats, 95% t-interval [{d['low']:+.3f}, {d['high']:+.3f}], "
                  f"sd {d['sd']:.3f}, n {d['n']}, {d['positive']}/{d['n']} positive, one-seed 97.5% prediction "
                  f"bound {d['predict_low']:+.3f}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[3.0, 10.0])
    ap.add_argument("--student-seed", type=int, default=1, help="1 = the proxy's weights")
    ap.add_argument("--temperature-baseline", action="store_true", help="a temperature arm per lambda")
    ap.add_argument("--out", required=True, help="results JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="adtest-") as tmp:
        result = measure(Path(tmp), args.seeds, args.lambdas, args.student_seed, args.temperature_baseline)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
