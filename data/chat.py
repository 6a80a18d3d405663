"""Chat data: raw rows -> normalized messages -> token ids + assistant loss mask.

Accepted row formats (per row; a file may mix them):
  ShareGPT  {"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"chatgpt"|"bard"|
                                 "model"|"system", "value": str}, ...]}
  OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
            (content may also be a list of {"type": "text", "text": str} parts; an assistant
            message may carry "reasoning_content", rendered into the <think> block)
  MT-Bench  {"question_id", "category", "turns": [str, ...]}   (chat_prompts only)

Sources: a local .jsonl/.json/.parquet file or a directory of them, the special name
"sharegpt-package" (data/sharegpt.py), or a hub dataset id (not reachable in this workplace).

    from data.chat import build_chat_dataset, chat_prompts
    ds, report = build_chat_dataset("sharegpt-package", tokenizer, max_length=2048, limit=1000)
    print(report.summary())          # kept 970 of 1000 rows; skipped: empty=3, ...
    ds[0]["input_ids"], ds[0]["loss_mask"], ds[0]["length"]

Loss mask convention: loss_mask[t] == 1 when token t belongs to an assistant turn's content or
its closing <|im_end|>, i.e. token t is a training target. The MTP head at position t predicts
token t+2, so the trainer shifts; this module does no label shifting.

Row skipping: a bad row never stops a run. Each is counted under one reason (REASONS) in a
SkipReport, and the run fails only when no row survives.

Caching: "sharegpt-package" is first written to $QWEN3_MOE_MTP_CACHE (default
~/.cache/qwen3_moe_mtp)/sharegpt_{limit|all}.jsonl, atomically. Tokenized datasets stay in
memory and are not cached on disk: each rank tokenizes its own (identical) copy. The full
ShareGPT (17,671 records, 21.5M tokens at max_length 2048) takes ~135 s on one core; use
num_proc on bigger hosts (the workers start in a few seconds: the tokenizer is pickled to each).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from data.sharegpt import SHAREGPT_PACKAGE, iter_json_array_records, write_sharegpt_jsonl
from data.tokenizer import END_OF_TURN

log = logging.getLogger(__name__)

# Skip reasons; the exact strings are the keys of SkipReport.skipped.
REASONS = (
    "bad_json",  # a line of a .jsonl file is not valid JSON
    "missing_field",  # no conversations/messages key, or a message without from/value, role/content
    "wrong_type",  # e.g. conversations is a string, content is a number
    "unknown_role",  # a role outside the accepted names
    "empty",  # zero messages, or a user/assistant message with empty content
    "no_assistant_turn",  # nothing to train on after dropping leading assistant turns
    "no_user_turn",  # chat_prompts only: no user message to prompt with
    "too_long",  # no assistant token left at index >= 2 after truncation to max_length
)

_ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
_SUFFIXES = (".jsonl", ".json", ".parquet")
# Private-use code points: stand-ins for assistant contents while the chat template renders.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


class BadRow(Exception):
    """A row that cannot be used; `reason` is one of REASONS, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipReport:
    """How many raw rows were read (`total`), kept, and skipped per reason."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line, e.g. 'kept 970 of 1000 rows; skipped: empty=3, too_long=27'."""
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()) if n)
        return f"kept {self.kept} of {self.total} rows; skipped: {reasons or 'none'}"

    def as_dict(self) -> dict:
        """{"total": int, "kept": int, "skipped": {reason: count}} (JSON-serializable)."""
        return {"total": self.total, "kept": self.kept, "skipped": dict(sorted(self.skipped.items()))}


# ----------------------------------------------------------------------------------------------
# rows -> messages


