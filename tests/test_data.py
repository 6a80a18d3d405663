"""data/: truncated ShareGPT reading, row normalization and skipping, token ids + loss mask,
prompts for the evaluator, bucketed batch sampling and collation."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
import torch

from data.chat import build_chat_dataset, chat_prompts, tokenize_messages
from data.rows import BadRow, SkipReport, normalize_messages
from data.sources import load_chat_rows
from data.collate import BucketBatchSampler, collate_batch
from data.sharegpt import iter_json_array_records, package_sharegpt_path, write_sharegpt_jsonl

# the workplace's shared/ folder sits beside the checkout (and beside CI's fresh clone)
from data.sources import MT_BENCH_PATH as MT_BENCH

# One conversation in both formats; contents carry multi-byte characters on purpose (byte-level
# BPE splits them into several tokens that share one character offset).
SHAREGPT_ROW = {
    "id": "x1",
    "conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "What is 2+2? Answer in 中文."},
        {"from": "gpt", "value": "二加二等于四 (4). 🙂"},
        {"from": "human", "value": "And 3+3?"},
        {"from": "gpt", "value": "  Six.\n"},
    ],
}
OPENAI_ROW = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2? Answer in 中文."},
        {"role": "assistant", "content": "二加二等于四 (4). 🙂"},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
        {"role": "assistant", "content": "  Six.\n"},
    ]
}
GOOD_SHORT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}
# assistant turns before the first user turn are dropped, the rest kept
LEADING_ASSISTANT = {
    "conversations": [
        {"from": "gpt", "value": "...continued answer"},
        {"from": "human", "value": "Thanks"},
        {"from": "gpt", "value": "You're welcome."},
    ]
}
LONG_PROMPT = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
# (row, reason) for every class of bad row that a JSON value can express
BAD_ROWS = [
    ({"id": "no-conversation-key"}, "missing_field"),
    ({"conversations": [{"from": "human"}]}, "missing_field"),
    ({"conversations": "human: hi\ngpt: hello"}, "wrong_type"),
    ({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}, "wrong_type"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "yo"}]}, "unknown_role"),
    ({"conversations": []}, "empty"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]}, "empty"),
    ({"conversations": [{"from": "human", "value": "anyone?"}]}, "no_assistant_turn"),
    ({"conversations": [{"from": "gpt", "value": "only the model speaks"}]}, "no_assistant_turn"),
]
GOOD_ROWS = [SHAREGPT_ROW, OPENAI_ROW, GOOD_SHORT, LEADING_ASSISTANT]


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def _expected_skips(bad_rows):
    return dict(Counter(reason for _, reason in bad_rows))


# ---------------------------------------------------------------------------- sharegpt


def test_truncated_json_array_synthetic():
    records = iter_json_array_records(io.BytesIO(b'[{"a":1},{"b":'))
    assert list(records) == [{"a": 1}]
    assert (records.records, records.complete, records.unparsed_bytes) == (1, False, 5)
    # tiny chunks split values and multi-byte characters; a complete array is reported complete
    text = json.dumps([{"s": "é中🙂"}, 12345, [1, 2], "x"], ensure_ascii=False)
    records = iter_json_array_records(io.BytesIO(text.encode()), chunk_size=3)
    assert list(records) == [{"s": "é中🙂"}, 12345, [1, 2], "x"]
    assert (records.complete, records.unparsed_bytes) == (True, 0)
    assert list(iter_json_array_records(io.StringIO("[]"))) == []


def test_package_sharegpt_keeps_complete_records_only():
    with open(package_sharegpt_path(), "rb") as f:
        records = iter_json_array_records(f)
        first = list(itertools.islice(records, 20))
        assert all(isinstance(r["conversations"], list) and r["id"] for r in first)
        n = 20 + sum(1 for _ in records)  # the full 125 MB pass takes about a second
    assert 17_600 < n < 17_700  # about 17,672 complete conversations precede the cut
    assert not records.complete and records.unparsed_bytes > 0


def test_write_sharegpt_jsonl_limit_skip(tmp_path):
    out = tmp_path / "sg.jsonl"
    assert write_sharegpt_jsonl(out, limit=3, skip=2) == 3
    with open(package_sharegpt_path(), "rb") as f:
        expected = list(itertools.islice(iter_json_array_records(f), 2, 5))
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected


# ---------------------------------------------------------------------------- rows


def test_normalize_both_formats_and_leading_assistant():
    assert normalize_messages(SHAREGPT_ROW) == normalize_messages(OPENAI_ROW)
    assert [m["role"] for m in normalize_messages(SHAREGPT_ROW)] == [
        "system", "user", "assistant", "user", "assistant",
    ]
    assert normalize_messages(LEADING_ASSISTANT) == [
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    for row, reason in BAD_ROWS:
        with pytest.raises(BadRow) as e:
            normalize_messages(row)
        assert e.value.reason == reason, row


def test_contents_reach_the_template_unchanged(qwen3_tokenizer):
    """No stripping: what a chat endpoint would send the template, the template gets."""
    messages = normalize_messages(SHAREGPT_ROW)
    assert messages[-1]["content"] == "  Six.\n"
    tok = qwen3_tokenizer
    for thinking in (None, False, True):
        kw = {} if thinking is None else {"enable_thinking": thinking}
        out = tokenize_messages(tok, messages, max_length=4096, enable_thinking=thinking)
        assert out["input_ids"] == tok.apply_chat_template(messages, tokenize=True, **kw)["input_ids"]


def test_jsonl_mixing_bad_rows(qwen3_tokenizer, tmp_path):
    path = _write_jsonl(
        tmp_path / "mixed.jsonl", GOOD_ROWS + [b for b, _ in BAD_ROWS] + [LONG_PROMPT], ["{not json"]
    )
    ds, report = build_chat_dataset(path, qwen3_tokenizer, max_length=64)
    expected = _expected_skips(BAD_ROWS) | {"bad_json": 1, "too_long": 1}
    assert dict(report.skipped) == expected
    assert (report.total, report.kept) == (len(GOOD_ROWS) + len(BAD_ROWS) + 2, len(GOOD_ROWS))
    assert set(ds.column_names) == {"input_ids", "loss_mask", "length", "row"}
    assert ds["row"] == [0, 1, 2, 3]  # raw row indices of the kept rows (prompts are rendered from them)
    assert all(len(r["input_ids"]) == len(r["loss_mask"]) == r["length"] <= 64 for r in ds)
    assert report.as_dict()["skipped"] == dict(sorted(expected.items()))
    assert report.summary().startswith(f"kept {len(GOOD_ROWS)} of {report.total} rows; skipped: bad_json=1")


def test_json_array_with_bad_rows_and_truncated_tail(qwen3_tokenizer, tmp_path):
    text = json.dumps(GOOD_ROWS + [b for b, _ in BAD_ROWS], ensure_ascii=False)
    path = tmp_path / "rows.json"
    path.write_text(text[:-1] + ', {"conversations": [{"from": "human", "val')  # cut mid-record
    _, report = build_chat_dataset(str(path), qwen3_tokenizer, max_length=256)
    assert dict(report.skipped) == _expected_skips(BAD_ROWS)
    assert (report.total, report.kept) == (len(GOOD_ROWS) + len(BAD_ROWS), len(GOOD_ROWS))


def _with_bad_bytes(rows: list[dict], bad_at: set[int]) -> bytes:
    """JSONL bytes of `rows`; the rows at `bad_at` (0-based) get two bytes that are not UTF-8."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    for i in bad_at:
        lines[i] = lines[i].replace(b'"value": "', b'"value": "\xff\xfe', 1).replace(b'"content": "', b'"content": "\xff\xfe', 1)
    return b"\n".join(lines) + b"\n"


