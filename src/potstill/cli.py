"""`potstill <verb>`: the one entry point. Thin: parses flags, calls the library, prints results.

Flags of generate/train/eval are derived from the typed configs in config.py (one help text per
setting). Heavy imports happen inside commands so `potstill --help` is instant. Any
`PotstillError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import typing
from pathlib import Path

import click

from potstill.bench.config import BenchGenerateConfig, BenchServeConfig
from potstill.bench.steal import StealBenchConfig
from potstill.bench.train import BenchTrainConfig
from potstill.config import EvalConfig, GenerateConfig, TrainConfig, build
from potstill.errors import PotstillError

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Group(click.Group):
    """Turns PotstillError (and bad files) into one line and exit code 2."""

    def invoke(self, ctx):
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)  # step logs appear as they happen, even in a pipe
        try:
            return super().invoke(ctx)
        except PotstillError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


def _click_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return {int: int, float: float, str: str, bool: bool}.get(base, str)


def _shown_default(f: dataclasses.Field) -> str:
    """' [default: X]' for a field's default (the flag itself defaults to None: the dataclass decides)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None or value == []:
        return ""
    if isinstance(value, bool):
        value = "on" if value else "off"
    elif isinstance(value, list):
        value = " ".join(map(str, value))
    return f" [default: {value}]"


def config_options(cls):
    """Decorator: one --flag per dataclass field, help from the field's metadata; plus --config YAML."""

    def deco(fn):
        fn = field_options(cls)(fn)
        return click.option("--config", "config_file", type=click.Path(), help="YAML file with these fields.")(fn)

    return deco


def field_options(cls):
    """Decorator: one --flag per dataclass field (default None: the dataclass decides), help from its metadata."""
    hints = typing.get_type_hints(cls)

    def deco(fn):
        for f in reversed(dataclasses.fields(cls)):
            name = "--" + f.name.replace("_", "-")
            tp = hints[f.name]
            helptext = f.metadata.get("help", "") + _shown_default(f)
            if tp is bool:
                fn = click.option(f"{name}/--no-{f.name.replace('_', '-')}", default=None, help=helptext)(fn)
            elif typing.get_origin(tp) is list:
                fn = click.option(name, multiple=True, default=(), help=helptext + " (repeatable)")(fn)
            else:
                fn = click.option(name, type=_click_type(tp), default=None, help=helptext)(fn)
        return fn

    return deco


def make_config(cls, section: str, config_file: str | None, flags: dict):
    """Defaults < YAML (--config, whole file or its `section`) < flags given on the command line."""
    values = {}
    where = section
    if config_file:
        import yaml

        try:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
        except OSError as e:
            raise PotstillError(f"cannot read: {e.strerror}", where=config_file) from None
        values.update(data.get(section, data) if isinstance(data, dict) else {})
        where = config_file
    for k, v in flags.items():
        if v is None or v == ():
            continue
        values[k] = list(v) if isinstance(v, tuple) else v
    return build(cls, values, where)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="potstill")
def app():
    """potstill: distil language models, and tell model owners when theirs was distilled."""


@app.command()
@click.option("--run-dir", default="runs/demo", show_default=True, help="Where the run's artefacts go.")
@click.option("--set", "overrides", multiple=True, help="Override a recipe field: stage.field=value.")
@click.option("--minutes", default=10.0, show_default=True, type=float,
              help="Wall-clock budget: measure this machine, size every stage to fit (fields given with --set are "
                   "kept); 0 runs the recipe as written.")
def demo(run_dir, overrides, minutes):
    """Distil the embedded teacher into a 14-of-30-layer student and print the comparison table."""
    from potstill.pipeline import builtin_recipe

    _run(builtin_recipe("demo"), overrides, run_dir, "potstill demo", minutes)


@app.command()
@click.argument("recipe", type=click.Path())
@click.option("--run-dir", default=None, help="Where the run's artefacts go (default: the recipe's run_dir).")
@click.option("--set", "overrides", multiple=True, help="Override a recipe field: stage.field=value.")
@click.option("--minutes", default=0.0, show_default=True, type=float,
              help="Wall-clock budget: measure this machine and size every stage to fit (0: the recipe as written).")