def _content_text(content, where: str) -> str:
    """A message's content as a string: a str, or a list of OpenAI text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise BadRow("wrong_type", f"{where} is {type(content).__name__}, expected str")


def normalize_messages(row: dict, require_assistant: bool = True) -> list[dict]:
    """Turn one ShareGPT or OpenAI row into [{"role", "content"}, ...] or raise BadRow.

    What is changed, and why:
      - roles map to system/user/assistant (ShareGPT human->user, gpt/chatgpt/bard/model->assistant);
      - content is stripped of surrounding whitespace (ShareGPT values often carry it);
      - empty system messages are dropped; an empty user/assistant message rejects the row
        ("empty"), since dropping it would merge two turns of one side;
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
        turns, role_key, content_key = row["conversations"], "from", "value"
    elif row.get("messages") is not None:
        turns, role_key, content_key = row["messages"], "role", "content"
    else:
        raise BadRow("missing_field", f"no 'conversations' or 'messages' in keys {sorted(row)[:8]}")
    if not isinstance(turns, list):
        raise BadRow("wrong_type", f"messages are {type(turns).__name__}, expected a list")
    if not turns:
        raise BadRow("empty", "zero messages")

    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"message {i} is {type(turn).__name__}, expected an object")
        if role_key not in turn or content_key not in turn:
            raise BadRow("missing_field", f"message {i} lacks '{role_key}' or '{content_key}'")
        name = turn[role_key]
        if not isinstance(name, str):
            raise BadRow("wrong_type", f"message {i} {role_key} is {type(name).__name__}")
        role = _ROLE_NAMES.get(name.lower())
        if role is None:
            raise BadRow("unknown_role", f"message {i} {role_key}={name!r}")
        content = _content_text(turn[content_key], f"message {i} {content_key}").strip()
        if not content:
            if role == "system":
                continue
            raise BadRow("empty", f"message {i} ({role}) has empty content")
        message = {"role": role, "content": content}
        reasoning = turn.get("reasoning_content")
        if role == "assistant" and isinstance(reasoning, str) and reasoning.strip():
            message["reasoning_content"] = reasoning.strip()
        messages.append(message)

    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        if require_assistant:
            raise BadRow("no_assistant_turn", "no user turn before any assistant turn")
        raise BadRow("no_user_turn", "no user message")
    # keep system messages that precede the first user turn, drop assistant ones
    messages = [m for m in messages[:first_user] if m["role"] == "system"] + messages[first_user:]
    if require_assistant:
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("no_assistant_turn", "no assistant reply to a user turn")
    return messages


# ----------------------------------------------------------------------------------------------
# sources -> raw rows


def _cache_dir() -> Path:
    """Where derived files go: $QWEN3_MOE_MTP_CACHE or ~/.cache/qwen3_moe_mtp."""
    return Path(os.environ.get("QWEN3_MOE_MTP_CACHE", Path.home() / ".cache" / "qwen3_moe_mtp"))


def _raw_rows_of_file(path: Path) -> Iterator[str]:
    """Yield each row of one file as a JSON string (invalid JSONL lines are yielded as-is)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield json.dumps(row, ensure_ascii=False, default=str)
        return
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix == ".json" and head.startswith("["):
            records = iter_json_array_records(f)
            for record in records:
                yield json.dumps(record, ensure_ascii=False)
            if not records.complete:
                log.warning(
                    "%s: JSON array is truncated or malformed after record %d; %d bytes ignored",
                    path, records.records, records.unparsed_bytes,
                )
            return
        # JSON lines (.jsonl, or a .json file holding one object per line as `datasets` allows)
        for line in f:
            line = line.strip()
            if line:
                yield line


def _raw_rows(source: str, split: str, limit: int | None) -> Iterator[str]:
    if source == SHAREGPT_PACKAGE:
        cache = _cache_dir() / f"sharegpt_{'all' if limit is None else limit}.jsonl"
        if not cache.is_file():
            n = write_sharegpt_jsonl(cache, limit=limit)
            log.info("wrote %d ShareGPT records to %s", n, cache)
        yield from _raw_rows_of_file(cache)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
        if not files:
            raise ValueError(f"{source} holds no {'/'.join(_SUFFIXES)} files")
        for p in files:
            yield from _raw_rows_of_file(p)
        return
    if path.is_file():
        if path.suffix not in _SUFFIXES:
            raise ValueError(f"{source}: unsupported file type; use one of {', '.join(_SUFFIXES)}")
        yield from _raw_rows_of_file(path)
        return
    if path.suffix in _SUFFIXES or source.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{source} does not exist; pass an existing .jsonl/.json/.parquet file or directory, "
            f"'{SHAREGPT_PACKAGE}' for the packaged ShareGPT, or a hub dataset id"
        )
    try:
        hub = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise ValueError(
            f"cannot load {source!r}: not a local path and the hub load failed ({type(e).__name__}: "
            f"{e}); pass a local .jsonl/.json/.parquet path or '{SHAREGPT_PACKAGE}'"
        ) from e
    for row in hub:
        yield json.dumps(row, ensure_ascii=False, default=str)


def load_chat_rows(source: str, split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """Read the first `limit` raw rows of `source` into a Dataset with one column, "raw".

    Each row is kept as its JSON text (`json.loads(ds[i]["raw"])` gives the dict back): Arrow
    needs one schema per column, and a file that mixes, say, a list-valued `conversations` with
    a string-valued one must not fail as a whole. Rows are judged later, one by one.
    `split` applies to hub datasets only. An empty source raises ValueError naming it.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} must be positive or None")
    raws = []
    for raw in _raw_rows(source, split, limit):
        raws.append(raw)
        if limit is not None and len(raws) >= limit:
            break
    if not raws:
        raise ValueError(f"{source} contains no rows (empty file?); point the data source at a chat dataset")
    return datasets.Dataset.from_dict({"raw": raws})


