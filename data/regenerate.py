"""Rewrite the assistant turns of a chat dataset with the target's own outputs (self-distillation).

    python scripts/regenerate_data.py --target /models/Qwen3-30B-A3B --data chats.jsonl \
        --out chats_regen.jsonl --max-new-tokens 256 --temperature 0 --batch-size 64 [--limit N]
    # the same through any OpenAI-compatible server (SGLang, vLLM) serving that target
    python scripts/regenerate_data.py --server http://127.0.0.1:30000 --concurrency 64 \
        --target /models/Qwen3-30B-A3B --data chats.jsonl --out chats_regen.jsonl

    s = RegenSettings(max_new_tokens=256, thinking=False)
    report = regenerate_to_file(EngineBackend(target_dir, "cuda", batch_size=64), tokenizer, raw_rows, s, "out.jsonl")
    report = regenerate_to_file(ServerBackend(ChatClient(url, model), 64), tokenizer, raw_rows, s, "out.jsonl")
    rows, report = regenerate(target_dir, raw_rows, max_new_tokens=256)      # in memory, built-in engine

Heads trained on the target's own outputs accept more (FastMTP, SpecForge, speculators and
ModelOpt all regenerate). Works on any Qwen3-MoE target dir.

What changes and what does not:
- rows keep their format and every other field: ShareGPT rows stay {"conversations": [{"from",
  "value"}]}, OpenAI rows stay {"messages": [{"role", "content"}]}; user and system turns are
  copied unchanged (the same objects, byte for byte); an assistant turn keeps its keys except
  its content (now a plain string, exactly as generated) and `reasoning_content` (the new
  reasoning when the target thinks, else dropped);
- assistant turn r is regenerated from the conversation so far: the original user/system turns
  and the REGENERATED assistant turns before it, rendered as a chat server renders the request
  (data/chat.py `render_prompt`: contents unchanged, `--thinking` as enable_thinking, None = the
  template's default) and sampled with `--temperature/--top-p/--top-k/--min-p` as SGLang's
  sampler does (model/acceptance.py); a thinking answer is split at `</think>` into
  reasoning_content and content, as SGLang's qwen3 reasoning parser does;
- a conversation is cut after its last regenerated turn when the next prompt does not fit
  (prompt + max_new_tokens + 2 > --max-len), after --max-turns assistant turns, or when the
  target answers with nothing; turns before the first user turn (ShareGPT's split
  conversations) and trailing user turns of an uncut conversation are kept as they were;
- rows that cannot be used are skipped and counted by reason (data.rows REASONS; "too_long"
  when the first prompt does not fit, "empty" when the first answer is empty).

Two ways to generate; at temperature 0 they give the same rows (tested on the tiny target; a real
server only when its decoding does not depend on what shares its batch):
- the built-in engine (`EngineBackend`: model/engine.py, plain decoding): the input is cut into
  chunks of `chunk_rows` rows; in a chunk, turns are regenerated round by round (all first
  turns, then all second turns, ...) in batches sorted by prompt length; each chunk's sampling
  seed is seed + 1000003 * chunk, so a chunk done again gives the same rows;
- a server (`ServerBackend`: data/chat_server.py): one chat request per turn carrying the same
  messages and sampling, `concurrency` conversations at a time; the request's seed is seed +
  the row's input index. Prompt lengths are checked with the local tokenizer, as above.

Output (data/regen_output.py): rows are appended to a partial file in input order as they
finish, with a state sidecar; a killed run continues where its state says, and the finished
file equals an uninterrupted run's. A progress bar shows rows/s and tok/s.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from data.chat import render_prompt as render_messages
from data.chat_server import ChatClient
from data.fingerprints import target_fingerprint, tokenizer_fingerprint
from data.regen_output import RegenOutput, RowResult, Tally
from data.rows import BadRow, normalize_turns, parse_row
from data.tokenizer import load_tokenizer
from model.acceptance import SamplingParams
from model.atomic import atomic_file


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RegenSettings:
    """What decides the regenerated rows on either path."""

    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    thinking: bool | None = None  # enable_thinking of the chat template; None = the template's default
    max_len: int = 2048  # prompt + answer tokens; a longer turn ends the conversation
    max_turns: int | None = None  # regenerate at most this many assistant turns per conversation
    seed: int = 0

    def __post_init__(self):
        for name in ("max_new_tokens", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"--max-turns must be >= 1, got {self.max_turns}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"--seed must be in [0, 2^31), got {self.seed}")

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- row plans
@dataclass
class Conversation:
    """One usable row and where its normalized messages sit in the original turn list."""

    index: int  # row number in the input
    row: dict
    turns_key: str  # "conversations" | "messages"
    content_key: str  # "value" | "content"
    messages: list[dict]  # normalized (data.chat.normalize_messages); assistant contents replaced as we go
    turn_of: list[int]  # messages[m] came from row[turns_key][turn_of[m]]
    assistant_at: list[int]  # message positions of assistant turns still to regenerate (<= max_turns)
    done: int = 0  # assistant turns regenerated
    tokens: int = 0  # tokens generated for it
    cut: str | None = None  # why the conversation stopped early (None: it did not)
    new_text: dict[int, str] = field(default_factory=dict)  # message position -> regenerated content
    new_reasoning: dict[int, str] = field(default_factory=dict)  # message position -> its reasoning, if any


def plan_row(index: int, row, max_turns: int | None) -> Conversation:
    """Normalize a row (BadRow on failure); data/rows.py maps its messages back to the row's turns."""
    messages, kept, turns_key, content_key = normalize_turns(row)
    assistant_at = [m for m, msg in enumerate(messages) if msg["role"] == "assistant"]
    if max_turns is not None:
        assistant_at = assistant_at[:max_turns]
    return Conversation(index, row, turns_key, content_key, messages, kept, assistant_at)