def run(recipe, run_dir, overrides, minutes):
    """Run every stage of a YAML recipe (generate -> train -> eval)."""
    if not Path(recipe).exists():
        raise PotstillError("no such recipe file", where=recipe)
    from potstill.agent.pipeline import is_agent_recipe

    if is_agent_recipe(recipe):  # agent_generate -> train -> agent_eval (agent/pipeline.py)
        from potstill.agent.pipeline import run_agent_recipe
        from potstill.cli_agent import show

        result = run_agent_recipe(recipe, list(overrides), run_dir)
        show(result["eval"], f"potstill run {recipe}")
        click.echo(f"artefacts: {result['run_dir']} (agentcap/, student/, eval/results.json, eval/table.md); "
                   f"time: {', '.join(f'{k} {v:.0f}s' for k, v in result['timings'].items())}")
        return
    _run(recipe, overrides, run_dir, f"potstill run {recipe}", minutes)


def _run(recipe, overrides, run_dir, title, minutes=0.0):
    from rich.console import Console

    from potstill.evaluate import rich_table
    from potstill.pipeline import run_budgeted, run_recipe

    if minutes < 0:
        raise PotstillError(f"--minutes must be >= 0, not {minutes}")
    if minutes:
        result = run_budgeted(recipe, minutes, list(overrides), run_dir)
    else:
        result = run_recipe(recipe, list(overrides), run_dir)
    t = result["timings"]
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(rich_table(result["eval"]["rows"], title=title))
    cap = result["capture"]
    console.print(
        f"capture: {cap.get('counts', {}).get('rows')} rows, {cap.get('bytes_per_completion_token')} bytes/completion token, "
        f"generation {cap['this_run']['completion_tokens_per_s']} tok/s | "
        f"training {result['train']['train_tokens_per_s']:.0f} tok/s | "
        f"time: generate {t['generate_s']:.0f}s, train {t['train_s']:.0f}s, eval {t['eval_s']:.0f}s"
    )
    if result.get("plan"):
        from potstill.plan import format_plan

        console.print(format_plan(result["plan"]), markup=False, highlight=False)
    if result["eval"].get("config", {}).get("heldout_prompts") == "builtin:heldout_v1":  # the study's held-out set
        from potstill.studies.curve import curve_line

        console.print(curve_line(result["eval"]["rows"], time.process_time() / 60), markup=False, highlight=False)
    console.print(f"artefacts: {result['run_dir']} (capture/, student/, eval.json, eval.md, metrics"
                  + (", plan.json)" if result.get("plan") else ")"))


@app.command()
@config_options(GenerateConfig)
def generate(config_file, **flags):
    """Capture a teacher's completions and top-k log-probs into a Parquet dataset (resumable)."""
    from potstill.capture.generate import generate as run_generate

    run_generate(make_config(GenerateConfig, "generate", config_file, flags))


@app.command()
@config_options(TrainConfig)
def train(config_file, **flags):
    """Train a student on a capture with a distillation loss; saves a Hugging Face model dir."""
    from potstill.train.loop import train as run_train

    cfg = make_config(TrainConfig, "train", config_file, flags)
    teacher = None
    if cfg.mode != "offline":  # online modes are handed their live teacher, built once here
        from potstill.teachers.hf import HFTeacher

        teacher = HFTeacher.load(cfg.teacher, dtype=cfg.teacher_dtype)
    run_train(cfg, teacher=teacher)


@app.command("eval")
@config_options(EvalConfig)
def eval_cmd(config_file, **flags):
    """Measure teacher and students on a capture's held-out split; writes eval.json and eval.md."""
    from rich.console import Console

    from potstill.evaluate import rich_table, run_eval

    result = run_eval(make_config(EvalConfig, "eval", config_file, flags))
    Console(width=None if sys.stdout.isatty() else 200).print(rich_table(result["rows"], title="potstill eval"))


@app.group()
def bench():
    """Benchmarks that write JSON and compare against anchors in the same run."""


@bench.command("codec")
@click.option("--capture", default=None, help="Measure on a real capture's top-k instead of synthetic distributions.")
@click.option("--positions", default=4096, show_default=True, help="Synthetic token positions.")
@click.option("--vocab", default=49152, show_default=True, help="Synthetic vocabulary size.")
@click.option("--k", default=20, show_default=True, help="Top-k kept per token (cap for 'mass').")
@click.option("--out", default="runs/bench/codec.json", show_default=True, help="JSON results.")
def bench_codec_cmd(capture, positions, vocab, k, out):
    """Bytes per completion token and fidelity cost (KL) of each top-k codec."""
    from potstill.bench.codec import bench_codec, format_table

    click.echo(format_table(bench_codec(n_positions=positions, vocab=vocab, k=k, out_json=out, source=capture)))
    click.echo(f"wrote {out}")