# ----------------------------------------------------------------------------------------------
# messages -> tokens


def _parse_row(raw: str):
    """One stored row (JSON text) back to its object; unparsable text is a `bad_json` row."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRow("bad_json", str(e)) from None


def render_with_assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the tokenizer's chat template; return (text, spans).

    spans: [start, end) character ranges of each assistant turn's content plus the
    `<|im_end|>` that closes it. Found by rendering with a unique marker in place of each
    assistant content and substituting the real content back, so a user message that happens
    to contain an assistant's text cannot confuse the search, and the template's own insertions
    (role headers, the <think></think> block of the last turn) stay outside the spans.
    """
    marked = [
        {**m, "content": f"{_MARK_OPEN}{k}{_MARK_CLOSE}"} if m["role"] == "assistant" else m
        for k, m in enumerate(messages)
    ]
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, enable_thinking=False)
    pieces, spans, cursor, length = [], [], 0, 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        marker = f"{_MARK_OPEN}{k}{_MARK_CLOSE}"
        at = rendered.find(marker, cursor)
        if at < 0:
            raise ValueError(f"the chat template dropped assistant message {k}; it cannot be trained on")
        if not rendered.startswith(END_OF_TURN, at + len(marker)):
            raise ValueError(
                f"the chat template does not close an assistant turn with {END_OF_TURN}; "
                "use a Qwen-format tokenizer (scripts/build_tokenizer.py)"
            )
        pieces += [rendered[cursor:at], m["content"]]
        length += at - cursor
        spans.append((length, length + len(m["content"]) + len(END_OF_TURN)))
        length += len(m["content"])
        cursor = at + len(marker)
    pieces.append(rendered[cursor:])
    return "".join(pieces), spans


def _mask_and_truncate(input_ids, offsets, spans, max_length: int) -> dict[str, list[int]]:
    """Loss mask from character spans, then truncation; raises BadRow("too_long")."""
    # A token is an assistant token when its first character lies inside a span; tokens and
    # spans are both in text order, so one forward walk suffices.
    loss_mask, s = [], 0
    for start, _ in offsets:
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        loss_mask.append(int(s < len(spans) and spans[s][0] <= start))
    input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    if not any(loss_mask[2:]):
        raise BadRow("too_long", f"no assistant token within max_length={max_length}")
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def tokenize_messages(tokenizer, messages: list[dict], max_length: int) -> dict[str, list[int]]:
    """Token ids and loss mask of one conversation, truncated to `max_length` tokens.

    Returns {"input_ids": [...], "loss_mask": [...]}; the ids equal
    `tokenizer(apply_chat_template(messages, tokenize=False, enable_thinking=False))`.
    Raises BadRow("too_long") when truncation leaves no assistant token at index >= 2 (the
    head predicts token t+2, so an earlier one has no input position to be predicted from).
    """
    text, spans = render_with_assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _mask_and_truncate(enc["input_ids"], enc["offset_mapping"], spans, max_length)


def _tokenize_batch(batch: dict, tokenizer, max_length: int) -> dict:
    """datasets.map function: raw JSON rows -> input_ids, loss_mask, length, skip (reason|"").

    Same result as tokenize_messages row by row, but the texts are encoded in one call, which
    the Rust tokenizer spreads over all cores.
    """
    n = len(batch["raw"])
    skip = [""] * n
    rendered = {}  # row index -> (text, spans)
    for i, raw in enumerate(batch["raw"]):
        try:
            row = _parse_row(raw)
            rendered[i] = render_with_assistant_spans(tokenizer, normalize_messages(row))
        except BadRow as e:
            skip[i] = e.reason
    order = list(rendered)
    enc = tokenizer(
        [rendered[i][0] for i in order], add_special_tokens=False, return_offsets_mapping=True
    ) if order else {"input_ids": [], "offset_mapping": []}
    input_ids, loss_mask = [[] for _ in range(n)], [[] for _ in range(n)]
    for k, i in enumerate(order):
        try:
            tokens = _mask_and_truncate(enc["input_ids"][k], enc["offset_mapping"][k], rendered[i][1], max_length)
        except BadRow as e:
            skip[i] = e.reason
            continue
        input_ids[i], loss_mask[i] = tokens["input_ids"], tokens["loss_mask"]
    return {"input_ids": input_ids, "loss_mask": loss_mask, "length": [len(x) for x in input_ids], "skip": skip}