def prompt_messages(conv: Conversation) -> list[dict]:
    """Messages before the next assistant turn, earlier assistant turns regenerated."""
    upto = conv.assistant_at[conv.done]
    out = []
    for m, msg in enumerate(conv.messages[:upto]):
        if msg["role"] == "assistant":
            msg = {"role": "assistant", "content": conv.new_text[m]}
            if m in conv.new_reasoning:
                msg["reasoning_content"] = conv.new_reasoning[m]
        out.append(msg)
    return out


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a generated answer, split at `</think>` as SGLang's qwen3 reasoning
    parser does: the reasoning without its tags and surrounding newlines, the content as it
    follows. No `</think>`: no reasoning, the whole text is the content."""
    if "</think>" not in text:
        return None, text
    reasoning, content = text.split("</think>", 1)
    return reasoning.replace("<think>", "", 1).strip("\n"), content


def output_row(conv: Conversation) -> dict:
    """The original row with regenerated assistant contents, cut after the last regenerated
    turn when the conversation stopped early."""
    turns = conv.row[conv.turns_key]
    regenerated = {conv.turn_of[m]: text for m, text in conv.new_text.items()}
    reasoning = {conv.turn_of[m]: text for m, text in conv.new_reasoning.items()}
    end = len(turns)
    if conv.cut is not None:  # drop everything after the last regenerated assistant turn
        end = max(regenerated) + 1
    new_turns = []
    for i, turn in enumerate(turns[:end]):
        if i in regenerated:
            turn = {k: v for k, v in turn.items() if k != "reasoning_content"}
            turn[conv.content_key] = regenerated[i]
            if reasoning.get(i):
                turn["reasoning_content"] = reasoning[i]
        new_turns.append(turn)
    return {**conv.row, conv.turns_key: new_turns}


# ----------------------------------------------------------------------------- one turn, one row
def pending(conv: Conversation) -> bool:
    return conv.cut is None and conv.done < len(conv.assistant_at)


def next_prompt(conv: Conversation, tokenizer, s: RegenSettings) -> list[int] | None:
    """Token ids of the next turn's prompt, or None (and the conversation cut) when it does not fit."""
    ids = render_messages(tokenizer, prompt_messages(conv), s.thinking)
    if len(ids) + s.max_new_tokens + 2 > s.max_len:  # the engine's room: max_new + K(1) + 1
        conv.cut = "too_long"
        return None
    return ids


def take_answer(conv: Conversation, reasoning: str | None, text: str, s: RegenSettings) -> None:
    """Record the answer to the pending turn; an empty one cuts the conversation."""
    if not text.strip():
        conv.cut = "empty_output"
        return
    m = conv.assistant_at[conv.done]
    conv.new_text[m] = text
    if reasoning is not None and s.thinking is not False:
        conv.new_reasoning[m] = reasoning
    conv.done += 1


def start_row(index: int, raw: str, s: RegenSettings) -> Conversation | RowResult:
    """The plan of a row, or its RowResult when it cannot be used."""
    try:
        return plan_row(index, parse_row(raw), s.max_turns)
    except BadRow as e:
        return RowResult(index, None, e.reason, e.where)


def finish_row(conv: Conversation) -> RowResult:
    """The RowResult of a conversation with no turn pending."""
    if conv.done == 0:  # not one turn regenerated: the row is unusable
        return RowResult(conv.index, None, "too_long" if conv.cut == "too_long" else "empty", tokens=conv.tokens)
    if conv.cut is None and conv.done < sum(m["role"] == "assistant" for m in conv.messages):
        conv.cut = "max_turns"
    return RowResult(conv.index, output_row(conv), cut=conv.cut, turns=conv.done, tokens=conv.tokens)


