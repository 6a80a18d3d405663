"""Regeneration through an OpenAI-compatible server (data/chat_server.py, `--server`): a real HTTP
server on 127.0.0.1 over the tiny target (tests/openai_server.py) gives the built-in engine's
rows at T = 0; transient errors are retried, permanent ones stop the run, rows stay in input
order, a stopped or killed run resumes. CPU, no downloads."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from helpers import ROOT, env, load_script, run
from openai_server import ChatServer
from test_regenerate import MAX_LEN, OPENAI, ROWS, SETTINGS

from data.chat_server import Answer, ChatClient, ServerError, answer_of
from data.regen_output import state_path
from data.regenerate import RegenSettings, ServerBackend, regenerate_to_file
from model.acceptance import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--max-new-tokens", "6", "--max-len", str(MAX_LEN), "--thinking", "off", "--no-progress"]


@pytest.fixture(scope="module")
def server(tiny_target_dir, one_thread):
    with ChatServer(tiny_target_dir, max_len=MAX_LEN) as s:
        yield s


@pytest.fixture(autouse=True)
def _clean_server(server):
    server.wait_idle()
    server.faults.clear()
    server.requests.clear()
    server.delay_s = server.jitter_s = 0.0
    server.posts = 0


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("server_chats") / "chats.jsonl"
    path.write_text("\n".join(ROWS) + "\n")
    return path


@pytest.fixture(scope="module")
def engine_rows(tiny_target_dir, chats, tmp_path_factory):
    """The built-in engine path's output for `chats` (batches of 2, chunks of 3 rows)."""
    out = tmp_path_factory.mktemp("engine") / "regen.jsonl"
    assert load_script("regenerate_data").main(["--target", str(tiny_target_dir), "--data", str(chats), "--out", str(out),
                                                "--batch-size", "2", "--chunk-rows", "3", "--device", "cpu", *COMMON]) == 0
    return out.read_bytes()


def server_file(target, tok, server, out, concurrency=3, **client):
    args = dict(attempts=6, backoff_s=0.01, timeout_s=60)
    args.update(client)
    return regenerate_to_file(ServerBackend(ChatClient(server.url, "tiny-target", **args), concurrency), tok, ROWS,
                              SETTINGS, out, progress=False, state_every_s=0)


def test_the_server_path_gives_the_engine_rows_at_t0(tiny_target_dir, server, chats, engine_rows, tmp_path, capsys):
    """The same rows, byte for byte, with answers finishing out of order (3 conversations at a
    time, random delays); the requests carry the prompt messages and the sampling settings."""
    server.jitter_s = 0.05
    out = tmp_path / "regen.jsonl"
    assert load_script("regenerate_data").main(["--target", str(tiny_target_dir), "--data", str(chats), "--out", str(out),
                                                "--server", server.url, "--concurrency", "3", *COMMON]) == 0
    assert out.read_bytes() == engine_rows
    assert "model 'tiny-target'" in capsys.readouterr().out  # the name GET /v1/models gave
    # 9 rows: 2 bad; sg1 and c0..c3 have two turns, oa1 and oa2 one
    assert len(server.requests) == 12
    body = next(b for b in server.requests if b["messages"][0]["content"] == "  Be brief.  " and len(b["messages"]) == 4)
    sg = [json.loads(line) for line in out.read_text().splitlines()][0]
    assert body["messages"] == [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi there!\n"},
                                {"role": "assistant", "content": sg["conversations"][2]["value"]},
                                {"role": "user", "content": "And again?"}]  # contents as they are, turn 1 regenerated
    assert {k: body[k] for k in ("model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                                 "skip_special_tokens", "chat_template_kwargs")} == {
        "model": "tiny-target", "max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
        "seed": 0, "skip_special_tokens": False, "chat_template_kwargs": {"enable_thinking": False}}
    assert sorted({b["seed"] for b in server.requests}) == [0, 1, 3, 4, 5, 6, 7]  # seed + the row's index


def test_request_body_carries_the_sampling_and_thinking_settings():
    client = ChatClient("http://127.0.0.1:1/v1/", "m")
    assert client.url == "http://127.0.0.1:1"
    sp = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05)
    body = client.request_body([{"role": "user", "content": "x"}], sp, 64, 7, None)
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"], body["max_tokens"], body["seed"]) == (
        0.6, 0.95, 20, 0.05, 64, 7)
    assert "chat_template_kwargs" not in body  # thinking unset: the template decides, as for any request
    assert client.request_body([], sp, 64, 7, True)["chat_template_kwargs"] == {"enable_thinking": True}
    with pytest.raises(ValueError, match="not an http"):
        ChatClient("127.0.0.1:30000")