def build_chat_dataset(
    source: str,
    tokenizer,
    max_length: int,
    limit: int | None = None,
    num_proc: int = 1,
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> tuple[datasets.Dataset, SkipReport]:
    """Load, normalize, render and tokenize a chat source for training.

    Returns (dataset with columns input_ids, loss_mask, length; SkipReport). `limit` counts raw
    rows read, before skipping. Raises ValueError when no row survives.

    With `cache_dir`, the tokenized dataset is saved there under a key made of the source's
    content, the tokenizer (vocabulary, merges, chat template), max_length, limit and split, and
    loaded from there next time: in a multi-GPU run rank 0 tokenizes and the other ranks load.
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be positive; set data.max_length")
    if cache_dir is not None:
        from data.hidden_states import source_fingerprint, tokenizer_fingerprint

        key = hashlib.sha256("|".join([
            "chats-v1", source_fingerprint(source), tokenizer_fingerprint(tokenizer),
            str(max_length), str(limit), split,
        ]).encode()).hexdigest()[:20]
        entry = Path(cache_dir) / f"chats-{key}"
        if (entry / "skip_report.json").exists():
            saved = json.loads((entry / "skip_report.json").read_text())
            report = SkipReport(total=saved["total"], skipped=Counter(saved["skipped"]))
            report.kept = saved["kept"]
            log.info("%s: tokenized rows from cache %s", source, entry)
            return datasets.load_from_disk(str(entry / "dataset")), report
        dataset, report = build_chat_dataset(source, tokenizer, max_length, limit, num_proc, split)
        tmp = Path(cache_dir) / f".tmp-chats-{key}-{os.getpid()}"
        dataset.save_to_disk(str(tmp / "dataset"))
        (tmp / "skip_report.json").write_text(json.dumps(report.as_dict()))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        return datasets.load_from_disk(str(entry / "dataset")), report
    rows = load_chat_rows(source, split=split, limit=limit)
    # An explicit fingerprint: otherwise datasets hashes the map function, tokenizer included
    # (seconds for a 151k vocab). The dataset is in memory, so nothing is cached on disk anyway.
    key = f"{source}|{limit}|{max_length}|{len(tokenizer)}|{tokenizer.chat_template}|{rows._fingerprint}"
    tokenized = rows.map(
        _tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["raw"],
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        desc="tokenize chats",
    )
    skips = tokenized["skip"]
    report = SkipReport(total=len(skips), skipped=Counter(s for s in skips if s))
    report.kept = report.total - sum(report.skipped.values())
    if report.kept == 0:
        if report.skipped["too_long"]:
            raise ValueError(
                f"max_length={max_length} is too small to hold one assistant token; raise "
                f"data.max_length ({source}: {report.summary()})"
            )
        raise ValueError(f"no usable rows in {source}: {report.summary()}")
    keep = [i for i, s in enumerate(skips) if not s]
    dataset = tokenized.select(keep).remove_columns(["skip"]).flatten_indices()
    log.info("%s: %s", source, report.summary())
    return dataset, report


def chat_prompts(source: str, tokenizer, limit: int | None = None) -> list[dict]:
    """Prompts for evaluation: [{"prompt_ids": [int], "category": str|None, "id": ...}].

    A chat row contributes its messages up to (excluding) the first assistant turn; a row with
    `prompt_ids` (a list of token ids) is used as it is; an MT-Bench row ({"question_id", "category", "turns"}) its first turn. Rendered with
    add_generation_prompt=True, enable_thinking=False, i.e. ending in
    "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n". Unusable rows are skipped and logged.
    """
    rows = load_chat_rows(source, limit=limit)
    prompts, report = [], SkipReport(total=len(rows))
    for i, raw in enumerate(rows["raw"]):
        try:
            row = _parse_row(raw)
            if isinstance(row, dict) and "prompt_ids" in row:
                # already rendered and tokenized (e.g. the held-out prompts a training run saves)
                ids = row["prompt_ids"]
                if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                    raise BadRow("wrong_type", "prompt_ids must be a non-empty list of token ids")
                prompts.append({"prompt_ids": ids, "category": row.get("category"), "id": row.get("id", i)})
                continue
            if isinstance(row, dict) and "turns" in row:
                turns = row["turns"]
                if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                    raise BadRow("wrong_type", "turns must be a non-empty list of strings")
                if not turns[0].strip():
                    raise BadRow("empty", "first turn is empty")
                messages = [{"role": "user", "content": turns[0].strip()}]
            else:
                messages = normalize_messages(row, require_assistant=False)
                first_assistant = next(
                    (k for k, m in enumerate(messages) if m["role"] == "assistant"), len(messages)
                )
                messages = messages[:first_assistant]
        except BadRow as e:
            report.skipped[e.reason] += 1
            continue
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        prompts.append(
            {
                "prompt_ids": tokenizer(text, add_special_tokens=False)["input_ids"],
                "category": row.get("category"),
                "id": row.get("question_id", row.get("id", i)),
            }
        )
    report.kept = len(prompts)
    if not prompts:
        raise ValueError(f"no usable prompts in {source}: {report.summary()}")
    if report.skipped:
        log.warning("%s: %s", source, report.summary())
    return prompts
