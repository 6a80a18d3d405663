"""Chat rows -> token ids + assistant loss mask (training), and prompts (evaluation).

    from data.chat import build_chat_dataset, chat_prompts
    ds, report = build_chat_dataset("sharegpt-package", tokenizer, max_length=2048, limit=1000)
    print(report.summary())          # kept 970 of 1000 rows; skipped: empty=3, ...
    ds[0]["input_ids"], ds[0]["loss_mask"], ds[0]["length"]

Rows come from data/sources.py and are judged by data/rows.py; conversations are rendered with
the tokenizer's own chat template.

Rendering is the serving one: message contents reach the chat template unchanged, and
`enable_thinking` (data.enable_thinking; None = the template's own default) is passed as a
server passes it. Loss mask convention: loss_mask[t] == 1 when the model generates token t in
an assistant turn: the content and the <|im_end|> that closes it, and for the final turn
everything after the generation prompt (with thinking on, the <think> block too). The MTP head
at position t predicts token t+2, so the trainer shifts; this module does no label shifting.

Caching: with `cache_dir`, a tokenized dataset is saved under a key of the source's content,
the tokenizer and the settings, and loaded from there next time (rank 0 tokenizes, the other
ranks and resumed runs load). The full ShareGPT (17,671 records, 21.5M tokens at max_length
2048) takes ~135 s on one core; use num_proc on bigger hosts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import datasets
import torch

from data.fingerprints import source_fingerprint, tokenizer_fingerprint
from data.rows import BadRow, SkipReport, normalize_messages, parse_row
from data.sources import load_chat_rows
from data.tokenizer import END_OF_TURN
from model.atomic import temp_path
from model.token_map import coverage, frequent_tokens

log = logging.getLogger(__name__)

# Private-use code points: stand-ins for assistant contents while the chat template renders.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


def thinking_kwargs(enable_thinking: bool | None) -> dict:
    """The chat-template keyword for a thinking setting: none when None (the template decides,
    as a server does when the request does not say; Qwen3's hybrid models then think)."""
    return {} if enable_thinking is None else {"enable_thinking": enable_thinking}


def served_messages(messages: list[dict], enable_thinking: bool | None) -> list[dict]:
    """The messages as a conversation served with this thinking setting holds them: with
    thinking off, assistant turns carry no reasoning."""
    if enable_thinking is not False:
        return messages
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]