def test_reasoning_is_read_from_either_field_or_split_from_the_content(qwen3_tokenizer):
    """SGLang's reasoning_content, vLLM's reasoning, or a raw <think> block in the content (a
    server without a reasoning parser): the same row."""
    def message(**m):
        return {"choices": [{"message": {"role": "assistant", **m}}], "usage": {"completion_tokens": 9}}

    assert answer_of(message(content="\n\nc", reasoning_content="r")) == Answer("\n\nc", "r", 9)
    assert answer_of(message(content="\n\nc", reasoning="r")) == Answer("\n\nc", "r", 9)
    assert answer_of(message(content=None, reasoning_content="r")) == Answer("", "r", 9)
    with pytest.raises(ServerError, match="without choices"):
        answer_of({"object": "error"})

    class Fake:
        model = "fake"

        def __init__(self, answer):
            self.answer = answer

        def chat(self, messages, **kw):
            return self.answer

    rows = []
    for answer in (Answer("<think>\nr\n</think>\n\nc", None, 3), Answer("\n\nc", "r", 3)):
        settings = RegenSettings(max_new_tokens=6, max_len=MAX_LEN)  # thinking: the template's default
        rows.append(next(ServerBackend(Fake(answer), 1).rows(qwen3_tokenizer, [json.dumps(OPENAI)], settings, 0)).row)
    assert rows[0] == rows[1] and rows[0]["messages"][1] == {"role": "assistant", "content": "\n\nc", "reasoning_content": "r"}


def test_transient_errors_are_retried_with_backoff(tiny_target_dir, qwen3_tokenizer, server, engine_rows, tmp_path,
                                                   monkeypatch):
    server.faults += ["503", "drop", "429", "garbage", "500", "502"]
    out = tmp_path / "regen.jsonl"
    server_file(tiny_target_dir, qwen3_tokenizer, server, out, concurrency=2)
    assert out.read_bytes() == engine_rows and server.posts == len(server.requests) + 6
    # one request: the waits double
    import threading

    import data.chat_server as cs

    waits, sleep = [], time.sleep
    main = threading.current_thread()
    monkeypatch.setattr(cs.time, "sleep", lambda s: waits.append(s) if threading.current_thread() is main else sleep(s))
    server.faults += ["503", "drop", "429"]
    client = ChatClient(server.url, "tiny-target", backoff_s=0.5)
    answer = client.chat([{"role": "user", "content": "hi"}], sampling=SamplingParams(), max_tokens=3, seed=0, thinking=False)
    assert waits == [0.5, 1.0, 2.0] and answer.completion_tokens > 0


def test_permanent_errors_stop_at_once_and_retries_are_bounded(server):
    client = ChatClient(server.url, "tiny-target", attempts=3, backoff_s=0.01)
    ask = dict(sampling=SamplingParams(), max_tokens=3, seed=0, thinking=False)
    server.faults += ["400"]
    with pytest.raises(ServerError, match="HTTP 400 Bad Request: injected 400"):
        client.chat([{"role": "user", "content": "hi"}], **ask)
    assert server.posts == 1
    server.faults += ["503"] * 3
    with pytest.raises(ServerError, match="no answer after 3 attempts; the last: HTTP 503"):
        client.chat([{"role": "user", "content": "hi"}], **ask)
    assert server.posts == 4
    server.delay_s = 1.0  # longer than the client waits
    with pytest.raises(ServerError, match="no answer after 2 attempts; the last: .*timed out"):
        ChatClient(server.url, "m", timeout_s=0.2, attempts=2, backoff_s=0).chat([{"role": "user", "content": "hi"}], **ask)
    # the model name: GET /v1/models, or None where the server has no such route
    assert ChatClient(server.url).served_model() == "tiny-target"
    assert ChatClient(server.url + "/elsewhere").served_model() is None


def test_a_server_run_stopped_by_an_error_resumes(tiny_target_dir, qwen3_tokenizer, server, engine_rows, tmp_path):
    """A permanent error in the middle (one conversation at a time): the rows before it are
    kept, the rerun asks only for the rows after them, and the file equals the engine's."""
    server.faults += ["ok"] * 5 + ["400"]
    out = tmp_path / "regen.jsonl"
    with pytest.raises(ServerError, match="HTTP 400"):
        server_file(tiny_target_dir, qwen3_tokenizer, server, out, concurrency=1)
    done = json.loads(state_path(out).read_text())["rows_done"]
    assert done == 4  # sg1 (requests 1, 2), oa1 (3), a bad row, oa2 (4); c0's second request failed
    server.requests.clear()
    report = server_file(tiny_target_dir, qwen3_tokenizer, server, out, concurrency=1)
    assert out.read_bytes() == engine_rows and report["resumed_from_row"] == done
    assert min(b["seed"] for b in server.requests) == done  # no request for a finished row


@pytest.mark.slow
def test_a_server_run_killed_with_sigkill_resumes(tiny_target_dir, server, chats, engine_rows, tmp_path):
    import signal

    server.delay_s = 0.3
    out = tmp_path / "regen.jsonl"
    cmd = [sys.executable, str(ROOT / "scripts" / "regenerate_data.py"), "--target", str(tiny_target_dir),
           "--data", str(chats), "--out", str(out), "--server", server.url, "--concurrency", "1", *COMMON]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    done = 0
    while done < 2 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            done = json.loads(state_path(out).read_text())["rows_done"]
        except (OSError, ValueError):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() and 2 <= done < len(ROWS), "the run was not killed mid-way"
    server.delay_s = 0.0
    again = run(cmd)
    assert "resumed at row" in again.stdout and out.read_bytes() == engine_rows
