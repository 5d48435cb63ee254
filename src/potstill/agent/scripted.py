"""A scripted "teacher" that writes correct code for the built-in task templates, with a model's top-k.

It stands in for a strong tool-using teacher where none runs on this machine (the embedded 135M model
verifies ~0 trajectories): turn 1 writes a short plan and a ```python block that computes the answer
from the numbers in the question (per template, in `solution_code`); the code really runs in the
sandbox; turn 2 reads the tool's output from the context and writes "Final answer: <output>".
Every checker still runs, so a trajectory is verified only when the code's output passes it.

The log-probs come from a real local model teacher-forced on the scripted tokens (`HFTeacher.score_ids`),
so a capture of these trajectories has top-k targets for KD as well as text for SFT. Episodes go
through `EpisodeRunner` like a sampled teacher's, so the trajectory format and role mask are the same.
"""

from __future__ import annotations

import ast
import re

from potstill.agent.tasks import UNITS, Task
from potstill.errors import PotstillError
from potstill.lm.types import Completion

PLAN = "I will compute it with Python.\n```python\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _list(question: str) -> str:
    return question[question.index("[") : question.index("]") + 1]


def _quoted(question: str) -> str:
    return re.search(r'"(.*)"', question).group(1)


def solution_code(task: Task) -> str:
    """Python that prints the answer to a built-in task (by its template), from the question's text."""
    q, name = task.question, task.template
    if name == "bigmul":
        a, b = re.findall(r"\d+", q)
        return f"print({a} * {b})"
    if name == "powmod":
        a, b, m = re.findall(r"\d+", q)
        return f"print(pow({a}, {b}, {m}))"
    if name == "crt":
        lo, hi, m1, a1, m2, a2 = _ints(q)[:6]
        return f"print(next(x for x in range({lo}, {hi} + 1) if x % {m1} == {a1} and x % {m2} == {a2}))"
    if name in ("datediff", "weekday"):
        dates = re.findall(r"\d{4}-\d{2}-\d{2}", q)
        if name == "weekday":
            return f"from datetime import date\nprint(date.fromisoformat('{dates[0]}').strftime('%A'))"
        return (f"from datetime import date\n"
                f"print((date.fromisoformat('{dates[1]}') - date.fromisoformat('{dates[0]}')).days)")
    if name == "units":
        x = re.search(r"Convert (-?[\d.]+)", q).group(1)
        if "Fahrenheit" in q:
            return f"print(round(({x} - 32) * 5 / 9, 2))"
        factor = next(f for src, dst, f in UNITS if f" {src} to {dst}" in q)
        return f"print(round({x} * {factor}, 2))"
    if name == "count":
        ch = re.search(r"letter '(.)'", q).group(1)
        return f"text = {_quoted(q)!r}\nprint(text.count({ch!r}))"
    if name == "reverse":
        text = _quoted(q)
        if q.startswith("Reverse"):
            return f"print(' '.join(reversed({text!r}.split())))"
        return f"print({text!r}[::-1])"
    if name == "binary":
        return f"print(bin({_ints(q)[0]})[2:])"
    if name == "sort":
        return f"print(sorted({_list(q)}))"
    if name == "filter":
        k = _ints(q[q.index("]"):])[0]
        return f"xs = {_list(q)}\nprint([x for x in xs if x % {k} == 0])"
    if name == "divisors":
        n = _ints(q)[0]
        return f"n = {n}\nprint([d for d in range(1, n + 1) if n % d == 0])"
    if name == "primes":
        a, b = _ints(q)[:2]
        return f"print([p for p in range({a}, {b} + 1) if all(p % q for q in range(2, int(p ** 0.5) + 1))])"
    if name in ("mean", "stdev"):
        xs = _list(q)
        if name == "stdev":
            return f"import statistics\nprint(round(statistics.pstdev({xs}), 3))"
        if q.startswith("What is the mean"):
            return f"import statistics\nprint(round(statistics.mean({xs}), 2))"
        return f"import statistics\nprint(statistics.median({xs}))"
    raise PotstillError(f"task {task.id}: no scripted solution for template {name!r}")


class ScriptedSolver:
    """An HFTeacher-like teacher for `EpisodeRunner`: scripted turns, `scorer`'s teacher-forced top-k.

    `scorer` is a loaded local model (HFTeacher): its tokenizer, chat template and EOS are used, and
    it scores every scripted turn in the context the episode has reached.
    """

    def __init__(self, scorer, tasks: list[Task]):
        self.scorer = scorer
        self.tokenizer = scorer.tokenizer
        self.eos_ids = scorer.eos_ids
        self.by_question = {t.question: t for t in tasks}

    def identity(self) -> dict:
        return {**self.scorer.identity(), "name": f"scripted+{self.scorer.name}",
                "note": "scripted solutions (agent/scripted.py); top-k from the named model, teacher-forced"}

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.scorer.encode_chat(messages)

    def _turn(self, context: str) -> str:
        task = next((t for q, t in self.by_question.items() if q in context), None)
        if task is None:
            raise PotstillError("scripted solver: the context holds none of its tasks")
        outputs = context.split("Output:\n")
        if len(outputs) == 1:
            return PLAN + solution_code(task)
        last = outputs[-1].split("<|")[0].strip()  # up to the turn markers
        return f"The code printed the answer.\nFinal answer: {last.splitlines()[-1] if last else ''}"

    def complete_ids(self, prompt_ids: list[list[int]], params, seeds=None, batch_size: int = 16,
                     include_eos: bool = True, **_) -> list[Completion]:
        texts = [self._turn(self.tokenizer.decode(p)) for p in prompt_ids]
        ids = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        ids = [i + [self.eos_ids[0]] if t.startswith("The code") else i for i, t in zip(ids, texts, strict=True)]
        scored = self.scorer.score_ids(prompt_ids, ids, k=params.top_logprobs, batch_size=batch_size)
        return [Completion(c.prompt_ids, c.completion_ids, t, "stop", c.sampled_logprob, c.topk_ids, c.topk_logprobs)
                for c, t in zip(scored, texts, strict=True)]


def check_solutions(tasks: list[Task]) -> list[str]:
    """Ids of tasks whose scripted code does not even parse (a self-check for new templates)."""
    bad = []
    for t in tasks:
        try:
            ast.parse(solution_code(t))
        except (SyntaxError, PotstillError):
            bad.append(t.id)
    return bad