def test_invalid_utf8_is_a_bad_row_with_its_file_and_line(qwen3_tokenizer, tmp_path):
    rows = GOOD_ROWS + GOOD_ROWS
    path = tmp_path / "chats.jsonl"
    path.write_bytes(_with_bad_bytes(rows, {1, 5, 6, 7}))
    ds, report = build_chat_dataset(str(path), qwen3_tokenizer, max_length=256)
    assert report.skipped == Counter({"bad_encoding": 4}) and len(ds) == report.kept == len(rows) - 4
    assert report.where["bad_encoding"] == [f"{path}:2", f"{path}:6", f"{path}:7"]  # the first ones
    assert f"bad_encoding=4 ({path}:2, {path}:6, {path}:7, ...)" in report.summary()
    assert SkipReport.from_dict(json.loads(json.dumps(report.as_dict()))).summary() == report.summary()
    prompts = chat_prompts(str(path), qwen3_tokenizer)  # prompts read the same rows
    assert len(prompts) == len(rows) - 4


def test_invalid_utf8_in_a_json_array_is_a_bad_record(qwen3_tokenizer, tmp_path):
    path = tmp_path / "chats.json"
    path.write_bytes(b"[" + _with_bad_bytes(GOOD_ROWS, {2}).strip().replace(b"\n", b",\n") + b"]")
    _, report = build_chat_dataset(str(path), qwen3_tokenizer, max_length=256)
    assert report.skipped == Counter({"bad_encoding": 1}) and report.where["bad_encoding"] == [f"{path}, record 3"]


