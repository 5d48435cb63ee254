"""A scripted local teacher for agent tests: the tiny llama's real forward pass, with a logits bias that
makes it write a given text per (question, turn). Everything else (top-k, stop strings, EOS, the
sandbox, the capture) is the real code path."""

from __future__ import annotations

import json

import torch

from potstill.teachers.hf import HFTeacher


class ScriptedTeacher(HFTeacher):
    """`scripts[question]` is the list of assistant turns to write (the last one repeats)."""

    def __init__(self, model, tokenizer, scripts: dict[str, list[str]]):
        super().__init__(model, tokenizer, name="scripted-tiny")
        self.scripts = scripts
        self.prefix = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.user = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
        self.end = tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]

    def _find_all(self, ctx: list[int], pat: list[int]) -> list[int]:
        return [i for i in range(len(ctx) - len(pat) + 1) if ctx[i : i + len(pat)] == pat]

    def _force(self, contexts: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        for b, ctx in enumerate(contexts):
            starts = self._find_all(ctx, self.prefix)
            u = self._find_all(ctx, self.user)[0] + len(self.user)
            question = self.tokenizer.decode(ctx[u : u + ctx[u:].index(self.end[0])])
            script = self.scripts[question]
            text = script[min(len(starts) - 1, len(script) - 1)]
            target = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_ids[0]]
            done = len(ctx) - (starts[-1] + len(self.prefix))
            tok = target[min(done, len(target) - 1)]
            logits[b, tok] = logits[b].max() + 30.0
        return logits

    def complete_ids(self, prompt_ids, params, seeds=None, logits_processor=None, **kw):
        return super().complete_ids(prompt_ids, params, seeds, logits_processor=self._force, **kw)


def write_tasks(path, tasks: list[dict]) -> str:
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return str(path)


# the scripted episodes of the agent tests: a solved task, a wrong answer that read a secret, an endless loop
SCRIPTS = {
    "What is 6 times 7?": ["I will compute it.\n```python\nprint(6 * 7)\n```\n", "Final answer: 42"],
    "What is 2 to the 10?": ["```python\nimport os\nprint(os.environ.get('AGENT_SECRET'))\nprint(2 ** 10)\n```\n",
                             "Final answer: 1000"],
    "Loop forever?": ["```python\nwhile True:\n    pass\n```\n", "hmm"],
}
TASKS = [
    {"id": "mul", "kind": "arithmetic", "question": "What is 6 times 7?", "answer": "42", "checker": {"type": "number"}},
    {"id": "pow", "kind": "arithmetic", "question": "What is 2 to the 10?", "answer": "1024",
     "checker": {"type": "number"}},
    {"id": "loop", "kind": "custom", "question": "Loop forever?", "answer": "no", "checker": {"type": "exact"}},
    {"id": "held", "kind": "custom", "question": "never asked", "answer": "x", "split": "heldout"},
]
