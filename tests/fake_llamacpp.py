"""A scripted llama.cpp-style server for the gateway tests: a real HTTP server on 127.0.0.1.

It speaks llama.cpp's OpenAI-compatible dialect (`llama-server`: /v1/chat/completions,
/v1/completions, /v1/models, /health; SSE streams whose last chunk carries `finish_reason`,
`usage` and `timings`, then `data: [DONE]`). "Tokens" are words: a completion of n tokens is
"w0 w1 ... w(n-1)", always `max_tokens` long (finish_reason "length"); prompt tokens are the
prompt's words. `mode` scripts failures: "ok", "hang" (reads the request, never answers),
"garbage" (200 with HTML; a stream turns to garbage after 3 chunks), "error500", "busy" (503),
"cut" (a stream that stops without [DONE]). `delay_s` spaces stream chunks. Every request is
recorded in `requests`; `written` counts the stream chunks each request got out before its
client (the gateway) closed the connection, in `closed_early`.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeLlamaCpp(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of gateway connections is not refused by the listen backlog

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.delay_s = 0.0
        self.requests: list[dict] = []
        self.closed_early: list[int] = []  # chunks written before the reader went away, per cut stream
        self.stop_event = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _words(text: str) -> int:
    return max(1, len(text.split()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeLlamaCpp

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            body = {"object": "list", "data": [{"id": "llama.gguf", "object": "model", "owned_by": "llamacpp",
                                                "created": 0, "meta": {"n_ctx_train": 2048}}]}
            return self._send(200, json.dumps(body).encode())
        if self.path == "/health":
            return self._send(200, b'{"status":"ok"}')
        self._send(404, b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}')

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        srv.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        mode = srv.mode
        if mode == "hang":
            srv.stop_event.wait(30)
            return
        if mode == "error500":
            return self._send(500, b'{"error":{"code":500,"message":"llama_decode failed","type":"server_error"}}')
        if mode == "busy":
            return self._send(503, b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}')
        if mode == "garbage" and not body.get("stream"):
            return self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            return self._send(404, b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}')
        if chat:
            prompt = " ".join(m.get("content") or "" for m in body.get("messages", []))
        else:
            prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else "x"
        n = int(body.get("max_tokens") or 16)
        head = {"id": "chatcmpl-fake" if chat else "cmpl-fake", "created": int(time.time()), "model": "llama.gguf",
                "system_fingerprint": "b4567-fake", "object": "chat.completion" if chat else "text_completion"}
        usage = {"prompt_tokens": _words(prompt), "completion_tokens": n, "total_tokens": _words(prompt) + n}
        words = [("" if i == 0 else " ") + f"w{i}" for i in range(n)]
        if not body.get("stream"):
            text = "".join(words)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"})
            return self._send(200, json.dumps({**head, "choices": [choice], "usage": usage,
                                               "timings": {"predicted_n": n}}).encode())
        self._stream(head, words, usage, chat, body)

    def _stream(self, head: dict, words: list[str], usage: dict, chat: bool, body: dict) -> None:
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None = None, **extra) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return {**head, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}],
                    **extra}

        events = ([chunk(None) | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None},
                                                "finish_reason": None}]}] if chat else [])
        events += [chunk(w) for w in words]
        events.append(chunk(None, "length", timings={"predicted_n": len(words)}))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**head, "choices": [], "usage": usage})
        written = 0
        try:
            for i, ev in enumerate(events):
                if srv.mode == "garbage" and i == 3:
                    self._chunk(b"data: <html>oops</html>\n\n")
                    break
                if srv.mode == "cut" and i == 3:
                    break
                self._chunk(f"data: {json.dumps(ev)}\n\n".encode())
                written += 1
                if srv.delay_s:
                    time.sleep(srv.delay_s)
            else:
                self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            srv.closed_early.append(written)
        if srv.mode == "cut":
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


@contextmanager
def fake_llamacpp():
    """A running FakeLlamaCpp; shut down on exit."""
    srv = FakeLlamaCpp()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop_event.set()
        srv.shutdown()
        srv.server_close()
