"""What a usable chat row is: the accepted formats, normalization, and the count of bad rows.

Accepted row formats (per row; a file may mix them):
  ShareGPT  {"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"chatgpt"|"bard"|
                                 "model"|"system", "value": str}, ...]}
  OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
            (content may also be a list of {"type": "text", "text": str} parts; an assistant
            message may carry "reasoning_content", rendered into the <think> block)
  MT-Bench  {"question_id", "category", "turns": [str, ...]}   (prompts only, data/chat.py)

Row skipping: a bad row never stops a run. Each is counted under one reason (REASONS) in a
SkipReport, and a run fails only when no row survives.

    messages = normalize_messages(parse_row(raw))     # BadRow(reason) if unusable
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

REASONS = (
    "bad_encoding",  # a row of a .jsonl/.json file is not valid UTF-8 (data/sources.py)
    "bad_json",  # a line of a .jsonl file is not valid JSON
    "missing_field",  # no conversations/messages key, or a message without from/value, role/content
    "wrong_type",  # e.g. conversations is a string, content is a number
    "unknown_role",  # a role outside the accepted names
    "empty",  # zero messages, or a user/assistant message with empty content
    "no_assistant_turn",  # nothing to train on after dropping leading assistant turns
    "no_user_turn",  # chat_prompts only: no user message to prompt with
    "too_long",  # no assistant token left at index >= 2 after truncation to max_length
    "template",  # the chat template rewrites an assistant content so that the loss mask cannot follow it
)

ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}


class BadRow(Exception):
    """A row that cannot be used; `reason` is one of REASONS, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str = "", where: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.where = where  # file:line, when the row's location is known


MAX_WHERE = 3  # locations kept per reason in a SkipReport


@dataclass
class SkipReport:
    """How many raw rows were read (`total`), kept, and skipped per reason; `where` keeps the
    location (file:line) of the first few skipped rows of a reason when it is known (bad_encoding)."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    where: dict = field(default_factory=dict)  # reason -> ["file:line", ...], at most MAX_WHERE

    def skip(self, bad: BadRow) -> None:
        """Count one bad row (and its location, when it carries one)."""
        self.skipped[bad.reason] += 1
        if bad.where and len(self.where.setdefault(bad.reason, [])) < MAX_WHERE:
            self.where[bad.reason].append(bad.where)

    def summary(self) -> str:
        """One line, e.g. 'kept 970 of 1000 rows; skipped: bad_encoding=1 (chats.jsonl:7), too_long=27'."""
        reasons = ", ".join(
            f"{r}={n}" + (f" ({', '.join(self.where[r])}{', ...' if n > len(self.where[r]) else ''})" if self.where.get(r) else "")
            for r, n in sorted(self.skipped.items()) if n
        )
        return f"kept {self.kept} of {self.total} rows; skipped: {reasons or 'none'}"

    def as_dict(self) -> dict:
        """{"total": int, "kept": int, "skipped": {reason: count}} (JSON-serializable), plus
        "where": {reason: ["file:line", ...]} when any location is known."""
        d = {"total": self.total, "kept": self.kept, "skipped": dict(sorted(self.skipped.items()))}
        return d | ({"where": dict(sorted(self.where.items()))} if self.where else {})

    @classmethod
    def from_dict(cls, d: dict) -> "SkipReport":
        """The inverse of `as_dict` (a report saved before `where` existed has none)."""
        return cls(total=d["total"], kept=d["kept"], skipped=Counter(d["skipped"]), where=dict(d.get("where", {})))


# A row that could not be decoded travels as this marker + its location, so that it is judged
# (and counted) with every other row instead of stopping the read (data/sources.py).
_BAD_ENCODING = "\x00bad_encoding\x00"


def bad_encoding_row(where: str) -> str:
    """The stored form of a row whose bytes are not UTF-8; `where` is e.g. "chats.jsonl:7, byte 6465"."""
    return _BAD_ENCODING + where


def parse_row(raw: str):
    """One stored row (JSON text) back to its object; unparsable text is a `bad_json` row, and
    a row that was not UTF-8 a `bad_encoding` row."""
    if raw.startswith(_BAD_ENCODING):
        where = raw[len(_BAD_ENCODING):]
        raise BadRow("bad_encoding", f"{where} is not valid UTF-8", where=where)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRow("bad_json", str(e)) from None


def content_text(content, where: str) -> str:
    """A message's content as a string: a str, or a list of OpenAI text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise BadRow("wrong_type", f"{where} is {type(content).__name__}, expected str")