def test_parquet_with_bad_rows(qwen3_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # parquet holds one schema, so only the bad rows that fit it: both formats as columns
    msgs = lambda *pairs: [{"from": f, "value": v} for f, v in pairs]  # noqa: E731
    table = pa.Table.from_pylist(
        [
            {"conversations": msgs(("human", "Hi"), ("gpt", "Hello.")), "messages": None},
            {"conversations": None, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
            {"conversations": None, "messages": None},  # missing_field
            {"conversations": msgs(("human", "hi"), ("bing", "yo")), "messages": None},  # unknown_role
            {"conversations": [], "messages": None},  # empty
            {"conversations": msgs(("human", "hi"), ("gpt", None)), "messages": None},  # wrong_type
            {"conversations": msgs(("human", "anyone?")), "messages": None},  # no_assistant_turn
        ]
    )
    pq.write_table(table, tmp_path / "rows.parquet")
    _, report = build_chat_dataset(str(tmp_path / "rows.parquet"), qwen3_tokenizer, max_length=256)
    assert report.kept == 2
    assert dict(report.skipped) == {
        "missing_field": 1, "unknown_role": 1, "empty": 1, "wrong_type": 1, "no_assistant_turn": 1,
    }
    # a directory of files reads them all
    _write_jsonl(tmp_path / "more.jsonl", [GOOD_SHORT])
    assert len(load_chat_rows(str(tmp_path))) == 8


# ---------------------------------------------------------------------------- tokens


def test_formats_give_identical_ids(qwen3_tokenizer):
    a = tokenize_messages(qwen3_tokenizer, normalize_messages(SHAREGPT_ROW), max_length=4096, enable_thinking=False)
    b = tokenize_messages(qwen3_tokenizer, normalize_messages(OPENAI_ROW), max_length=4096, enable_thinking=False)
    assert a == b
    text = qwen3_tokenizer.apply_chat_template(normalize_messages(OPENAI_ROW), tokenize=False, enable_thinking=False)
    assert a["input_ids"] == qwen3_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_loss_mask_covers_exactly_the_assistant_tokens(qwen3_tokenizer):
    """Thinking off: the content of every assistant turn and its <|im_end|>, the empty think
    block (part of the served prompt) outside."""
    tok = qwen3_tokenizer
    messages = normalize_messages(SHAREGPT_ROW)
    out = tokenize_messages(tok, messages, max_length=4096, enable_thinking=False)
    ids, mask = out["input_ids"], out["loss_mask"]
    masked = [i for i, m in zip(ids, mask) if m]
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tok.decode(masked) == "".join(c + "<|im_end|>" for c in assistant)
    # the masked tokens form one contiguous run per assistant turn
    runs = [k for k, _ in itertools.groupby(mask)]
    assert runs == [0, 1, 0, 1, 0]  # ..., turn 1, ..., turn 2, trailing "\n"
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "<think>\n\n</think>\n\n" in unmasked and unmasked.count("<|im_start|>assistant\n") == 2
    # a user message that repeats the assistant's words does not move the mask
    echo = [{"role": "user", "content": "Say: Six."}, {"role": "assistant", "content": "Six."}]
    out = tokenize_messages(tok, echo, max_length=4096, enable_thinking=False)
    assert tok.decode([i for i, m in zip(out["input_ids"], out["loss_mask"]) if m]) == "Six.<|im_end|>"


@pytest.mark.parametrize("thinking", [None, True])
def test_thinking_trains_on_what_the_model_writes(qwen3_tokenizer, thinking):
    """Thinking on (or the Qwen3 template's default): the model writes the <think> block of the
    final turn itself, so it is in the mask, reasoning included; earlier turns' reasoning is not
    rendered (the template drops it from history)."""
    tok = qwen3_tokenizer
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "reasoning_content": "r1"},
                {"role": "user", "content": "2+2?\n"},
                {"role": "assistant", "content": "4", "reasoning_content": "add them"}]
    out = tokenize_messages(tok, messages, max_length=4096, enable_thinking=thinking)
    masked = tok.decode([i for i, m in zip(out["input_ids"], out["loss_mask"]) if m])
    assert masked == "Hello.<|im_end|><think>\nadd them\n</think>\n\n4<|im_end|>"
    off = tokenize_messages(tok, messages, max_length=4096, enable_thinking=False)  # reasoning dropped
    assert tok.decode([i for i, m in zip(off["input_ids"], off["loss_mask"]) if m]) == "Hello.<|im_end|>4<|im_end|>"
    assert "add them" not in tok.decode(off["input_ids"])