# ----------------------------------------------------------------------------- backends
class Backend(Protocol):
    def identity(self) -> dict:
        """What, besides RegenSettings, decides the rows (recorded in the output's state)."""

    def rows(self, tokenizer, rows_raw: list[str], s: RegenSettings, start: int) -> Iterator[RowResult]:
        """RowResults of rows start, start+1, ... in input order."""


def chunk_seed(seed: int, chunk: int) -> int:
    return seed + 1_000_003 * chunk


class EngineBackend:
    """The built-in engine: plain decoding on model/engine.py, chunk by chunk (module docstring)."""

    def __init__(self, target_dir: str | Path, device: str = "cpu", batch_size: int = 64, chunk_rows: int | None = None):
        if batch_size < 1 or (chunk_rows is not None and chunk_rows < 1):
            raise ValueError(f"--batch-size ({batch_size}) and --chunk-rows ({chunk_rows}) must be >= 1")
        self.target_dir, self.device, self.batch_size = str(target_dir), device, batch_size
        self.chunk_rows = chunk_rows or 8 * batch_size

    def identity(self) -> dict:
        return {"kind": "engine", "target": target_fingerprint(self.target_dir), "batch_size": self.batch_size,
                "chunk_rows": self.chunk_rows}

    def rows(self, tokenizer, rows_raw: list[str], s: RegenSettings, start: int) -> Iterator[RowResult]:
        from model.engine import Engine, TargetLM
        from model.evaluate import eos_token_ids
        from model.target import FrozenTarget

        tlm = TargetLM(FrozenTarget.load(self.target_dir, device=self.device))
        eos = eos_token_ids(tlm.config, tokenizer)
        engine = Engine(tlm, None, batch_size=self.batch_size, max_len=s.max_len, max_new_tokens=s.max_new_tokens,
                        steps=1, sampling=s.sampling, eos_ids=eos)
        C = self.chunk_rows
        for c0 in range(start // C * C, len(rows_raw), C):  # a resumed chunk is made again whole: the same batches
            torch.manual_seed(chunk_seed(s.seed, c0 // C))
            for r in self._chunk(engine, eos, tokenizer, rows_raw, c0, min(c0 + C, len(rows_raw)), s):
                if r.index >= start:
                    yield r

    def _chunk(self, engine, eos, tokenizer, rows_raw, lo: int, hi: int, s: RegenSettings) -> Iterator[RowResult]:
        done: dict[int, RowResult] = {}
        live = []
        for i in range(lo, hi):
            plan = start_row(i, rows_raw[i], s)
            if isinstance(plan, RowResult):
                done[i] = plan
            else:
                live.append(plan)
        nxt = lo
        while True:
            for c in live:
                if not pending(c):
                    done[c.index] = finish_row(c)
            live = [c for c in live if pending(c)]
            while nxt in done:  # rows finish out of order; they leave in order
                yield done.pop(nxt)
                nxt += 1
            if not live:
                return
            work = [(c, ids) for c in live if (ids := next_prompt(c, tokenizer, s)) is not None]
            work.sort(key=lambda w: -len(w[1]))  # similar lengths together: less padding in the prefill
            for b in range(0, len(work), self.batch_size):
                batch = work[b: b + self.batch_size]
                out = engine.generate([ids for _, ids in batch], speculative=False)
                for (c, _), r in zip(batch, out.rows):
                    ids = r.output_ids[:-1] if r.output_ids and r.output_ids[-1] in eos else r.output_ids
                    c.tokens += len(r.output_ids)
                    reasoning, text = split_reasoning(tokenizer.decode(ids, skip_special_tokens=False))
                    take_answer(c, reasoning, text, s)


class ServerBackend:
    """An OpenAI-compatible server: one chat request per turn, `concurrency` rows at a time."""

    def __init__(self, client: ChatClient, concurrency: int = 8):
        if concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
        self.client, self.concurrency = client, concurrency

    def identity(self) -> dict:
        return {"kind": "server", "model": self.client.model}

    def _row(self, tokenizer, lock: threading.Lock, i: int, raw: str, s: RegenSettings) -> RowResult:
        conv = start_row(i, raw, s)
        if isinstance(conv, RowResult):
            return conv
        while pending(conv):
            with lock:  # a tokenizer is not meant to be shared by threads
                ids = next_prompt(conv, tokenizer, s)
            if ids is None:
                break
            answer = self.client.chat(prompt_messages(conv), sampling=s.sampling, max_tokens=s.max_new_tokens,
                                      seed=s.seed + i, thinking=s.thinking)
            conv.tokens += answer.completion_tokens
            reasoning, text = (answer.reasoning, answer.content) if answer.reasoning is not None \
                else split_reasoning(answer.content)
            take_answer(conv, reasoning, text, s)
        return finish_row(conv)

    def rows(self, tokenizer, rows_raw: list[str], s: RegenSettings, start: int) -> Iterator[RowResult]:
        lock = threading.Lock()
        todo = iter(range(start, len(rows_raw)))
        window: deque = deque()  # futures in input order; a few per worker queued ahead
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="regen")
        try:
            while True:
                while len(window) < 4 * self.concurrency and (i := next(todo, None)) is not None:
                    window.append(pool.submit(self._row, tokenizer, lock, i, rows_raw[i], s))
                if not window:
                    return
                yield window.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- runs
def rows_sha256(rows_raw: list[str]) -> str:
    h = hashlib.sha256()
    for raw in rows_raw:
        h.update(raw.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def run_settings(backend: Backend, tokenizer, rows_raw: list[str], s: RegenSettings) -> dict:
    """Everything that decides the output rows: what a resumed run must share with the first."""
    return {"data": {"rows": len(rows_raw), "sha256": rows_sha256(rows_raw)}, "backend": backend.identity(),
            "tokenizer": tokenizer_fingerprint(tokenizer), **s.as_dict()}


def _progress(results: Iterator[RowResult], total: int, initial: int, progress: bool) -> Iterator[tuple[RowResult, float]]:
    """Pass results through, with a progress bar (rows/s, tok/s) and the seconds each took."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc="regenerate", unit="row", disable=not progress)
    t0 = last = time.perf_counter()
    tokens = 0
    try:
        for r in results:
            now = time.perf_counter()
            tokens += r.tokens
            bar.update(1)
            bar.set_postfix_str(f"{tokens / max(now - t0, 1e-9):.1f} tok/s", refresh=False)
            yield r, now - last
            last = now
    finally:
        bar.close()


def regenerate_to_file(backend: Backend, tokenizer, rows_raw: list[str], s: RegenSettings, out: str | Path, *,
                       force: bool = False, progress: bool = True, state_every_s: float = 1.0) -> dict:
    """Regenerate `rows_raw` into the JSONL file `out`, continuing a killed run of the same
    settings (data/regen_output.py); the report. ValueError (the report's summary in it) when no
    row survives: the partial file and state are removed, an existing --out is left as it was."""
    output = RegenOutput.open(out, run_settings(backend, tokenizer, rows_raw, s), force, state_every_s)
    report = {"out": str(out), "resumed_from_row": output.rows_done}
    if not output.complete:
        try:
            for r, seconds in _progress(backend.rows(tokenizer, rows_raw, s, output.rows_done), len(rows_raw),
                                        output.rows_done, progress):
                output.add(r, seconds)
        except BaseException:
            output.save_progress()  # an error or Ctrl-C keeps what is written; a kill keeps the last state
            output.close()
            raise
        if output.tally.kept == 0:
            output.discard()
            raise ValueError(f"no row survived regeneration, nothing written to '{out}': "
                             f"{output.tally.report(len(rows_raw))['summary']}")
        output.finish()
    else:
        report["already_complete"] = True
    return {**output.tally.report(len(rows_raw)), **report, "settings": output.settings}


def regenerate(target_dir: str, rows_raw: list[str], *, max_new_tokens: int = 256,
               sampling: SamplingParams = SamplingParams(), thinking: bool | None = None, batch_size: int = 64,
               max_len: int = 2048, max_turns: int | None = None, device: str = "cpu", seed: int = 0,
               tokenizer=None, progress: bool = True, chunk_rows: int | None = None) -> tuple[list[dict], dict]:
    """Regenerate every usable row of `rows_raw` (JSON strings) on the built-in engine, in
    memory; (output rows, report dict)."""
    s = RegenSettings(max_new_tokens, sampling, thinking, max_len, max_turns, seed)
    tokenizer = tokenizer or load_tokenizer(target_dir)
    backend = EngineBackend(target_dir, device, batch_size, chunk_rows)
    tally, rows = Tally(), []
    for r, seconds in _progress(backend.rows(tokenizer, rows_raw, s, 0), len(rows_raw), 0, progress):
        tally.add(r)
        tally.seconds += seconds
        if r.row is not None:
            rows.append(r.row)
    settings = {"target": str(target_dir), **s.as_dict(), "batch_size": batch_size, "chunk_rows": backend.chunk_rows,
                "device": device}
    return rows, {**tally.report(len(rows_raw)), "settings": settings}


def write_jsonl(rows: list[dict], out: str | Path) -> None:
    """Rows as JSON lines, written atomically."""
    with atomic_file(out) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
