"""Configs: values reach the stages in their declared types, whatever they came from (YAML, --set, --config)."""

from __future__ import annotations

import pytest

from potstill.config import EvalConfig, GenerateConfig, TrainConfig, build, load_recipe
from potstill.errors import PotstillError


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-4` as the string "1e-4"
    path = _recipe(tmp_path, "train:\n  lr: 1e-4\n  max_steps: 1e1\n  grad_clip: 1\n")
    data = load_recipe(path)
    assert data["train"]["lr"] == "1e-4"  # what YAML gives
    cfg = build(TrainConfig, data["train"], f"{path}: train")
    assert cfg.lr == 1e-4 and type(cfg.lr) is float
    assert cfg.max_steps == 10 and type(cfg.max_steps) is int
    assert cfg.grad_clip == 1.0 and type(cfg.grad_clip) is float


def test_set_override_is_typed(tmp_path):
    path = _recipe(tmp_path, "train:\n  lr: 3.0e-4\n")
    data = load_recipe(path, ["train.lr=3e-4", "train.resume=true", "generate.max_prompts=5"])
    cfg = build(TrainConfig, data["train"], "x")
    assert cfg.lr == 3e-4 and type(cfg.lr) is float and cfg.resume is True
    gen = build(GenerateConfig, {"prompts": "p.jsonl", **data["generate"]}, "x")
    assert gen.max_prompts == 5 and gen.max_new_tokens == 128


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("lr", "fast", "lr"),
        ("max_steps", 2.5, "max_steps"),
        ("max_steps", True, "max_steps"),
        ("resume", "maybe", "resume"),
        ("bf16", True, "bf16"),  # YAML 1.1 reads a bare `on` as true: say so rather than pass True on
        ("chunk_size", "many", "chunk_size"),
        ("student", ["a"], "student"),
    ],
)
def test_bad_value_is_one_line_naming_file_and_field(tmp_path, field, value, says):
    path = tmp_path / "recipe.yaml"
    with pytest.raises(PotstillError) as e:
        build(TrainConfig, {field: value}, f"{path}: train")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and says in msg


def test_optional_and_lists():
    cfg = build(TrainConfig, {"chunk_size": None, "sample_temperature": "1e0"}, "x")
    assert cfg.chunk_size is None and cfg.sample_temperature == 1.0
    ev = build(EvalConfig, {"students": ("a", "b"), "tasks": ["t"]}, "x")
    assert ev.students == ["a", "b"] and ev.tasks == ["t"]
    with pytest.raises(PotstillError, match="students"):
        build(EvalConfig, {"students": "a"}, "x")
    with pytest.raises(PotstillError, match="students"):
        build(EvalConfig, {"students": [{"a": 1}]}, "x")


def test_cli_set_reaches_training_as_float(tmp_path):
    """`potstill run r.yaml --set train.lr=3e-4`: the pipeline builds the train config with a float lr."""
    from potstill.pipeline import resolve_recipe

    path = _recipe(tmp_path, "generate:\n  prompts: builtin:seed_tasks\ntrain:\n  max_steps: 1\n")
    _gen, train_cfg, _ev = resolve_recipe(path, ["train.lr=3e-4"], str(tmp_path / "run"))
    assert train_cfg.lr == 3e-4 and type(train_cfg.lr) is float


def _modules_after(code: str) -> set[str]:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_train_config_does_not_import_torch():
    """config.py used to import train/online.py (torch) to check the modes: a config is plain data."""
    mods = _modules_after("from potstill.config import TrainConfig\nTrainConfig(mode='on-policy', lmbda=0.5)")
    assert "torch" not in mods and "potstill.train.online" not in mods


def test_help_imports_neither_torch_nor_numpy():
    mods = _modules_after(
        "import sys\nfrom potstill.cli import app\nsys.argv = ['potstill', '--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass"
    )
    assert "potstill.cli_study" in mods  # every verb was registered
    assert "torch" not in mods and "numpy" not in mods, sorted(m for m in mods if m in ("torch", "numpy"))


def _commands(group, path=()):
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_cli_defaults_are_the_configs():
    """One default per setting: a flag mapped to a config field takes the field's default and help."""
    import dataclasses

    from potstill.cli import app
    from potstill.evaluate.report_config import ReportConfig
    from potstill.guard.serve import ServeConfig
    from potstill.guard.watermark import WatermarkConfig
    from potstill.studies.collapse import CollapseConfig
    from potstill.studies.transfer import TransferConfig

    derived = {("generate",): GenerateConfig, ("train",): TrainConfig, ("eval",): EvalConfig,
               ("report",): ReportConfig, ("study", "transfer"): TransferConfig, ("study", "collapse"): CollapseConfig}
    # flag -> (config, field) where the CLI declares the option itself; serve --max-batch-size: issue 13, other branch
    declared = {"gamma": (WatermarkConfig, "gamma"), "delta": (WatermarkConfig, "delta"),
                "context_width": (WatermarkConfig, "context_width"), "self_hash": (WatermarkConfig, "self_hash"),
                "host": (ServeConfig, "host"), "port": (ServeConfig, "port"),
                "max_tokens_cap": (ServeConfig, "max_tokens_cap")}
    checked = 0
    for path, cmd in _commands(app):
        params = {p.name: p for p in cmd.params}
        cls = derived.get(path)
        if cls is not None:
            for f in dataclasses.fields(cls):
                p = params[f.name]
                assert p.default in (None, ()), (path, f.name, p.default)  # omitted flag -> the dataclass default
                assert p.help.startswith(f.metadata["help"]), (path, f.name)
                checked += 1
        for name, (config, field_name) in declared.items():
            if name in params:
                f = next(f for f in dataclasses.fields(config) if f.name == field_name)
                assert params[name].default == f.default, (path, name, params[name].default, f.default)
                if config is WatermarkConfig:
                    assert params[name].help == f.metadata["help"], (path, name)
                checked += 1
    assert checked > 100


def test_run_with_bad_value_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    recipe = _recipe(tmp_path, "generate:\n  prompts: builtin:seed_tasks\ntrain:\n  lr: fast\n")
    res = subprocess.run([sys.executable, "-m", "potstill.cli", "run", str(recipe), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert str(recipe) in lines[0] and "train" in lines[0] and "lr" in lines[0] and "'fast'" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written for a recipe that does not resolve
