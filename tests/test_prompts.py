"""Prompt loading (every format, every error names file:line:field), de-duplication, splits."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from potstill.capture.prompts import Prompt, assign_split, dedupe, load_prompts, prompts_hash
from potstill.errors import PotstillError

SEED_TASKS = Path("/work/shared/data/seed_tasks.jsonl")


def jsonl(tmp_path, *records, name="p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_every_record_format(tmp_path):
    path = jsonl(
        tmp_path,
        {"messages": [{"role": "system", "content": "be brief"}, *user("hi")], "output": "hello"},
        {"messages": [*user("2+2?"), {"role": "assistant", "content": "4"}]},
        "",
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Tell a joke.", "input": ""},
        {"instruction": "Classify.", "instances": [{"input": "a", "output": "x"}, {"input": "b", "output": "y"}]},
        {"prompt": "Why?", "reference": "Because."},
    )
    prompts = load_prompts(path)
    assert [p.messages for p in prompts] == [
        [{"role": "system", "content": "be brief"}, *user("hi")],
        user("2+2?"),  # a final assistant turn becomes the reference
        user("Translate.\n\nchat"),
        user("Tell a joke."),
        user("Classify.\n\na"),
        user("Classify.\n\nb"),
        user("Why?"),
    ]
    assert [p.reference for p in prompts] == ["hello", "4", "cat", None, "x", "y", "Because."]
    assert [p.where for p in prompts] == [f"{path}:{n}" for n in (1, 2, 4, 5, 6, 6, 7)]


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "A", "input": None, "output": "b"},
                                         {"instruction": "C", "input": "d", "output": None}]), path)
    prompts = load_prompts(path)
    assert [p.messages for p in prompts] == [user("A"), user("C\n\nd")]
    assert [p.reference for p in prompts] == ["b", None] and prompts[1].where == f"{path}:2"


@pytest.mark.skipif(not SEED_TASKS.exists(), reason="shared seed tasks not present")
def test_seed_tasks_file_and_builtin_copy():
    shared = load_prompts(SEED_TASKS)
    instances = sum(len(json.loads(line)["instances"]) for line in SEED_TASKS.read_text().splitlines() if line.strip())
    assert len(shared) == instances >= 175
    assert all(p.messages[0]["role"] == "user" and p.messages[0]["content"] for p in shared)
    builtin = load_prompts("builtin:seed_tasks")
    assert [p.messages for p in builtin] == [p.messages for p in shared]
    assert builtin[0].where == "builtin:seed_tasks:1"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"instruction": "a",', "p.jsonl:2: invalid JSON"),
        ('["a"]', "p.jsonl:2: expected a JSON object, got list"),
        ('{"input": "x"}', "p.jsonl:2: field 'instruction' missing"),
        ('{"instruction": 3}', "p.jsonl:2: field 'instruction' must be a string"),
        ('{"instruction": "a", "input": 5}', "p.jsonl:2: field 'input' must be a string"),
        ('{"instruction": "a", "instances": [{"input": "x"}, {"output": 1}]}',
         r"p.jsonl:2: field 'instances\[1\].output' must be a string"),
        ('{"instruction": "a", "instances": []}', "p.jsonl:2: field 'instances' must be a non-empty list"),
        ('{"messages": "hi"}', "p.jsonl:2: field 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', r"p.jsonl:2: field 'messages\[0\].content' missing"),
        ('{"messages": [{"role": "user", "content": 1}]}', r"p.jsonl:2: field 'messages\[0\].content' must be a string"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r"p.jsonl:2: field 'messages\[0\].role' is 'bot'"),
        ('{"messages": [{"role": "system", "content": "x"}]}', "p.jsonl:2: field 'messages' has no user message"),
        ('{"prompt": "x", "output": ["y"]}', "p.jsonl:2: field 'output' must be a string"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, line, message):
    path = jsonl(tmp_path, {"instruction": "fine"}, line)
    with pytest.raises(PotstillError, match=message) as err:
        load_prompts(path)
    assert str(err.value).startswith(str(path))


def test_unreadable_inputs(tmp_path):
    with pytest.raises(PotstillError, match="missing.jsonl: cannot read prompts"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"instruction": "a"}\n{"instruction": "\xff"}\n')
    with pytest.raises(PotstillError, match="bad.jsonl:2: not UTF-8"):
        load_prompts(bad)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(PotstillError, match="broken.parquet: cannot read Parquet"):
        load_prompts(broken)
    with pytest.raises(PotstillError, match="no built-in prompt set 'nope'"):
        load_prompts("builtin:nope")


def test_dedupe_counts_exact_and_near_and_keeps_the_first():
    long = "Write a short story about a lighthouse keeper who finds a message in a bottle on the shore."
    prompts = [
        Prompt(user(long), None, "a"),
        Prompt(user("  " + long.upper().replace(" ", "   ")), None, "b"),  # exact after folding
        Prompt(user(long.replace("short", "brief")), None, "c"),  # near: shingle Jaccard 0.83
        Prompt(user(long.replace("lighthouse keeper", "baker")), None, "d"),  # Jaccard 0.74: kept
        Prompt(user("Explain how a transistor works to a ten-year-old."), None, "e"),
        Prompt(user("What is 2+2?"), None, "f"),
        Prompt(user("What is 3+5?"), None, "g"),  # short and different: kept
    ]
    kept, n_exact, n_near = dedupe(prompts)
    assert (n_exact, n_near) == (1, 1)
    assert [p.where for p in kept][:1] == ["a"] and "b" not in [p.where for p in kept]
    assert "c" not in [p.where for p in kept]
    assert [p.where for p in kept] == ["a", "d", "e", "f", "g"]
    assert len(kept) + n_exact + n_near == len(prompts)
    assert dedupe([]) == ([], 0, 0)


def test_dedupe_scales_linearly():
    rng = random.Random(0)
    words = "alpha beta gamma delta story code poem explain list write summarise translate why how".split()
    prompts = [Prompt(user(" ".join(rng.choice(words) for _ in range(30))), None, str(i)) for i in range(2000)]
    kept, n_exact, n_near = dedupe(prompts + prompts[:100])
    assert n_exact == 100 and len(kept) + n_near == 2000


def test_assign_split_is_deterministic_and_order_free():
    prompts = [Prompt(user(f"prompt number {i}")) for i in range(200)]
    splits = assign_split(prompts, 0.1, seed=3)
    assert splits == assign_split(prompts, 0.1, seed=3)
    assert splits.count("heldout") == 20
    shuffled = list(range(200))
    random.Random(1).shuffle(shuffled)
    again = assign_split([prompts[i] for i in shuffled], 0.1, seed=3)
    assert [again[j] for j in range(200)] == [splits[i] for i in shuffled]
    assert assign_split(prompts, 0.1, seed=4) != splits
    assert assign_split(prompts[:2], 0.01, seed=0).count("heldout") == 1  # at least one held out
    assert assign_split(prompts[:2], 0.99, seed=0).count("train") == 1  # and at least one to train on
    assert assign_split(prompts, 0.0, seed=0) == ["train"] * 200
    assert assign_split(prompts[:1], 0.5, seed=0) == ["train"]
    with pytest.raises(PotstillError, match="held-out fraction"):
        assign_split(prompts, 1.5, seed=0)


def test_prompts_hash_is_stable_and_sensitive():
    a = [Prompt(user("x"), "y", "f:1"), Prompt(user("z"), None, "f:2")]
    b = [Prompt(user("x"), "y", "g:9"), Prompt(user("z"), None, "g:10")]
    assert prompts_hash(a) == prompts_hash(b)  # where a prompt came from is not part of it
    assert prompts_hash(a) != prompts_hash(a[::-1])
    assert prompts_hash(a) != prompts_hash([Prompt(user("x"), "Y"), a[1]])
    assert len(prompts_hash(a)) == 64


# ---- hf:ORG/NAME datasets, read through huggingface_hub's real cache layout (the Hub itself is off-machine) ----
def _hub_cache(root, repo: str, files: dict[str, object]) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    store = root / ("datasets--" + repo.replace("/", "--"))
    (store / "refs").mkdir(parents=True)
    (store / "refs" / "main").write_text(commit)
    for rel, rows in files.items():
        path = store / "snapshots" / commit / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_hf_dataset_prompts_from_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    train = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(3)]
    _hub_cache(tmp_path, "acme/qa", {
        "data/train-00000-of-00002.parquet": train[:2],
        "data/train-00001-of-00002.parquet": train[2:],
        "data/test-00000-of-00001.parquet": [{"instruction": "A test question?"}],
        "chat/train.jsonl": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    })
    got = load_prompts("hf:acme/qa/data")
    assert [p.messages[0]["content"] for p in got] == [r["instruction"] for r in train]
    assert [p.reference for p in got] == [r["output"] for r in train]
    assert [p.messages[0]["content"] for p in load_prompts("hf:acme/qa/data:test")] == ["A test question?"]
    chat = load_prompts("hf:acme/qa/chat:train")
    assert chat[0].messages == [{"role": "user", "content": "hi"}] and chat[0].reference == "yo"
    assert len(load_prompts("hf:acme/qa")) == 4  # every config's train split
    with pytest.raises(PotstillError, match="no data files for split 'validation'"):
        load_prompts("hf:acme/qa:validation")
    with pytest.raises(PotstillError, match=r"^hf:acme/missing: not in the local Hugging Face cache"):
        load_prompts("hf:acme/missing")
    with pytest.raises(PotstillError, match="expected hf:ORG/NAME"):
        load_prompts("hf:justaname")
