"""Rewrite the assistant turns of a chat dataset with the target's own outputs (self-distillation).

    python scripts/regenerate_data.py --target artifacts/study/target --data chats.jsonl \
        --out chats_regen.jsonl --max-new-tokens 256 --temperature 0 --batch-size 64 [--limit N]

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
- turns are regenerated round by round across the whole dataset (all first turns, then all second
  turns, ...), each round in batches sorted by prompt length, on model/engine.py's Engine
  (plain decoding, no drafter);
- a conversation is cut after its last regenerated turn when the next prompt does not fit
  (prompt + max_new_tokens + 2 > --max-len), after --max-turns assistant turns, or when the
  target answers with nothing; turns before the first user turn (ShareGPT's split
  conversations) and trailing user turns of an uncut conversation are kept as they were;
- rows that cannot be used are skipped and counted by reason (data.chat REASONS; "too_long"
  when the first prompt does not fit, "empty" when the first answer is empty);
- the output is written to a temp file and renamed into place; the report goes to stdout
  (and --report). At --temperature 0 the output is deterministic.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.chat import render_prompt as render_messages
from data.rows import BadRow, SkipReport, normalize_turns, parse_row
from data.tokenizer import load_tokenizer
from model.acceptance import SamplingParams
from model.atomic import atomic_file
from model.engine import Engine, TargetLM
from model.evaluate import eos_token_ids
from model.target import FrozenTarget


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


# ----------------------------------------------------------------------------- regeneration
def regenerate(target_dir: str, rows_raw: list[str], *, max_new_tokens: int = 256,
               sampling: SamplingParams = SamplingParams(), thinking: bool | None = None, batch_size: int = 64,
               max_len: int = 2048, max_turns: int | None = None, device: str = "cpu", seed: int = 0,
               tokenizer=None, progress: bool = True) -> tuple[list[dict], dict]:
    """Regenerate every usable row of `rows_raw` (JSON strings); (output rows, report dict).
    `sampling`: how each answer is sampled (greedy by default); `thinking`: enable_thinking of the
    chat template (None = its default)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    tokenizer = tokenizer or load_tokenizer(target_dir)
    skips = SkipReport(total=len(rows_raw))
    convs: list[Conversation] = []
    for i, raw in enumerate(rows_raw):
        try:
            row = parse_row(raw)
            convs.append(plan_row(i, row, max_turns))
        except BadRow as e:
            skips.skipped[e.reason] += 1

    target = FrozenTarget.load(target_dir, device=device)
    tlm = TargetLM(target)
    eos = eos_token_ids(tlm.config, tokenizer)
    engine = Engine(tlm, None, batch_size=batch_size, max_len=max_len, max_new_tokens=max_new_tokens,
                    steps=1, sampling=sampling, eos_ids=eos)
    torch.manual_seed(seed)
    cuts, generated, turns_done = Counter(), 0, 0
    bar = tqdm(total=sum(len(c.assistant_at) for c in convs), desc="regenerate", unit="turn", disable=not progress)
    while True:
        pending = [c for c in convs if c.cut is None and c.done < len(c.assistant_at)]
        if not pending:
            break
        work = []
        for c in pending:
            ids = render_messages(tokenizer, prompt_messages(c), thinking)
            if len(ids) + max_new_tokens + 2 > max_len:  # the engine's room: max_new + K(1) + 1
                c.cut = "too_long"
                bar.update(len(c.assistant_at) - c.done)
            else:
                work.append((c, ids))
        work.sort(key=lambda w: -len(w[1]))  # similar lengths together: less padding in the prefill
        for s in range(0, len(work), batch_size):
            batch = work[s: s + batch_size]
            out = engine.generate([ids for _, ids in batch], speculative=False)
            for (c, _), r in zip(batch, out.rows):
                ids = r.output_ids[:-1] if r.output_ids and r.output_ids[-1] in eos else r.output_ids
                generated += len(r.output_ids)
                reasoning, text = split_reasoning(tokenizer.decode(ids, skip_special_tokens=False))
                if not text.strip():
                    c.cut = "empty_output"
                    bar.update(len(c.assistant_at) - c.done)
                    continue
                c.new_text[c.assistant_at[c.done]] = text
                if reasoning is not None and thinking is not False:
                    c.new_reasoning[c.assistant_at[c.done]] = reasoning
                c.done += 1
                turns_done += 1
                bar.update(1)
    bar.close()

    rows_out = []
    for c in convs:
        if c.done == 0:  # not one turn regenerated: the row is unusable
            skips.skipped["too_long" if c.cut == "too_long" else "empty"] += 1
            continue
        if c.cut is None and c.done < len([m for m in c.messages if m["role"] == "assistant"]):
            c.cut = "max_turns"
        if c.cut is not None:
            cuts[c.cut] += 1
        rows_out.append(output_row(c))
    skips.kept = len(rows_out)
    seconds = time.perf_counter() - t0
    report = {"rows": skips.as_dict(), "summary": skips.summary(), "turns_regenerated": turns_done,
              "conversations_cut": dict(cuts), "generated_tokens": generated, "seconds": seconds,
              "tokens_per_s": generated / seconds if seconds > 0 else None,
              "settings": {"target": str(target_dir), "max_new_tokens": max_new_tokens, "sampling": sampling.as_dict(),
                           "thinking": thinking, "batch_size": batch_size, "max_len": max_len,
                           "max_turns": max_turns, "seed": seed, "device": str(tlm.device)}}
    del engine, tlm, target
    return rows_out, report


def write_jsonl(rows: list[dict], out: str | Path) -> None:
    """Rows as JSON lines, written atomically."""
    with atomic_file(out) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
