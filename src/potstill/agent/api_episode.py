"""Episodes for an OpenAI-compatible API teacher that supports function calling (`tools`).

The teacher gets the `run_python` function and the task; a turn that calls it has the code run in the
sandbox and the result sent back as a `tool` message with the call's id (the wire format of the API);
a turn with a line "Final answer: ..." ends the episode; so do `max_turns` and the context budget.

The trajectory is stored in the one format local teachers write (episode.py): the canonical CodeAct
messages (the tool-describing system prompt a student sees, assistant turns with the code as a fenced
```python block, tool turns "Output:\n..."), tokenized with the local tokenizer's chat template, with
the same role mask (1 = written by the model: its text and the code it passed, and its end of turn;
0 = template markers and tool output). APIs give no log-probs for function-call arguments, so an API
agent capture is text-only (k = 0): train on it with `--loss ce`.
"""

from __future__ import annotations

import json

from potstill.agent.episode import FINAL_RE, Episode, EpisodeRunner, turn_suffix
from potstill.agent.sandbox import Sandbox
from potstill.errors import PotstillError
from potstill.lm.tokens import row_seed
from potstill.lm.types import SamplingParams

TOOL_NAME = "run_python"
TOOLS = [{"type": "function", "function": {
    "name": TOOL_NAME,
    "description": "Run Python code in a sandbox (no network, no files outside its directory) and return what it "
                   "prints, or the error. print() the values you need.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "Python source."}},
                   "required": ["code"]},
}}]
SYSTEM_API = (f"You can run Python code with the {TOOL_NAME} tool; print() the values you need and use its output. "
              "When you know the answer, write a last line of the form 'Final answer: <answer>'.")
NO_ACTION = f"No {TOOL_NAME} call and no 'Final answer:' line. Call {TOOL_NAME}, or give the answer."


class _Local:
    """What EpisodeRunner needs of a teacher, for an API teacher: the local tokenizer and its end of turn."""

    def __init__(self, teacher):
        from potstill.capture.generate import end_of_turn_ids

        if teacher.tokenizer is None or not getattr(teacher.tokenizer, "chat_template", None):
            raise PotstillError("an API agent teacher needs --tokenizer (a model dir with a chat template): "
                                "trajectories are stored as token ids")
        self.tokenizer = teacher.tokenizer
        self.eos_ids = end_of_turn_ids(teacher.tokenizer)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]


def parse_call(call: dict) -> tuple[str | None, str | None]:
    """(code, error) of one function call: the `code` argument, or why there is none."""
    fn = call.get("function") or {}
    if fn.get("name") != TOOL_NAME:
        return None, f"unknown tool {fn.get('name')!r}; the only tool is {TOOL_NAME}"
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError as e:
        return None, f"the arguments are not JSON ({e.msg})"
    code = args.get("code") if isinstance(args, dict) else None
    if not isinstance(code, str) or not code.strip():
        return None, "the arguments have no 'code' string"
    return code, None


class ApiEpisodeRunner(EpisodeRunner):
    """Runs episodes for an HTTPTeacher built with `tools=TOOLS`; stores them like EpisodeRunner's."""

    def __init__(self, teacher, sandbox: Sandbox | None, params: SamplingParams, max_turns: int = 4,
                 max_tokens: int = 2048, seed: int = 0, observation_chars: int = 1000, **_):
        if not getattr(teacher, "tools", None):
            raise PotstillError("the API teacher was built without tools")
        self.api = teacher
        super().__init__(_Local(teacher), sandbox, SamplingParams(**{**params.to_dict(), "top_logprobs": 0}),
                         max_turns=max_turns, max_tokens=max_tokens, tool=True, seed=seed,
                         observation_chars=observation_chars)
        self.params.stop = []  # the function call ends a turn, not a fence

    def new(self, eid: str, task, sample: int) -> Episode:
        e = super().new(eid, task, sample)
        e.wire = [{"role": "system", "content": SYSTEM_API}, {"role": "user", "content": task.question}]
        return e

    def _turns(self, live: list[Episode], turn: int) -> list[str | None]:
        outs = self.api.complete([e.wire for e in live], self.params,
                                 [row_seed(self.seed, f"{e.id}:{turn}") & 0x7FFFFFFF for e in live])
        return [self._api_turn(e, c.text or "", c.tool_calls or []) for e, c in zip(live, outs, strict=True)]

    def _no_action(self, e: Episode) -> None:
        """Recorded in `_api_turn` already."""

    def _after_tool(self, e: Episode, msg: dict) -> None:
        e.wire.append({"role": "tool", "tool_call_id": e.call_id, "content": msg["content"]})

    def _api_turn(self, e: Episode, text: str, calls: list[dict]) -> str | None:
        """Record one API turn in the canonical form; returns the code to run, else None (the turn's
        observation, if any, is then recorded here)."""
        e.turns += 1
        content = text.strip()
        code = error = None
        if calls:  # one call per turn, like one code block per turn: the first is run
            code, error = parse_call(calls[0])
            e.tool_calls += 1
            e.actions += 1
            e.call_id = calls[0].get("id") or f"call_{e.turns}"
            e.wire.append({"role": "assistant", "content": text, "tool_calls": calls[:1]})
            if code is not None:
                try:
                    compile(code, "<tool>", "exec")
                    e.well_formed_calls += 1
                except (SyntaxError, ValueError):
                    pass
                content = (content + "\n" if content else "") + f"```python\n{code}\n```"
        else:
            e.wire.append({"role": "assistant", "content": text})
        e.messages.append({"role": "assistant", "content": content})
        self._append(e, self._ids(content) + [self.teacher.eos_ids[0]], 1)  # the model ended its turn
        e.ended_eos = True
        final = None if calls else FINAL_RE.search(text)
        if final:
            e.actions += 1
            e.answer, e.end = final.group(1).strip(), "answer"
            self._append(e, self._ids(self._after_eos(turn_suffix(self.tok, None))), 0)
        elif calls and code is None:  # a malformed call: the error is the tool's answer
            self._observe(e, f"Error: {error}")
            self._after_tool(e, e.messages[-1])
        elif not calls:
            self._observe(e, NO_ACTION)
            e.wire.append({"role": "user", "content": NO_ACTION})
        return code

    def _observe(self, e: Episode, text: str) -> None:
        msg = {"role": "tool", "content": text}
        e.messages.append(msg)
        self._append(e, self._ids(self._after_eos(turn_suffix(self.tok, msg))), 0)
