"""The CLI: help is instant, bad input is one line with exit code 2 and nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess  # every test here starts the CLI in a child process


def potstill(*args, **kw):
    return subprocess.run([sys.executable, "-m", "potstill.cli", *args], capture_output=True, text=True, timeout=300, **kw)


def test_help_lists_verbs():
    out = potstill("--help")
    assert out.returncode == 0
    for verb in ("demo", "generate", "train", "eval", "run"):
        assert verb in out.stdout


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"instruction": "hi"}\n{not json\n', "prompts.jsonl:2"),
        ('{"instruction": "hi"}\n{"input": "no instruction"}\n', "prompts.jsonl:2"),
    ],
)
def test_bad_prompts_one_line_exit_2(tmp_path, tiny_model_dir, content, expected):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    out_dir = tmp_path / "cap"
    res = potstill("generate", "--teacher", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out_dir))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert not out_dir.exists() or not list(out_dir.glob("shard-*"))


def test_missing_prompts_file(tmp_path, tiny_model_dir):
    res = potstill("generate", "--teacher", str(tiny_model_dir), "--prompts", str(tmp_path / "nope.jsonl"),
                   "--out", str(tmp_path / "cap"))
    assert res.returncode == 2 and "nope.jsonl" in res.stderr


def test_corrupt_shard_refused(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Say {w}."}) + "\n" for w in ["one", "two", "three", "four"]))
    cap = tmp_path / "cap"
    res = potstill("generate", "--teacher", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(cap),
                   "--max-new-tokens", "6", "--top-k", "4", "--dtype", "float32")
    assert res.returncode == 0, res.stderr
    shard = sorted(cap.glob("shard-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = potstill("train", "--capture", str(cap), "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "s"),
                   "--max-steps", "1")
    assert res.returncode == 2 and shard.name in res.stderr and "sha256" in res.stderr
    assert not (tmp_path / "s" / "model.safetensors").exists()


def test_bad_recipe_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_stepz: 3\n")
    res = potstill("run", str(recipe))
    assert res.returncode == 2 and "max_stepz" in res.stderr


def test_every_study_command_names_functions_that_exist():
    """The study commands are one table (cli_study._STUDIES): each runner / table / lines reference resolves."""
    from potstill.cli_study import _STUDIES, _study_function

    for name, cls, _section, runner, table, lines, files, _doc in _STUDIES:
        for ref in filter(None, (runner, table, lines)):
            assert callable(_study_function(ref)), (name, ref)
        assert cls.__dataclass_fields__["out"] and files.split()[0] == "results.json"