def test_truncation_and_too_small_max_length(qwen3_tokenizer, tmp_path):
    tok = qwen3_tokenizer
    messages = normalize_messages(SHAREGPT_ROW)
    full = tokenize_messages(tok, messages, max_length=4096)
    first_assistant = full["loss_mask"].index(1)
    cut = tokenize_messages(tok, messages, max_length=first_assistant + 3)
    assert cut["input_ids"] == full["input_ids"][: first_assistant + 3]
    assert cut["loss_mask"] == full["loss_mask"][: first_assistant + 3]
    with pytest.raises(BadRow) as e:
        tokenize_messages(tok, messages, max_length=first_assistant)
    assert e.value.reason == "too_long"
    path = _write_jsonl(tmp_path / "two.jsonl", [SHAREGPT_ROW, GOOD_SHORT])
    with pytest.raises(ValueError, match=r"max_length=4 is too small to hold one assistant token; raise data.max_length"):
        build_chat_dataset(path, tok, max_length=4)


def test_empty_and_missing_sources(qwen3_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        build_chat_dataset(str(empty), qwen3_tokenizer, max_length=64)
    with pytest.raises(ValueError, match="empty.jsonl"):
        chat_prompts(str(empty), qwen3_tokenizer)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_chat_rows(str(tmp_path / "nope.jsonl"))
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", [b for b, _ in BAD_ROWS])
    with pytest.raises(ValueError, match=r"no usable rows in .*bad.jsonl: kept 0 of 9 rows"):
        build_chat_dataset(only_bad, qwen3_tokenizer, max_length=64)


def test_sharegpt_package_source(qwen3_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3_MOE_MTP_CACHE", str(tmp_path))
    ds, report = build_chat_dataset("sharegpt-package", qwen3_tokenizer, max_length=512, limit=20)
    assert report.total == 20 and len(ds) == report.kept > 10
    assert len((tmp_path / "sharegpt_20.jsonl").read_text().splitlines()) == 20


def test_chat_prompts(qwen3_tokenizer, tmp_path):
    tok = qwen3_tokenizer
    prompts = chat_prompts(str(MT_BENCH), tok)  # shipped in data/mt_bench/, also named "mt-bench"
    assert [p["prompt_ids"] for p in chat_prompts("mt-bench", tok, limit=3)] == [p["prompt_ids"] for p in prompts[:3]]
    assert len(prompts) == 80
    assert (prompts[0]["id"], prompts[0]["category"]) == (81, "writing")
    text = tok.decode(prompts[0]["prompt_ids"])
    assert text.startswith("<|im_start|>user\nCompose an engaging travel blog post")
    # the template's default (Qwen3 thinks): the generation prompt alone; thinking off: an empty think block
    assert text.endswith("attractions.<|im_end|>\n<|im_start|>assistant\n")
    off = tok.decode(chat_prompts("mt-bench", tok, limit=1, enable_thinking=False)[0]["prompt_ids"])
    assert off.endswith("attractions.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # chat rows: everything before the first assistant turn
    path = _write_jsonl(tmp_path / "chats.jsonl", [SHAREGPT_ROW, {"conversations": [{"from": "human", "value": "Q?"}]}])
    prompts = chat_prompts(path, tok, limit=2, enable_thinking=False)
    assert tok.decode(prompts[0]["prompt_ids"]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2? Answer in 中文.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert (prompts[0]["id"], prompts[0]["category"]) == ("x1", None)
    assert tok.decode(prompts[1]["prompt_ids"]).startswith("<|im_start|>user\nQ?<|im_end|>")
    assert [p["id"] for p in chat_prompts(path, tok, rows=[1, 0])] == [1, "x1"]  # chosen rows, in that order


@pytest.mark.parametrize("thinking", [None, False, True])
def test_prompts_are_rendered_as_served(qwen3_tokenizer, tmp_path, thinking):
    """Prompt ids equal apply_chat_template(raw messages, add_generation_prompt=True) token for
    token, a prompt ending in a newline included (stripping it would change the tokens)."""
    tok = qwen3_tokenizer
    raw = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "def f(x):\n    return x\n"}]
    path = _write_jsonl(tmp_path / "p.jsonl", [{"messages": raw}, {"question_id": 7, "turns": ["Why?\n\n", "t2"]}])
    prompts = chat_prompts(path, tok, enable_thinking=thinking)
    kw = {} if thinking is None else {"enable_thinking": thinking}
    want = [tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True, **kw)["input_ids"]
            for m in (raw, [{"role": "user", "content": "Why?\n\n"}])]
    assert [p["prompt_ids"] for p in prompts] == want
    stripped = tok.apply_chat_template([{"role": "user", "content": "Why?"}], tokenize=True, add_generation_prompt=True,
                                       **kw)["input_ids"]
    assert want[1] != stripped


def test_skip_report():
    report = SkipReport(total=5, kept=3)
    report.skipped.update(["empty", "empty"])
    assert report.summary() == "kept 3 of 5 rows; skipped: empty=2"
    assert report.as_dict() == {"total": 5, "kept": 3, "skipped": {"empty": 2}}


# ---------------------------------------------------------------------------- batching


def _lengths(n=1001, seed=0):
    return np.random.default_rng(seed).integers(1, 2000, size=n).tolist()


def test_bucket_sampler_deterministic_and_epoch_dependent():
    lengths = _lengths()
    a = BucketBatchSampler(lengths, batch_size=4, seed=7, num_replicas=2, rank=1)
    b = BucketBatchSampler(lengths, batch_size=4, seed=7, num_replicas=2, rank=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BucketBatchSampler(lengths, 4, seed=8)) != list(BucketBatchSampler(lengths, 4, seed=7))


@pytest.mark.parametrize("drop_last", [True, False])
def test_bucket_sampler_ranks_disjoint_equal_and_covering(drop_last):
    lengths, R, bs = _lengths(), 3, 4
    samplers = [BucketBatchSampler(lengths, bs, seed=0, num_replicas=R, rank=r, drop_last=drop_last) for r in range(R)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    seen = [i for batches in per_rank for batch in batches for i in batch]
    if drop_last:
        assert all(len(batch) == bs for batches in per_rank for batch in batches)
        assert len(seen) == len(set(seen)) > len(lengths) - R * bs  # disjoint, all but a remainder
    else:
        assert set(seen) == set(range(len(lengths)))  # everything, a few padded repeats
        assert len(seen) - len(lengths) < R * bs


def test_bucket_sampler_groups_lengths_and_skips_cheaply():
    lengths = _lengths(5000)
    sampler = BucketBatchSampler(lengths, batch_size=8, seed=0)
    batches = list(sampler)
    arr = np.asarray(lengths)
    bucketed = np.mean([arr[b].max() - arr[b].min() for b in batches])
    rng = np.random.default_rng(1)
    random = np.mean([np.ptp(arr[rng.choice(len(arr), 8, replace=False)]) for _ in range(200)])
    assert bucketed < 0.1 * random
    # resuming = skipping the first batches of the same plan
    assert list(itertools.islice(sampler, 10, None)) == batches[10:]
    ordered = list(BucketBatchSampler(lengths, batch_size=8, seed=0, shuffle=False))
    assert ordered == list(BucketBatchSampler(lengths, batch_size=8, seed=1, shuffle=False))


def test_collate_batch_right_pads():
    rows = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8], "loss_mask": [1]}]
    batch = collate_batch(rows, pad_id=151643)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 151643, 151643]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate_batch(rows, pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_tokenized_rows_are_cached_by_content(qwen3_tokenizer, tmp_path, monkeypatch):
    """The second build with the same inputs loads from disk; other inputs make a new entry."""
    import data.chat as chat

    src = Path(_write_jsonl(tmp_path / "chats.jsonl", [SHAREGPT_ROW, OPENAI_ROW, {"messages": []}]))
    cache = tmp_path / "cache"
    ds1, rep1 = build_chat_dataset(str(src), qwen3_tokenizer, 256, cache_dir=cache)
    assert len(list(cache.glob("chats-*"))) == 1

    def boom(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(chat, "_tokenize_batch", boom)
    ds2, rep2 = build_chat_dataset(str(src), qwen3_tokenizer, 256, cache_dir=cache)
    assert ds2["input_ids"] == ds1["input_ids"] and ds2["loss_mask"] == ds1["loss_mask"]
    assert rep2.as_dict() == rep1.as_dict() and rep1.skipped["empty"] == 1
    monkeypatch.undo()
    build_chat_dataset(str(src), qwen3_tokenizer, 128, cache_dir=cache)  # another max_length
    src.write_text(src.read_text() + json.dumps(SHAREGPT_ROW) + "\n")  # another content
    build_chat_dataset(str(src), qwen3_tokenizer, 256, cache_dir=cache)
    assert len(list(cache.glob("chats-*"))) == 3 and not list(cache.glob(".tmp-*"))
