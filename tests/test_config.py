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


def _field_default(f):
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _derived_configs():
    """Every command whose flags are derived from a config dataclass (config_options), by command path."""
    from potstill.agent.evaluate import AgentEvalConfig
    from potstill.agent.generate import AgentGenerateConfig
    from potstill.bench.config import BenchGenerateConfig, BenchServeConfig
    from potstill.bench.train import BenchTrainConfig
    from potstill.evaluate.report_config import ReportConfig
    from potstill.guard.case import CaseConfig
    from potstill.guard.suspect import DetectConfig
    from potstill.studies.agent_anchor import AgentAnchorConfig
    from potstill.studies.antidistill import AntidistillStudyConfig
    from potstill.studies.budget import BudgetConfig
    from potstill.studies.collapse import CollapseConfig
    from potstill.studies.detect_power import DetectPowerConfig
    from potstill.studies.transfer import TransferConfig

    return {("generate",): GenerateConfig, ("train",): TrainConfig, ("eval",): EvalConfig,
            ("report",): ReportConfig, ("study", "transfer"): TransferConfig, ("study", "collapse"): CollapseConfig,
            ("study", "budget"): BudgetConfig, ("study", "agent-anchor"): AgentAnchorConfig,
            ("study", "detect-power"): DetectPowerConfig, ("study", "antidistill"): AntidistillStudyConfig,
            ("bench", "train"): BenchTrainConfig, ("bench", "generate"): BenchGenerateConfig,
            ("bench", "serve"): BenchServeConfig,
            ("agent", "generate"): AgentGenerateConfig, ("agent", "eval"): AgentEvalConfig, ("case",): CaseConfig,
            ("detect",): DetectConfig}


def test_cli_defaults_are_the_configs():
    """One default per setting: every flag of every command that maps to a config field takes the field's
    default (or None: the config decides) and, where derived, the field's help."""
    import dataclasses

    from potstill.cli import app
    from potstill.guard.serve import ServeConfig
    from potstill.guard.watermark import WatermarkConfig

    derived = _derived_configs()
    # commands that declare options themselves: (config, {flag: field}); a flag named like a field maps to it
    declared = {("serve",): (ServeConfig, {"rpm": "default_rpm", "tpm": "default_tpm", "name": "model_name",
                                           "keys_db": "keys_url", "log_db": "querylog_url"}),
                ("bench", "codec"): (GenerateConfig, {"k": "top_k"})}
    watermark = {f.name: f for f in dataclasses.fields(WatermarkConfig)}
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
        config, renamed = declared.get(path, (None, {}))
        fields = {f.name: f for f in dataclasses.fields(config)} if config else {}
        for name, p in params.items():
            f = None if name in NOT_THE_SAME_SETTING else fields.get(renamed.get(name, name))
            if f is not None and p.default not in (None, ()):  # () is an omitted repeatable flag
                assert p.default == _field_default(f), (path, name, p.default, _field_default(f))
                checked += 1
            if name in watermark and name != "key":  # --gamma, --delta, --context-width, --self-hash
                if p.default is None:  # a config's flag (config_options): the field derives WatermarkConfig's
                    assert p.help.startswith(watermark[name].metadata["help"]), (path, name)
                else:
                    assert p.default == watermark[name].default and p.help == watermark[name].metadata["help"], (path, name)
                checked += 1
    assert checked > 200


# a field named like a stage setting but meaning something else (the reason is the exemption)
NOT_THE_SAME_SETTING = {
    "out": "every artefact has its own place",
    "capture": "None here means 'make one'; TrainConfig's capture is the input directory",
    "tasks": "agent task files, not EvalConfig's multiple-choice task files",
    "CaseConfig.samples": "sample requests shown in the case, not completions per prompt",
    "DetectConfig.tokenizer": "the suspect's generations' tokenizer, not the map of an HTTP teacher's tokens",
    "DetectConfig.top_k": "the suspect's tokens read per scored position, not a capture's stored top-k",
    "AntidistillStudyConfig.proxy": "a student architecture built from the teacher, not a proxy model's directory",
}


def test_config_fields_are_declared_once():
    """A config that reuses a stage setting (same name, or derive(...) under another name) derives it from
    GenerateConfig/TrainConfig/EvalConfig: same help, and the same default unless it states its own."""
    import dataclasses

    from potstill.config import derive

    stage_fields = {f.name for c in (GenerateConfig, TrainConfig, EvalConfig) for f in dataclasses.fields(c)}
    overrides = 0
    for cls in set(_derived_configs().values()) - {GenerateConfig, TrainConfig, EvalConfig}:
        for f in dataclasses.fields(cls):
            origin = f.metadata.get("derived_from")
            if origin is None:
                exempt = f.name in NOT_THE_SAME_SETTING or f"{cls.__name__}.{f.name}" in NOT_THE_SAME_SETTING
                assert f.name not in stage_fields or exempt, (
                    f"{cls.__name__}.{f.name} re-declares a stage setting: use config.derive")
                continue
            source, name = origin
            src = next(g for g in dataclasses.fields(source) if g.name == name)
            assert f.metadata["help"].startswith(src.metadata["help"]), (cls.__name__, f.name)
            same = _field_default(f) == _field_default(src)
            assert same != f.metadata["overrides"], (cls.__name__, f.name)  # a changed default is a stated one
            overrides += not same
    assert overrides >= 10  # the studies' and benches' own (smaller, faster) choices, each stated
    # and derive() refuses a field that does not exist
    with pytest.raises(TypeError):
        derive(TrainConfig, "no_such_field")


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