def render_with_assistant_spans(tokenizer, messages: list[dict], enable_thinking: bool | None = None,
                                ) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the tokenizer's chat template, exactly as
    `apply_chat_template(messages, tokenize=False, **thinking_kwargs(enable_thinking))` does;
    return (text, spans).

    spans: [start, end) character ranges of what the model generates in each assistant turn:
    the content plus the `<|im_end|>` that closes it, and for the final turn everything after
    the generation prompt (with thinking on, the <think> block the model writes itself).
    Contents are located by rendering with a unique marker in place of each assistant content
    and aligning that render with the real one, so a user message that happens to contain an
    assistant's text cannot confuse the search, and the template's own insertions (role
    headers, an empty think block) stay outside the spans. BadRow("template") when the
    template renders an assistant content in a way this alignment cannot follow.
    """
    messages = served_messages(messages, enable_thinking)
    kw = thinking_kwargs(enable_thinking)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    marked = [
        {**m, "content": f"{_MARK_OPEN}{k}{_MARK_CLOSE}"} if m["role"] == "assistant" else m
        for k, m in enumerate(messages)
    ]
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, **kw)
    # rendered = P0 M0 P1 M1 ... Pn (markers M); text must be P0 c0 P1 c1 ... Pn, each c the
    # content as the template writes it (Qwen3's lstrips leading newlines of think-block turns)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    pieces, cursor = [], 0
    for k in turns:
        marker = f"{_MARK_OPEN}{k}{_MARK_CLOSE}"
        at = rendered.find(marker, cursor)
        if at < 0:
            raise ValueError(f"the chat template dropped assistant message {k}; it cannot be trained on")
        if not rendered.startswith(END_OF_TURN, at + len(marker)):
            raise ValueError(
                f"the chat template does not close an assistant turn with {END_OF_TURN}; "
                "use a Qwen-format tokenizer (scripts/build_tokenizer.py)"
            )
        pieces.append(rendered[cursor:at])
        cursor = at + len(marker)
    pieces.append(rendered[cursor:])
    spans, pos = [], 0
    for i, k in enumerate(turns):
        if not text.startswith(pieces[i], pos):
            raise BadRow("template", f"the chat template rendered around assistant message {k} differently")
        pos += len(pieces[i])
        content = messages[k]["content"]
        for cand in dict.fromkeys((content, content.lstrip("\n"), content.strip())):
            if text.startswith(cand + pieces[i + 1][: len(END_OF_TURN)], pos):
                break
        else:
            raise BadRow("template", f"the chat template rewrote the content of assistant message {k}")
        spans.append([pos, pos + len(cand) + len(END_OF_TURN)])
        pos += len(cand)
    if text[pos:] != pieces[-1]:
        raise BadRow("template", "the chat template rendered the end of the conversation differently")
    if turns and turns[-1] == len(messages) - 1:
        # what the model writes for the final turn starts where the generation prompt ends
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, **kw)
        if text.startswith(prompt) and len(prompt) <= spans[-1][0]:
            spans[-1][0] = len(prompt)
    return text, [tuple(sp) for sp in spans]


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


def tokenize_messages(tokenizer, messages: list[dict], max_length: int,
                      enable_thinking: bool | None = None) -> dict[str, list[int]]:
    """Token ids and loss mask of one conversation, truncated to `max_length` tokens.

    Returns {"input_ids": [...], "loss_mask": [...]}; the ids equal
    `tokenizer(apply_chat_template(messages, tokenize=False, **thinking_kwargs(enable_thinking)))`
    (reasoning dropped when thinking is off). Raises BadRow("too_long") when truncation leaves no
    assistant token at index >= 2 (the head predicts token t+2, so an earlier one has no input
    position to be predicted from).
    """
    text, spans = render_with_assistant_spans(tokenizer, messages, enable_thinking)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _mask_and_truncate(enc["input_ids"], enc["offset_mapping"], spans, max_length)


def _tokenize_batch(batch: dict, indices: list[int], tokenizer, max_length: int, enable_thinking: bool | None) -> dict:
    """datasets.map function: raw JSON rows -> input_ids, loss_mask, length, row (the raw row's
    index in the source), skip (reason|""), skip_where (the row's file:line when known, else "").

    Same result as tokenize_messages row by row, but the texts are encoded in one call, which
    the Rust tokenizer spreads over all cores.
    """
    n = len(batch["raw"])
    skip, where = [""] * n, [""] * n
    rendered = {}  # row index -> (text, spans)
    for i, raw in enumerate(batch["raw"]):
        try:
            row = parse_row(raw)
            rendered[i] = render_with_assistant_spans(tokenizer, normalize_messages(row), enable_thinking)
        except BadRow as e:
            skip[i], where[i] = e.reason, e.where
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
    return {"input_ids": input_ids, "loss_mask": loss_mask, "length": [len(x) for x in input_ids],
            "row": list(indices), "skip": skip, "skip_where": where}


def build_chat_dataset(
    source: str,
    tokenizer,
    max_length: int,
    limit: int | None = None,
    num_proc: int = 1,
    split: str = "train",
    cache_dir: str | Path | None = None,
    enable_thinking: bool | None = None,
) -> tuple[datasets.Dataset, SkipReport]:
    """Load, normalize, render and tokenize a chat source for training.

    Returns (dataset with columns input_ids, loss_mask, length, row; SkipReport); `row` is the
    index of the raw row in the source (what `row_prompts` renders prompts from). `limit`
    counts raw rows read, before skipping. `enable_thinking`: the chat template's switch (None:
    its default); with False, reasoning is dropped. Raises ValueError when no row survives.

    With `cache_dir`, the tokenized dataset is saved there under a key made of the source's
    content, the tokenizer (vocabulary, merges, chat template), max_length, limit and split, and
    loaded from there next time: in a multi-GPU run rank 0 tokenizes and the other ranks load.
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be positive; set data.max_length")
    if cache_dir is not None:
        key = hashlib.sha256("|".join([
            "chats-v2", source_fingerprint(source), tokenizer_fingerprint(tokenizer),
            str(max_length), str(limit), split, str(enable_thinking),
        ]).encode()).hexdigest()[:20]
        entry = Path(cache_dir) / f"chats-{key}"
        if (entry / "skip_report.json").exists():
            report = SkipReport.from_dict(json.loads((entry / "skip_report.json").read_text()))
            log.info("%s: tokenized rows from cache %s", source, entry)
            return datasets.load_from_disk(str(entry / "dataset")), report
        dataset, report = build_chat_dataset(source, tokenizer, max_length, limit, num_proc, split,
                                             enable_thinking=enable_thinking)
        tmp = temp_path(entry)
        dataset.save_to_disk(str(tmp / "dataset"))
        (tmp / "skip_report.json").write_text(json.dumps(report.as_dict()))
        try:
            tmp.rename(entry)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        return datasets.load_from_disk(str(entry / "dataset")), report
    rows = load_chat_rows(source, split=split, limit=limit)
    # An explicit fingerprint: otherwise datasets hashes the map function, tokenizer included
    # (seconds for a 151k vocab). This in-memory dataset is not written by `datasets` itself;
    # the cache above is ours.
    key = (f"{source}|{limit}|{max_length}|{len(tokenizer)}|{tokenizer.chat_template}|{enable_thinking}|"
           f"{rows._fingerprint}")
    tokenized = rows.map(
        _tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "enable_thinking": enable_thinking},
        batched=True,
        with_indices=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["raw"],
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        desc="tokenize chats",
    )
    skips = tokenized["skip"]
    report = SkipReport(total=len(skips))
    for reason, where in zip(skips, tokenized["skip_where"]):
        if reason:
            report.skip(BadRow(reason, where=where))
    report.kept = report.total - sum(report.skipped.values())
    if report.kept == 0:
        if report.skipped["too_long"]:
            raise ValueError(
                f"max_length={max_length} is too small to hold one assistant token; raise "
                f"data.max_length ({source}: {report.summary()})"
            )
        raise ValueError(f"no usable rows in {source}: {report.summary()}")
    keep = [i for i, s in enumerate(skips) if not s]
    dataset = tokenized.select(keep).remove_columns(["skip", "skip_where"]).flatten_indices()
    log.info("%s: %s", source, report.summary())
    return dataset, report


