"""Episodes: a local model solves a task with a Python tool (CodeAct style), turn by turn.

The model sees a system prompt describing the tool and the task. Each assistant turn is sampled
with its top-k log-probs; a turn with a fenced ```python block is cut at the closing fence, the
code runs in the sandbox and its result comes back as a `tool` turn; a turn with a line
"Final answer: ..." ends the episode, and so do `max_turns` and the context budget.

The trajectory is one token sequence after the prompt, with a role per token: 1 = written by the
model (sampled, with its top-k), 0 = context (the template's turn markers, the closing fence that
ended the turn, tool output, a scaffold's prefill). With scaffold "prefill" each assistant turn
opens with text the model continues: "```python\n" where it should call the tool (the first turn,
and after a run that failed or printed nothing), "Final answer:" after a run that printed
something (and, without the tool, in the only turn); the same for every model evaluated. Training learns only role-1 tokens. Live episodes decode together,
one batched `complete_ids` call per turn; each turn samples from a generator seeded by the
episode id and the turn, so a resumed run repeats an interrupted one.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from potstill.agent.sandbox import Sandbox
from potstill.agent.tasks import Task, check
from potstill.errors import PotstillError
from potstill.lm.tokens import row_seed
from potstill.lm.types import SamplingParams

SYSTEM_TOOL = (
    "You can run Python code. To run code, write it in a ```python code block and end the block with ```; "
    "the code runs and you see what it prints, so print() the values you need. Use the output to answer. "
    "When you know the answer, write a last line of the form 'Final answer: <answer>'.\n\n"
    "Example.\nQuestion: What is 123456789 * 987654321?\n"
    "Answer: I will compute it.\n```python\nprint(123456789 * 987654321)\n```\n"
    "Output: 121932631112635269\nAnswer: Final answer: 121932631112635269"
)
SYSTEM_NO_TOOL = (
    "Answer the question. Write a last line of the form 'Final answer: <answer>'.\n\n"
    "Example.\nQuestion: What is 12 * 11?\nAnswer: 12 * 11 = 132.\nFinal answer: 132"
)
FENCE_STOP = "\n```\n"
SCAFFOLDS = ("none", "prefill")
CODE_PREFILL = "```python\n"  # scaffold "prefill": a turn that should call the tool starts with these
ANSWER_PREFILL = "Final answer:"  # ... and a turn after a tool run that printed something (or without the tool)
CODE_RE = re.compile(r"```python[ \t]*\n(.*?)(?:\n```|$)", re.S)
FINAL_RE = re.compile(r"final answer\s*:\s*(.+)", re.I)
_MARK = "\x00POTSTILL_TURN\x00"


def check_scaffold(scaffold: str) -> None:
    if scaffold not in SCAFFOLDS:
        raise PotstillError(f"agent: unknown scaffold {scaffold!r} (have {', '.join(SCAFFOLDS)})")


@dataclass
class Episode:
    """One task attempt and its trajectory."""

    id: str
    task: Task
    sample: int
    messages: list[dict]
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    roles: list[int] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_logprobs: list[np.ndarray] = field(default_factory=list)
    turns: int = 0
    actions: int = 0  # turns with a code block or a final answer
    tool_calls: int = 0
    well_formed_calls: int = 0  # code that compiles
    sandbox_errors: int = 0  # runs that did not exit 0 (errors, timeouts, limits)
    answer: str | None = None
    verified: bool = False
    end: str = ""  # answer | max_turns | context | no_answer
    ended_eos: bool = False  # the last model turn ended with the model's own end-of-turn token
    wire: list[dict] = field(default_factory=list)  # an API teacher's messages as sent (api_episode.py)
    call_id: str | None = None  # the API function call the next tool message answers
    prefill: str = ""  # scaffold: text that opens the next assistant turn (context, role 0)

    @property
    def done(self) -> bool:
        return bool(self.end)

    @property
    def model_tokens(self) -> int:
        return int(sum(self.roles))

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task.id, "kind": self.task.kind, "template": self.task.template,
                "sample": self.sample, "turns": self.turns, "actions": self.actions, "tool_calls": self.tool_calls,
                "well_formed_calls": self.well_formed_calls, "sandbox_errors": self.sandbox_errors,
                "answer": self.answer, "verified": self.verified, "end": self.end, "tokens": len(self.ids),
                "model_tokens": self.model_tokens}


def start_messages(task: Task, tool: bool = True) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_TOOL if tool else SYSTEM_NO_TOOL},
            {"role": "user", "content": task.question}]


def parse_turn(text: str) -> tuple[str | None, str | None]:
    """(code, final answer) of one assistant turn; whichever comes first wins, the other is None."""
    code = CODE_RE.search(text)
    final = FINAL_RE.search(text)
    if code and (not final or code.start() < final.start()):
        return code.group(1), None
    if final:
        return None, final.group(1).strip()
    return None, None


def turn_suffix(tokenizer, tool_message: dict | None) -> str:
    """Template text after an assistant turn's content: its end, the tool turn and the next
    assistant prefix (or only the end when `tool_message` is None)."""
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": _MARK}]
    if tool_message is None:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        after = text[text.index(_MARK) + len(_MARK):]
        return after.rstrip("\n") if after.strip() else after
    text = tokenizer.apply_chat_template(msgs + [tool_message], add_generation_prompt=True, tokenize=False)
    return text[text.index(_MARK) + len(_MARK):]


class EpisodeRunner:
    """Runs episodes for a local teacher (an Engine: tokenizer, eos_ids, encode_chat, complete_ids)."""

    def __init__(self, teacher, sandbox: Sandbox | None, params: SamplingParams, max_turns: int = 4,
                 max_tokens: int = 2048, tool: bool = True, seed: int = 0, batch_size: int = 16,
                 observation_chars: int = 1000, scaffold: str = "none"):
        check_scaffold(scaffold)
        self.teacher = teacher
        self.scaffold = scaffold
        self.tok = teacher.tokenizer
        self.sandbox = sandbox
        self.params = replace(params, stop=[FENCE_STOP] if tool else [])
        self.max_turns = max_turns if tool else 1
        self.max_tokens = max_tokens
        self.tool = tool
        self.seed = seed
        self.batch_size = batch_size
        self.observation_chars = observation_chars
        self.k = params.top_logprobs
        self._pool = ThreadPoolExecutor(max_workers=2)

    def new(self, eid: str, task: Task, sample: int) -> Episode:
        messages = start_messages(task, self.tool)
        e = Episode(eid, task, sample, messages, list(self.teacher.encode_chat(messages)))
        e.prefill = self._prefill(None)
        return e

    def _prefill(self, result) -> str:
        """The scaffold's opening of the next turn; `result`: the tool run just answered (None: none)."""
        if self.scaffold == "none":
            return ""
        if not self.tool or (result is not None and result.ok and result.output.strip()):
            return ANSWER_PREFILL
        return CODE_PREFILL

    def run(self, episodes: list[Episode], log=None) -> list[Episode]:
        """Advance every episode to its end; returns them (the same objects)."""
        for turn in range(self.max_turns):
            live = [e for e in episodes if not e.done]
            if not live:
                break
            t0 = time.perf_counter()
            before = sum(e.model_tokens for e in live)
            runs = self._turns(live, turn)
            futures = {e.id: self._pool.submit(self.sandbox.run, code) for e, code in zip(live, runs, strict=True)
                       if code is not None}
            for e, code in zip(live, runs, strict=True):
                if code is not None:
                    self._tool_turn(e, code, futures[e.id].result())
                elif not e.done:
                    self._no_action(e)
                if not e.done and len(e.prompt_ids) + len(e.ids) >= self.max_tokens:
                    e.end = "context"
            if log is not None:
                log(f"  turn {turn + 1}: {len(live)} episodes, {sum(e.model_tokens for e in live) - before} tokens "
                    f"written, {sum(c is not None for c in runs)} code runs, {time.perf_counter() - t0:.0f}s")
        for e in episodes:
            if not e.done:
                e.end = "max_turns"
            if e.answer is not None:
                e.verified = check(e.task, e.answer, self.sandbox)
        return episodes

    def _turns(self, live: list[Episode], turn: int) -> list[str | None]:
        """One model turn for each live episode, recorded; the code each one runs (None: none)."""
        for e in live:
            if e.prefill:
                self._append(e, self._ids(e.prefill), 0)
        outs = self.teacher.complete_ids([e.prompt_ids + e.ids for e in live], self.params,
                                         [row_seed(self.seed, f"{e.id}:{turn}") for e in live],
                                         batch_size=self.batch_size, include_eos=True)
        return [self._model_turn(e, c) for e, c in zip(live, outs, strict=True)]

    def _no_action(self, e: Episode) -> None:
        self._tool_turn(e, None, None)

    # -- one turn --------------------------------------------------------------------------------

    def _append(self, e: Episode, ids: list[int], role: int, topk_ids=None, topk_lps=None) -> None:
        e.ids += list(ids)
        e.roles += [role] * len(ids)
        if not self.k:
            return
        if topk_ids is None:  # context token: a placeholder row (never a target)
            for t in ids:
                row_ids = np.zeros(self.k, np.int64)
                row_ids[0] = t
                row_lps = np.full(self.k, -np.inf, np.float32)
                row_lps[0] = 0.0
                e.topk_ids.append(row_ids)
                e.topk_logprobs.append(row_lps)
        else:
            e.topk_ids += list(np.asarray(topk_ids, np.int64).reshape(len(ids), self.k))
            e.topk_logprobs += list(np.asarray(topk_lps, np.float32).reshape(len(ids), self.k))

    def _model_turn(self, e: Episode, c) -> str | None:
        """Record the model's turn; returns the code to run (tool mode), else None."""
        e.turns += 1
        ids = list(c.completion_ids)
        self._append(e, ids, 1, c.topk_ids, c.topk_logprobs)
        ended_eos = bool(ids) and ids[-1] in self.teacher.eos_ids
        written = e.prefill + self.tok.decode(ids, skip_special_tokens=True)
        text = e.prefill + c.text
        code, answer = parse_turn(text)
        if not self.tool:  # without the tool a code block is only text: the answer line counts wherever it is
            final = FINAL_RE.search(text)
            code, answer = None, final.group(1).strip() if final else None
        if c.finish_reason == "stop" and not ended_eos and code is not None:  # cut at the closing fence
            content = text + "\n```"
            if content.startswith(written) and len(content) > len(written):
                self._append(e, self._ids(content[len(written):]), 0)
        else:
            content = written
        e.messages.append({"role": "assistant", "content": content})
        e.ended_eos = ended_eos
        if code is not None or answer is not None:
            e.actions += 1
        if answer is not None:
            e.answer, e.end = answer, "answer"
            if not ended_eos:
                self._append(e, self._ids(turn_suffix(self.tok, None)), 0)
            return None
        if code is not None and self.tool:
            e.tool_calls += 1
            try:
                compile(code, "<tool>", "exec")
                e.well_formed_calls += 1
            except (SyntaxError, ValueError):
                pass
            return code
        if not self.tool:
            e.end = "no_answer"
        return None

    def _tool_turn(self, e: Episode, code: str | None, result) -> None:
        if code is None:
            obs = "No ```python block and no 'Final answer:' line. Write code in a ```python block, or the answer."
        else:
            if not result.ok:
                e.sandbox_errors += 1
            obs = "Output:\n" + result.observation(self.observation_chars)
        e.prefill = self._prefill(result)
        msg = {"role": "tool", "content": obs}
        e.messages.append(msg)
        suffix = turn_suffix(self.tok, msg)
        self._append(e, self._ids(self._after_eos(suffix) if e.ended_eos else suffix), 0)
        self._after_tool(e, msg)

    def _after_tool(self, e: Episode, msg: dict) -> None:
        """Hook: a tool turn was recorded (the API runner sends it on the wire)."""

    def _after_eos(self, suffix: str) -> str:
        """Template text after a turn that the model already ended with its own end-of-turn token."""
        for eos in self.teacher.eos_ids:  # Gemma ends a turn with <end_of_turn>, not its EOS
            eos_text = self.tok.decode([eos], skip_special_tokens=False)
            if eos_text and suffix.startswith(eos_text):
                return suffix[len(eos_text):]
        return suffix

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def episode_row(e: Episode, tokenizer, split: str) -> dict[str, Any]:
    """A capture row: prompt = the opening messages, completion = the whole trajectory + role mask."""
    import json

    t = len(e.ids)
    k = e.topk_ids[0].shape[0] if e.topk_ids else 0
    return {
        "id": e.id,
        "prompt": json.dumps(e.messages[:2], ensure_ascii=False),
        "reference": e.task.answer,
        "split": split,
        "prompt_ids": e.prompt_ids,
        "completion_ids": e.ids,
        "completion_text": json.dumps(e.messages[2:], ensure_ascii=False),
        "finish_reason": e.end,
        "sampled_logprob": None,
        "topk_ids": np.stack(e.topk_ids) if k else None,
        "topk_logprobs": np.stack(e.topk_logprobs) if k else None,
        "role_mask": np.asarray(e.roles, np.uint8).reshape(t),
    }