@bench.command("monitor")
@click.option("--train-seed", default=1, show_default=True, help="Simulated traffic the weights are fitted on.")
@click.option("--test-seed", default=2, show_default=True, help="Held-out simulated traffic they are measured on.")
@click.option("--fitted", is_flag=True, help="Measure the weights in guard/monitor.py instead of refitting.")
@click.option("--out", default="runs/bench/monitor.json", show_default=True, help="JSON results (+ .md table).")
def bench_monitor_cmd(train_seed, test_seed, fitted, out):
    """Calibrate the extraction monitor on simulated traffic; ROC AUC, precision, recall per key and campaign."""
    from potstill.bench.monitor import bench_monitor, format_table

    click.echo(format_table(bench_monitor(train_seed, test_seed, out_json=out, fitted=fitted)))
    click.echo(f"wrote {out}")


@bench.command("generate")
@config_options(BenchGenerateConfig)
def bench_generate_cmd(config_file, **flags):
    """Completion tokens/s: naive and batched model.generate against potstill's engine."""
    from potstill.bench.generate import bench_generate, format_table
    from potstill.capture.prompts import load_prompts
    from potstill.teachers.hf import HFTeacher
    from potstill.utils import quiet_transformers

    cfg = make_config(BenchGenerateConfig, "bench_generate", config_file, flags)
    quiet_transformers()
    result = bench_generate(HFTeacher.load(cfg.teacher, dtype=cfg.dtype), load_prompts(cfg.prompts)[: cfg.n or None],
                            cfg.max_new_tokens, cfg.batch_size, cfg.k, naive_prompts=cfg.naive_prompts, out_json=cfg.out,
                            quantize=cfg.quantize)
    click.echo(format_table(result))
    click.echo(f"wrote {cfg.out}")


@bench.command("serve")
@config_options(BenchServeConfig)
def bench_serve_cmd(config_file, **flags):
    """Completion tokens/s served over HTTP to concurrent clients with distinct seeds vs the local engine."""
    from potstill.bench.serve import bench_serve, format_table
    from potstill.capture.prompts import load_prompts
    from potstill.teachers.hf import HFTeacher
    from potstill.utils import quiet_transformers

    cfg = make_config(BenchServeConfig, "bench_serve", config_file, flags)
    quiet_transformers()
    result = bench_serve(HFTeacher.load(cfg.teacher, dtype=cfg.dtype), load_prompts(cfg.prompts)[: cfg.n],
                         cfg.max_new_tokens, cfg.batch_size, cfg.clients, cfg.rounds, out_json=cfg.out)
    click.echo(format_table(result))
    click.echo(f"wrote {cfg.out}")


@bench.command("watermark", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_watermark_cmd(args):
    """TPR/FPR by length and the perplexity cost of the watermark (--help for its flags)."""
    from potstill.bench.watermark import main as bench_main
    from potstill.utils import quiet_transformers

    quiet_transformers()
    bench_main(list(args))


# verbs that live in their own modules, each with a `register(app)`
for _module in ("cli_guard", "cli_case", "cli_report", "cli_tasks", "cli_study", "cli_agent"):
    __import__(f"potstill.{_module}", fromlist=["register"]).register(app)


@bench.command("steal")
@config_options(StealBenchConfig)
def bench_steal_cmd(config_file, **flags):
    """Queries an attacker needs to read the watermark's green lists off the API, and student detection."""
    from potstill.bench.steal import bench_steal, format_table

    cfg = make_config(StealBenchConfig, "steal", config_file, flags)
    click.echo(format_table(bench_steal(cfg, log=lambda m: click.echo(m, err=True))))
    click.echo(f"wrote {cfg.out}")


@bench.command("train")
@config_options(BenchTrainConfig)
def bench_train_cmd(config_file, **flags):
    """Training tokens/s, peak memory and held-out KL: potstill's trainer vs TRL's GKDTrainer."""
    import time

    from rich.console import Console

    from potstill.bench.train import bench_train, rich_table

    cfg = make_config(BenchTrainConfig, "bench_train", config_file, flags)
    t0 = time.perf_counter()
    result = bench_train(cfg, log=lambda msg: click.echo(msg, err=True))
    Console(width=None if sys.stdout.isatty() else 160).print(rich_table(result))
    click.echo(f"wrote {cfg.out}, {result['artefacts']['markdown']}, {result['artefacts']['plot']} "
               f"({time.perf_counter() - t0:.0f}s in all)")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
