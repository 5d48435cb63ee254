"""Checkable tasks where a Python tool helps: built-in generators and JSONL task files.

`load_tasks("builtin:potstill_tools")` generates tasks from templates with a seed (big-number
arithmetic, date differences, unit conversion, strings, lists, divisors and primes, statistics),
each with a checker. Splits: templates in HELDOUT_TEMPLATES are held out whole ("heldout_template",
unseen kinds of task); of the rest, a seeded fraction of instances is "heldout"; the others "train".

A task file is JSONL, one task per line:
    {"id": "t1", "kind": "arithmetic", "question": "...", "answer": "42",
     "checker": {"type": "number", "tol": 1e-6}, "split": "train"}
Checker types: exact (case/space-insensitive), number (relative/absolute `tol`), set, list (numbers
in the answer, order ignored / kept), regex (`pattern`, full match), python (`test`: code that sees
ANSWER as a string and must exit 0; run in the sandbox).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from potstill.errors import PotstillError
from potstill.utils import stable_hash

CHECKERS = ("exact", "number", "set", "list", "regex", "python")
SPLITS = ("train", "heldout", "heldout_template")
HELDOUT_TEMPLATES = ("weekday", "binary", "stdev")
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass
class Task:
    """One task: the question, a reference answer and how to check an answer."""

    id: str
    kind: str
    template: str
    question: str
    answer: str
    checker: dict[str, Any] = field(default_factory=lambda: {"type": "exact"})
    split: str = "train"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- checking ------------------------------------------------------------------------------------


def _numbers(text: str) -> list[float]:
    return [float(x) for x in NUMBER_RE.findall(text.replace(",", " ").replace("_", ""))]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".").strip("`'\"")).lower()


def check(task: Task, answer: str | None, sandbox=None) -> bool:
    """Whether `answer` (the text after "Final answer:") solves `task`."""
    if answer is None:
        return False
    c = task.checker
    kind = c.get("type", "exact")
    if kind == "exact":
        return _norm(answer) == _norm(task.answer)
    if kind == "number":
        got = _numbers(answer.replace(",", ""))
        if len(got) != 1:
            return False
        want = float(task.answer)
        return math.isclose(got[0], want, rel_tol=float(c.get("tol", 1e-6)), abs_tol=float(c.get("abs_tol", 1e-9)))
    if kind in ("set", "list"):
        got, want = _numbers(answer), _numbers(task.answer)
        return sorted(got) == sorted(want) if kind == "set" else got == want
    if kind == "regex":
        return re.fullmatch(c["pattern"], answer.strip()) is not None
    if kind == "python":
        if sandbox is None:
            raise PotstillError(f"task {task.id}: a python checker needs the sandbox")
        return sandbox.run(f"ANSWER = {answer.strip()!r}\n{c['test']}").ok
    raise PotstillError(f"task {task.id}: unknown checker {kind!r}")


# -- templates -----------------------------------------------------------------------------------

Template = Callable[[random.Random], tuple[str, str, dict[str, Any]]]
WORDS = "apple banana cherry delta echo falcon garden harbor island jungle kettle lemon mango".split()


def _bigmul(r: random.Random):
    a, b = r.randrange(10**11, 10**16), r.randrange(10**11, 10**16)
    return f"What is {a} * {b}?", str(a * b), {"type": "exact"}


def _powmod(r: random.Random):
    a, b, m = r.randrange(2, 10**6), r.randrange(100, 10**5), r.randrange(1000, 10**7)
    return f"What is {a} raised to the power {b}, modulo {m}?", str(pow(a, b, m)), {"type": "exact"}


def _crt(r: random.Random):
    m1, m2 = r.choice([7, 11, 13]), r.choice([17, 19, 23])
    a1, a2 = r.randrange(m1), r.randrange(m2)
    test = (f"x = int(ANSWER.strip())\nassert 1000 <= x <= 9999, x\nassert x % {m1} == {a1} and x % {m2} == {a2}")
    x = next(x for x in range(1000, 10000) if x % m1 == a1 and x % m2 == a2)
    return (f"Give one integer x with 1000 <= x <= 9999, x mod {m1} = {a1} and x mod {m2} = {a2}.", str(x),
            {"type": "python", "test": test})


def _date(r: random.Random) -> dt.date:
    return dt.date(1900, 1, 1) + dt.timedelta(days=r.randrange(0, 200 * 365))


def _datediff(r: random.Random):
    a, b = sorted([_date(r), _date(r)])
    return f"How many days are there from {a.isoformat()} to {b.isoformat()}?", str((b - a).days), {"type": "number"}


def _weekday(r: random.Random):
    d = _date(r)
    return f"On which day of the week was {d.isoformat()}? Answer with the English name.", d.strftime("%A"), {
        "type": "exact"}


UNITS = [("miles", "kilometres", 1.609344), ("pounds", "kilograms", 0.45359237), ("inches", "centimetres", 2.54),
         ("US gallons", "litres", 3.785411784), ("nautical miles", "metres", 1852.0)]


def _units(r: random.Random):
    if r.random() < 0.25:
        f = round(r.uniform(-40, 250), 1)
        return (f"Convert {f} degrees Fahrenheit to Celsius (two decimals).", f"{(f - 32) * 5 / 9:.2f}",
                {"type": "number", "tol": 1e-3, "abs_tol": 0.01})
    src, dst, factor = r.choice(UNITS)
    x = round(r.uniform(1, 5000), 2)
    return (f"Convert {x} {src} to {dst} (two decimals).", f"{x * factor:.2f}",
            {"type": "number", "tol": 1e-3, "abs_tol": 0.01})


def _count(r: random.Random):
    text = " ".join(r.choice(WORDS) for _ in range(r.randrange(12, 30)))
    ch = r.choice("aeilnor")
    return f"How many times does the letter '{ch}' occur in: \"{text}\"?", str(text.count(ch)), {"type": "number"}


def _reverse(r: random.Random):
    words = [r.choice(WORDS) for _ in range(r.randrange(4, 9))]
    text = " ".join(words)
    if r.random() < 0.5:
        return f"Reverse the order of the words in: \"{text}\"", " ".join(reversed(words)), {"type": "exact"}
    return f"Write \"{text}\" backwards, character by character.", text[::-1], {"type": "exact"}


def _sort(r: random.Random):
    xs = [r.randrange(-999, 9999) for _ in range(r.randrange(8, 16))]
    return f"Sort these numbers in ascending order: {xs}", str(sorted(xs)), {"type": "list"}


def _filter(r: random.Random):
    xs = [r.randrange(1, 2000) for _ in range(r.randrange(10, 20))]
    k = r.choice([3, 4, 6, 7, 9])
    kept = [x for x in xs if x % k == 0] or [0]
    if kept == [0]:
        xs.append(k * 11)
        kept = [k * 11]
    return f"From {xs}, list (in order) the numbers divisible by {k}.", str(kept), {"type": "list"}


def _divisors(r: random.Random):
    n = r.randrange(100, 5000)
    return f"List all positive divisors of {n}.", str([d for d in range(1, n + 1) if n % d == 0]), {"type": "set"}


def _primes(r: random.Random):
    a = r.randrange(100, 20000)
    b = a + r.randrange(30, 120)
    ps = [p for p in range(a, b + 1) if all(p % q for q in range(2, int(p**0.5) + 1))]
    return f"List the prime numbers between {a} and {b} inclusive.", str(ps), {"type": "set"}


def _mean(r: random.Random):
    xs = [round(r.uniform(0, 1000), 1) for _ in range(r.randrange(8, 15))]
    if r.random() < 0.5:
        return (f"What is the mean of {xs}? (two decimals)", f"{statistics.mean(xs):.2f}",
                {"type": "number", "tol": 1e-4, "abs_tol": 0.01})
    return f"What is the median of {xs}?", f"{statistics.median(xs):.2f}", {"type": "number", "tol": 1e-6}


def _stdev(r: random.Random):
    xs = [r.randrange(0, 100) for _ in range(r.randrange(6, 12))]
    return (f"What is the population standard deviation of {xs}? (three decimals)", f"{statistics.pstdev(xs):.3f}",
            {"type": "number", "tol": 1e-3, "abs_tol": 0.001})


def _binary(r: random.Random):
    n = r.randrange(1000, 10**6)
    return (f"Write {n} in binary (digits only, optional 0b prefix).", bin(n)[2:],
            {"type": "regex", "pattern": f"(0b)?{bin(n)[2:]}"})


TEMPLATES: dict[str, tuple[str, Template]] = {
    "bigmul": ("arithmetic", _bigmul), "powmod": ("arithmetic", _powmod), "crt": ("arithmetic", _crt),
    "datediff": ("dates", _datediff), "weekday": ("dates", _weekday), "units": ("units", _units),
    "count": ("strings", _count), "reverse": ("strings", _reverse), "binary": ("strings", _binary),
    "sort": ("lists", _sort), "filter": ("lists", _filter), "divisors": ("primes", _divisors),
    "primes": ("primes", _primes), "mean": ("statistics", _mean), "stdev": ("statistics", _stdev),
}


def builtin_tasks(n: int = 360, seed: int = 0, heldout: float = 0.2) -> list[Task]:
    """`n` tasks, round-robin over the templates, each from its own seeded generator."""
    names = list(TEMPLATES)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        kind, make = TEMPLATES[name]
        r = random.Random(f"{seed}:{name}:{i}")
        question, answer, checker = make(r)
        tid = f"{name}-{i:04d}"
        if name in HELDOUT_TEMPLATES:
            split = "heldout_template"
        else:
            split = "heldout" if int(stable_hash({"seed": seed, "id": tid})[:8], 16) / 16**8 < heldout else "train"
        out.append(Task(tid, kind, name, question, answer, checker, split))
    return out


def load_tasks(spec: str, seed: int = 0) -> list[Task]:
    """'builtin:potstill_tools' (optionally ':N') or a JSONL file; a bad line raises naming file:line."""
    if spec.startswith("builtin:potstill_tools"):
        rest = spec[len("builtin:potstill_tools"):]
        return builtin_tasks(int(rest[1:]) if rest.startswith(":") else 360, seed)
    if spec.startswith("builtin:"):
        raise PotstillError(f"unknown built-in task set {spec!r} (have builtin:potstill_tools)")
    path = Path(spec)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise PotstillError(f"cannot read task file: {e.strerror}", where=spec) from None
    tasks, seen = [], set()
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        task = _parse(line, f"{spec}:{no}")
        if task.id in seen:
            raise PotstillError(f"duplicate task id {task.id!r}", where=f"{spec}:{no}")
        seen.add(task.id)
        tasks.append(task)
    if not tasks:
        raise PotstillError("no tasks in file", where=spec)
    return tasks


def _parse(line: str, where: str) -> Task:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PotstillError(f"not valid JSON ({e.msg})", where=where) from None
    if not isinstance(obj, dict):
        raise PotstillError("a task must be a JSON object", where=where)
    for key in ("id", "question", "answer"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise PotstillError(f"field '{key}' must be a non-empty string", where=where)
    checker = obj.get("checker", {"type": "exact"})
    if not isinstance(checker, dict) or checker.get("type") not in CHECKERS:
        raise PotstillError(f"field 'checker.type' must be one of {', '.join(CHECKERS)}", where=where)
    if checker["type"] == "regex":
        try:
            re.compile(str(checker.get("pattern")))
        except re.error as e:
            raise PotstillError(f"field 'checker.pattern' is not a regex ({e})", where=where) from None
        if "pattern" not in checker:
            raise PotstillError("field 'checker.pattern' is missing", where=where)
    if checker["type"] == "python" and not isinstance(checker.get("test"), str):
        raise PotstillError("field 'checker.test' must be Python code", where=where)
    if checker["type"] == "number":
        try:
            float(obj["answer"])
            float(checker.get("tol", 0))
        except ValueError:
            raise PotstillError("a number checker needs a numeric 'answer' and 'tol'", where=where) from None
    split = obj.get("split", "train")
    if split not in SPLITS:
        raise PotstillError(f"field 'split' must be one of {', '.join(SPLITS)}", where=where)
    kind = str(obj.get("kind", "custom"))
    return Task(obj["id"], kind, str(obj.get("template", kind)), obj["question"], obj["answer"], checker, split)


def tasks_hash(tasks: list[Task]) -> str:
    """Hash of the task list (recorded in a capture's manifest: a resume must use the same tasks)."""
    return stable_hash([t.to_dict() for t in tasks])