class Normalized(NamedTuple):
    """A normalized row and where each message came from in the original turn list."""

    messages: list[dict]  # [{"role", "content"(, "reasoning_content")}]
    turn_of: list[int]  # messages[m] is row[turns_key][turn_of[m]]
    turns_key: str  # "conversations" | "messages"
    content_key: str  # "value" | "content"


def normalize_messages(row: dict, require_assistant: bool = True) -> list[dict]:
    """Turn one ShareGPT or OpenAI row into [{"role", "content"}, ...] or raise BadRow
    (`normalize_turns` without the mapping back to the row's turns)."""
    return normalize_turns(row, require_assistant).messages


def normalize_turns(row: dict, require_assistant: bool = True) -> Normalized:
    """Turn one ShareGPT or OpenAI row into normalized messages, or raise BadRow.

    What is changed, and why:
      - roles map to system/user/assistant (ShareGPT human->user, gpt/chatgpt/bard/model->assistant);
      - contents are kept exactly as they are (a chat endpoint sends them to the template
        unchanged; a prompt ending in a newline tokenizes differently from one that does not);
      - empty system messages are dropped; an empty (or whitespace-only) user/assistant message
        rejects the row ("empty"), since dropping it would merge two turns of one side;
      - assistant turns before the first user turn are dropped: ShareGPT's "split" conversations
        (about a third of them) start mid-dialogue with the model's answer to an unseen question;
      - with require_assistant (training), trailing non-assistant turns are dropped (they carry
        no loss) and a row with no assistant turn left is rejected ("no_assistant_turn");
        without it (prompts), a row with no user turn is rejected ("no_user_turn").
    """
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row is {type(row).__name__}, expected an object")
    # A null counts as absent: a parquet file mixing both formats has both columns.
    if row.get("conversations") is not None:
        turns_key, role_key, content_key = "conversations", "from", "value"
    elif row.get("messages") is not None:
        turns_key, role_key, content_key = "messages", "role", "content"
    else:
        raise BadRow("missing_field", f"no 'conversations' or 'messages' in keys {sorted(row)[:8]}")
    turns = row[turns_key]
    if not isinstance(turns, list):
        raise BadRow("wrong_type", f"messages are {type(turns).__name__}, expected a list")
    if not turns:
        raise BadRow("empty", "zero messages")

    messages, turn_of = [], []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"message {i} is {type(turn).__name__}, expected an object")
        if role_key not in turn or content_key not in turn:
            raise BadRow("missing_field", f"message {i} lacks '{role_key}' or '{content_key}'")
        name = turn[role_key]
        if not isinstance(name, str):
            raise BadRow("wrong_type", f"message {i} {role_key} is {type(name).__name__}")
        role = ROLE_NAMES.get(name.lower())
        if role is None:
            raise BadRow("unknown_role", f"message {i} {role_key}={name!r}")
        content = content_text(turn[content_key], f"message {i} {content_key}")
        if not content.strip():
            if role == "system":
                continue
            raise BadRow("empty", f"message {i} ({role}) has empty content")
        message = {"role": role, "content": content}
        reasoning = turn.get("reasoning_content")
        if role == "assistant" and isinstance(reasoning, str) and reasoning.strip():
            message["reasoning_content"] = reasoning
        messages.append(message)
        turn_of.append(i)

    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        if require_assistant:
            raise BadRow("no_assistant_turn", "no user turn before any assistant turn")
        raise BadRow("no_user_turn", "no user message")
    # keep system messages that precede the first user turn, drop assistant ones
    keep = [m for m in range(first_user) if messages[m]["role"] == "system"] + list(range(first_user, len(messages)))
    if require_assistant:
        while keep and messages[keep[-1]]["role"] != "assistant":
            keep.pop()
        if not keep:
            raise BadRow("no_assistant_turn", "no assistant reply to a user turn")
    return Normalized([messages[m] for m in keep], [turn_of[m] for m in keep], turns_key, content_key)
