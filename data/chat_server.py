"""A client of an OpenAI-compatible chat server (SGLang, vLLM) for regeneration (data/regenerate.py).

    client = ChatClient("http://127.0.0.1:30000")            # model: the server's, from GET /v1/models
    answer = client.chat(messages, sampling=SamplingParams(), max_tokens=256, seed=0, thinking=False)
    answer.content, answer.reasoning, answer.completion_tokens

One POST to {url}/v1/chat/completions per assistant turn, carrying: model; messages (roles
system/user/assistant, contents as they are, a regenerated assistant turn's reasoning as
`reasoning_content`, the key Qwen3's chat template reads); max_tokens; temperature, top_p,
top_k, min_p (SGLang and vLLM extensions of the OpenAI API); seed; skip_special_tokens false
(the content keeps every token the model wrote, as the built-in engine path decodes it); and
chat_template_kwargs {"enable_thinking": ...} when thinking is set (left out otherwise: the
template decides, as for any request that does not say). stream false, n 1.

The answer is choices[0].message: `content` (None counts as ""), and the reasoning from
`reasoning_content` (SGLang with --reasoning-parser qwen3) or `reasoning` (vLLM); None when the
server did not separate it (the caller then splits the content itself). usage.completion_tokens
counts the generated tokens (0 when the server sends no usage).

Failures: connection errors (refused, reset, dropped mid-answer), timeouts, an unreadable body
and HTTP 408, 429 and 5xx are transient: the request is tried again after backoff_s * 2^n
seconds (at most MAX_BACKOFF_S, or the server's Retry-After when longer), `attempts` tries in
all, then ServerError. Any other HTTP error (400, 401, 404, 422 ...) is permanent: ServerError
at once, with the status and the server's message. Standard library only (urllib); the client
is safe to share between threads.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import NamedTuple

from model.acceptance import SamplingParams

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0
# the connection broke, timed out, or the answer was cut short
TRANSIENT_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)


class ServerError(RuntimeError):
    """The server refused a request (`status`: its HTTP status), or gave no usable answer after
    every attempt (`status` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Answer(NamedTuple):
    content: str
    reasoning: str | None  # None: the server did not separate reasoning from the content
    completion_tokens: int


@dataclass
class ChatClient:
    """Chat requests to one server. `url`: its base (http://host:port, with or without /v1);
    `model`: the name sent in requests (None: the first model the server lists)."""

    url: str
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0  # per attempt: a long answer at a busy server takes minutes
    attempts: int = 6
    backoff_s: float = 1.0

    def __post_init__(self):
        url = self.url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--server {self.url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:30000")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        if self.attempts < 1 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("attempts must be >= 1, timeout_s > 0 and backoff_s >= 0")

    # ------------------------------------------------------------------ HTTP with retries
    def _request(self, path: str, body: dict | None = None) -> dict:
        url = f"{self.url}{path}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.attempts):
            wait = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    text = resp.read()
                try:
                    return json.loads(text)
                except ValueError:  # cut short, or not JSON: try again
                    last = f"an answer that is not JSON ({text[:120]!r})"
            except urllib.error.HTTPError as e:  # before URLError: it is one
                message = _error_message(e)
                if e.code not in RETRY_STATUS:
                    raise ServerError(f"{url}: HTTP {e.code} {message}", e.code) from None
                last = f"HTTP {e.code} {message}"
                retry_after = e.headers.get("Retry-After", "") if e.headers else ""
                if retry_after.isdigit():
                    wait = min(max(wait, float(retry_after)), MAX_BACKOFF_S)
            except TRANSIENT_ERRORS as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
            if attempt + 1 < self.attempts:
                time.sleep(wait)
        raise ServerError(f"{url}: no answer after {self.attempts} attempts; the last: {last}. "
                          "Is the server up (and is --server its address)?")

    # ------------------------------------------------------------------ API
    def served_model(self) -> str | None:
        """The first model id of GET /v1/models; None when the server has no such route (404)."""
        try:
            listing = self._request("/v1/models")
        except ServerError as e:
            if e.status == 404:
                return None
            raise
        models = listing.get("data") if isinstance(listing, dict) else None
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise ServerError(f"{self.url}/v1/models lists no model ({str(listing)[:200]}); pass --model")
        return str(models[0]["id"])

    def request_body(self, messages: list[dict], sampling: SamplingParams, max_tokens: int, seed: int,
                     thinking: bool | None) -> dict:
        """The JSON body of one chat request (module docstring)."""
        assert self.model is not None, "set ChatClient.model (served_model() gives the server's)"
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "n": 1, "stream": False,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                "min_p": sampling.min_p, "seed": seed, "skip_special_tokens": False}
        if thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": thinking}
        return body

    def chat(self, messages: list[dict], *, sampling: SamplingParams, max_tokens: int, seed: int,
             thinking: bool | None) -> Answer:
        """One chat completion (module docstring); ServerError when none comes."""
        response = self._request("/v1/chat/completions", self.request_body(messages, sampling, max_tokens, seed, thinking))
        return answer_of(response, self.url)


def answer_of(response: dict, where: str = "the server") -> Answer:
    """content, reasoning and completion tokens of a chat completion response."""
    try:
        message = response["choices"][0]["message"]
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content")
        if reasoning is None:
            reasoning = message.get("reasoning")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ServerError(f"{where} answered without choices[0].message: {json.dumps(response)[:300]}") from None
    if not isinstance(content, str) or not (reasoning is None or isinstance(reasoning, str)):
        raise ServerError(f"{where} answered with a content that is not text: {json.dumps(message)[:300]}")
    usage = response.get("usage") or {}
    return Answer(content, reasoning, int(usage.get("completion_tokens") or 0))


def _error_message(e: urllib.error.HTTPError) -> str:
    """The server's own message of an HTTP error (OpenAI's {"error": {"message"}} or the body)."""
    try:
        body = e.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        body = ""
    try:
        err = json.loads(body)
        msg = err.get("error", err)
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        body = msg if isinstance(msg, str) else json.dumps(msg)
    except (ValueError, AttributeError):
        pass
    body = " ".join(body.split())[:300]
    return f"{e.reason}" + (f": {body}" if body else "")
