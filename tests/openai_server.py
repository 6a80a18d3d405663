"""A small OpenAI-compatible chat server over the built-in engine, for tests: HTTP on 127.0.0.1
in a thread, answering each request alone with model/engine.py's plain decoding.

    with ChatServer(tiny_target_dir, max_len=256) as server:   # server.url = "http://127.0.0.1:PORT"
        server.faults += ["503", "drop"]    # the next POSTs fail so ("ok", "429", "500", "400", "garbage")
        ...
        server.requests                      # the JSON bodies of the chat requests answered

Like SGLang: messages go to the tokenizer's chat template with add_generation_prompt and
`chat_template_kwargs`; the stop token is not part of the content; skip_special_tokens defaults
to true; with reasoning_parser=True the text before `</think>` is returned as
message.reasoning_content (otherwise the raw text is the content). GET /v1/models lists `model`.
A prompt that does not fit max_len is an HTTP 400, as a server's context-length error is.
"""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class ChatServer:
    def __init__(self, target_dir, *, max_len: int, model: str = "tiny-target", reasoning_parser: bool = False):
        from data.tokenizer import load_tokenizer
        from model.engine import TargetLM
        from model.evaluate import eos_token_ids
        from model.target import FrozenTarget

        self.tokenizer = load_tokenizer(str(target_dir))
        self.tlm = TargetLM(FrozenTarget.load(str(target_dir), device="cpu"))
        self.eos = eos_token_ids(self.tlm.config, self.tokenizer)
        self.max_len, self.model, self.reasoning_parser = max_len, model, reasoning_parser
        self.faults: list[str] = []  # consumed one per POST
        self.requests: list[dict] = []  # answered chat requests
        self.posts = 0  # POSTs received, failed ones included
        self.in_flight = 0  # POSTs being answered
        self.delay_s = 0.0  # before each answer
        self.jitter_s = 0.0  # plus a random delay up to this: answers finish out of order
        self._random = random.Random(0)
        self._lock = threading.Lock()  # one decode at a time: Engines on one TargetLM share its cache
        self._httpd = None

    # ------------------------------------------------------------------ the model
    def answer(self, body: dict) -> dict:
        from model.acceptance import SamplingParams
        from model.engine import Engine

        text = self.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True,
                                                  **(body.get("chat_template_kwargs") or {}))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        sp = SamplingParams(body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("top_k", -1),
                            body.get("min_p", 0.0))
        with self._lock:
            engine = Engine(self.tlm, None, batch_size=1, max_len=self.max_len, max_new_tokens=body["max_tokens"],
                            steps=1, sampling=sp, eos_ids=self.eos)
            engine.check_prompts([ids])  # ValueError: HTTP 400
            if body.get("seed") is not None:
                torch.manual_seed(body["seed"])
            out = engine.generate([ids], speculative=False).rows[0].output_ids
        stopped = bool(out) and out[-1] in self.eos
        content = self.tokenizer.decode(out[:-1] if stopped else out,
                                        skip_special_tokens=body.get("skip_special_tokens", True))
        message = {"role": "assistant", "content": content, "reasoning_content": None}
        if self.reasoning_parser and "</think>" in content:
            reasoning, content = content.split("</think>", 1)
            message.update(content=content, reasoning_content=reasoning.replace("<think>", "").strip("\n"))
        return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop" if stopped else "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}}

    # ------------------------------------------------------------------ HTTP
    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})

            def do_POST(self):
                with server._lock:
                    server.in_flight += 1
                try:
                    self._post()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                    pass
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _post(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.posts += 1
                    fault = server.faults.pop(0) if server.faults else None
                if fault == "ok":
                    fault = None
                if fault == "drop":  # the connection closes without an answer
                    self.close_connection = True
                    return
                if fault == "garbage":
                    self.send_response(200)
                    self.send_header("Content-Length", "5")
                    self.end_headers()
                    self.wfile.write(b"{\"cho")
                    return
                if fault is not None:
                    return self._send(int(fault), {"error": {"message": f"injected {fault}", "code": int(fault)}})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                time.sleep(server.delay_s + server.jitter_s * server._random.random())
                try:
                    payload = server.answer(body)
                except ValueError as e:
                    return self._send(400, {"error": {"message": str(e)}})
                with server._lock:
                    server.requests.append(body)
                self._send(200, payload)

        return Handler

    def __enter__(self) -> "ChatServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Wait until no POST is being answered (e.g. one whose client timed out)."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.in_flight, "the test server is still answering"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
