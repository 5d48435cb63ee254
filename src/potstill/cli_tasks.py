"""Task verbs of the CLI: `potstill eval-harness-task` (an lm-evaluation-harness copy of a potstill task).

    potstill eval-harness-task --out runs/harness                   # builtin:potstill_mc
    lm_eval --model hf --model_args pretrained=runs/student --tasks potstill_mc --include_path runs/harness
"""

from __future__ import annotations

import click


def register(app: click.Group) -> None:
    """Attach the task verbs to the main CLI group."""

    @app.command("eval-harness-task")
    @click.option("--out", required=True, help="Directory for the task YAML and its items (JSONL).")
    @click.option("--tasks", "spec", default="builtin:potstill_mc", show_default=True,
                  help="Multiple-choice task JSONL file or builtin:NAME.")
    @click.option("--name", default=None, help="lm-eval task name (default: the file stem / built-in name).")
    def eval_harness_task(out, spec, name):
        """Write an lm-eval task that scores a potstill multiple-choice task exactly as `potstill eval` does."""
        from potstill.evaluate.tasks import write_harness_task

        path = write_harness_task(out, spec, name)
        click.echo(f"wrote {path}")
        click.echo(f"lm_eval --model hf --model_args pretrained=MODEL_DIR --tasks {path.stem} "
                   f"--include_path {path.parent}")
