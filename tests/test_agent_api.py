"""An API teacher with function calling: episodes call `run_python` (an OpenAI `tools` function), the tool's
result goes back as a `tool` message with the call's id, and the trajectory is stored in the one format
local teachers write (fenced code, same role mask), verified, and trainable.

The API is a real HTTP server on 127.0.0.1 written here (the external API is outside this machine),
scripted per question: first a tool call, then a final answer that it reads from the tool's output."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from potstill.agent.generate import AgentGenerateConfig, agent_generate
from potstill.agent.sandbox import detect_isolation
from potstill.capture.store import Capture
from potstill.train.data import examples_from_capture
from tests.agent_fixtures import write_tasks

# question -> the code of its tool call (None: a malformed call) and whether to answer from the output
SCRIPT = {
    "What is 6 times 7?": ('{"code": "print(6 * 7)"}', True),
    "What is 2 to the 10?": ('{"code": "print(2 ** 10)"}', False),  # answers wrongly: rejected
    "Say the word.": ('{"code": ', True),  # arguments that are not JSON: an observation, then an answer
}
TASKS = [
    {"id": "mul", "kind": "arithmetic", "question": "What is 6 times 7?", "answer": "42", "checker": {"type": "number"}},
    {"id": "pow", "kind": "arithmetic", "question": "What is 2 to the 10?", "answer": "1024",
     "checker": {"type": "number"}},
    {"id": "word", "kind": "custom", "question": "Say the word.", "answer": "word"},
]


class ScriptedAPI(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *_):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        msgs = body["messages"]
        arguments, honest = SCRIPT[msgs[1]["content"]]
        tools = [m for m in msgs if m["role"] == "tool"]
        if not tools:
            message = {"role": "assistant", "content": "Let me compute that.",
                       "tool_calls": [{"id": f"call_{len(msgs)}", "type": "function",
                                       "function": {"name": "run_python", "arguments": arguments}}]}
            finish = "tool_calls"
        else:
            out = re.sub(r"^Output:\n", "", tools[-1]["content"]).strip()
            answer = out if honest and not out.startswith("Error") else "word" if honest else "1000"
            message, finish = {"role": "assistant", "content": f"The tool says {out!r}.\nFinal answer: {answer}"}, "stop"
        data = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                           "choices": [{"index": 0, "message": message, "finish_reason": finish}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def api():
    ScriptedAPI.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_api_teacher_tool_calls_become_verified_trainable_trajectories(tmp_path, api, tiny_model_dir, tiny_tokenizer,
                                                                       monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-the-sandbox")
    cfg = AgentGenerateConfig(tasks=write_tasks(tmp_path / "tasks.jsonl", TASKS), teacher=api, model="scripted",
                              tokenizer=str(tiny_model_dir), out=str(tmp_path / "cap"), samples=1, max_turns=3,
                              sandbox_cpu_s=1, sandbox_wall_s=3, unsafe_sandbox=detect_isolation() == "none")
    manifest = agent_generate(cfg, log=lambda *_: None)

    # the wire: tools offered on every request; the second turn carries the call and its result, by id
    first, *rest = [r for r in ScriptedAPI.requests if r["messages"][1]["content"] == "What is 6 times 7?"]
    assert all(r["tools"][0]["function"]["name"] == "run_python" for r in ScriptedAPI.requests)
    assert len(rest) == 1 and len(first["messages"]) == 2
    call, result = rest[0]["messages"][2], rest[0]["messages"][3]
    assert call["tool_calls"][0]["function"]["arguments"] == '{"code": "print(6 * 7)"}'
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "Output:\n42"}
    word = [r for r in ScriptedAPI.requests if r["messages"][1]["content"] == "Say the word."][-1]["messages"]
    assert word[3]["role"] == "tool" and word[3]["content"].startswith("Error: the arguments are not JSON")

    # the capture: verified -> train, the wrong answer -> rejected; text-only (no log-probs for arguments)
    assert manifest["k"] == 0 and manifest["sampling"]["tool"] == "run_python function"
    assert manifest["yield"]["all"] == {"episodes": 3, "verified": 2, "yield": 0.6667, "tasks": 3, "tasks_solved": 2}
    assert manifest["episodes_this_run"]["well_formed_call_share"] == round(2 / 3, 4)
    cap = Capture.open(tmp_path / "cap")
    rows = {r["prompt"][1]["content"]: r for r in cap.rows()}
    assert rows["What is 6 times 7?"]["split"] == "train" and rows["What is 2 to the 10?"]["split"] == "rejected"

    # the one trajectory format: the stored prompt is the CodeAct system prompt, the call is a fenced block,
    # the role mask marks what the model wrote (text, code, end of turn), never the tool output
    from potstill.agent.episode import SYSTEM_TOOL

    good = rows["What is 6 times 7?"]
    assert good["prompt"][0]["content"] == SYSTEM_TOOL
    ids, mask = good["completion_ids"], good["role_mask"].astype(bool)
    assert len(ids) == len(mask)
    model_text = tiny_tokenizer.decode(ids[mask])
    context_text = tiny_tokenizer.decode(ids[~mask])
    assert "Let me compute that.\n```python\nprint(6 * 7)\n```" in model_text
    assert "Final answer: 42" in model_text and "Output" not in model_text
    assert "Output:\n42" in context_text
    messages = json.loads(good["completion_text"]) if isinstance(good["completion_text"], str) else good["completion_text"]
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    # the tokens are the chat template's rendering of those messages: what a student sees at eval time
    full = tiny_tokenizer.apply_chat_template(good["prompt"] + messages, tokenize=False)
    assert tiny_tokenizer.decode(list(good["prompt_ids"]) + list(ids)) == full.rstrip("\n")
    assert "sk-not-for-the-sandbox" not in json.dumps(ScriptedAPI.requests)

    # trainable: only the model-written tokens are targets, with plain CE (no top-k in a text-only capture)
    examples = examples_from_capture(cap, split="train", max_seq_len=1024)
    assert len(examples) == 2 and all(0 < e.loss_mask.sum() < len(e.loss_mask) for e in examples)
    from potstill.config import TrainConfig
    from potstill.train.loop import train

    summary = train(TrainConfig(capture=str(tmp_path / "cap"), out=str(tmp_path / "student"), loss="ce",
                                teacher=str(tiny_model_dir), student=f"pretrained:{tiny_model_dir}", max_steps=2,
                                warmup_steps=0, batch_size=2, max_seq_len=1024, checkpoint_every=0),
                    log=lambda *_: None)
    assert summary["steps"] == 2 and summary["examples"] == 2