def _prompt_messages(row, require_user: bool = True) -> list[dict]:
    """The messages a row's first answer is generated from: an MT-Bench row's first turn, or a
    chat row's messages before its first assistant turn, contents as they are; BadRow if none."""
    if isinstance(row, dict) and "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise BadRow("wrong_type", "turns must be a non-empty list of strings")
        if not turns[0].strip():
            raise BadRow("empty", "first turn is empty")
        return [{"role": "user", "content": turns[0]}]
    messages = normalize_messages(row, require_assistant=False)
    first_assistant = next((k for k, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[:first_assistant]


def render_prompt(tokenizer, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    """Token ids of a served prompt: `apply_chat_template(messages, add_generation_prompt=True,
    **thinking_kwargs(enable_thinking))`, contents unchanged (what a chat endpoint sends the model)."""
    text = tokenizer.apply_chat_template(served_messages(messages, enable_thinking), tokenize=False,
                                         add_generation_prompt=True, **thinking_kwargs(enable_thinking))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompts(source: str, tokenizer, limit: int | None = None, enable_thinking: bool | None = None,
                 rows: list[int] | None = None) -> list[dict]:
    """Prompts for evaluation: [{"prompt_ids": [int], "category": str|None, "id": ...}].

    A chat row contributes its messages up to (excluding) the first assistant turn; a row with
    `prompt_ids` (a list of token ids) is used as it is; an MT-Bench row ({"question_id",
    "category", "turns"}) its first turn. Rendered as served (`render_prompt`): with
    enable_thinking=False the prompt ends in "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    with the template's default (None) or True in "<|im_start|>assistant\n". `rows`: only these
    raw row indices (in this order), e.g. a training run's held-out rows. Unusable rows are
    skipped and logged.
    """
    table = load_chat_rows(source, limit=limit)["raw"]
    picked = range(len(table)) if rows is None else rows
    prompts, report = [], SkipReport(total=len(picked))
    for i in picked:
        try:
            row = parse_row(table[i])
            if isinstance(row, dict) and "prompt_ids" in row:
                # already rendered and tokenized (e.g. the held-out prompts a training run saves)
                ids = row["prompt_ids"]
                if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                    raise BadRow("wrong_type", "prompt_ids must be a non-empty list of token ids")
                prompts.append({"prompt_ids": ids, "category": row.get("category"), "id": row.get("id", i)})
                continue
            messages = _prompt_messages(row)
        except BadRow as e:
            report.skip(e)
            continue
        prompts.append({"prompt_ids": render_prompt(tokenizer, messages, enable_thinking),
                        "category": row.get("category"), "id": row.get("question_id", row.get("id", i))})
    report.kept = len(prompts)
    if not prompts:
        raise ValueError(f"no usable prompts in {source}: {report.summary()}")
    if report.skipped:
        log.warning("%s: %s", source, report.summary())
    return prompts


def assistant_token_counts(ds: datasets.Dataset, vocab_size: int) -> torch.Tensor:
    """How often each token id [vocab_size] is an assistant token (loss_mask 1) in a
    build_chat_dataset() dataset: what the model writes (scripts/build_token_map.py)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for batch in ds.iter(batch_size=1024):
        ids = torch.tensor([t for row in batch["input_ids"] for t in row], dtype=torch.long)
        mask = torch.tensor([m for row in batch["loss_mask"] for m in row], dtype=torch.bool)
        counts += torch.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
    return counts


def token_map_from_chats(source: str, tokenizer, vocab_size: int, size: int, max_length: int,
                         enable_thinking: bool | None = None, limit: int | None = None,
                         num_proc: int = 1) -> tuple[torch.Tensor, dict]:
    """A draft vocabulary from a chat source (model/token_map.py): the `size` most frequent
    assistant token ids of its rows, rendered as training renders them, and what to record of it
    (size, coverage of the counted tokens, counts, rows, skipped rows, the data's fingerprint)."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"token map size {size} must be in [1, {vocab_size}] (the target's vocabulary)")
    ds, skips = build_chat_dataset(source, tokenizer, max_length, limit=limit, num_proc=num_proc,
                                   enable_thinking=enable_thinking)
    counts = assistant_token_counts(ds, vocab_size)
    ids = frequent_tokens(counts, size)
    return ids, {"size": size, "vocab_size": vocab_size, "coverage": coverage(counts, ids),
                 "assistant_tokens": int(counts.sum()), "distinct_tokens_seen": int((counts > 0).sum()),
                 "rows": len(ds), "skipped_rows": skips.as_dict(), "skip_summary": skips.summary(),
                 "data": {"source": str(source), "fingerprint": source_fingerprint(str(source)), "limit": limit},
                 "max_length": max_length, "thinking": enable_thinking}
