"""Chat sources -> raw rows: local files and directories, the packaged ShareGPT, hub datasets.

    rows = load_chat_rows("chats.jsonl", limit=1000)    # a Dataset with one column, "raw"

Sources: a local .jsonl/.json/.parquet file or a directory of them, the special names
"sharegpt-package" (data/sharegpt.py) and "mt-bench" (the 80 MT-Bench questions shipped in
data/mt_bench/), or a hub dataset id (not reachable in every workplace).
Each row is kept as its JSON text and judged later, one by one (data/rows.py); a row of a
.jsonl/.json file that is not valid UTF-8 is kept as a marker with its file and line, and
judged a `bad_encoding` row there.

Caching: "sharegpt-package" is first written to $QWEN3_MOE_MTP_CACHE (default
~/.cache/qwen3_moe_mtp)/sharegpt_{limit|all}.jsonl, atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import datasets

from data.rows import bad_encoding_row
from data.sharegpt import SHAREGPT_PACKAGE, iter_json_array_records, write_sharegpt_jsonl

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")
MT_BENCH = "mt-bench"  # source name of the shipped MT-Bench questions
MT_BENCH_PATH = Path(__file__).resolve().parent / "mt_bench" / "question.jsonl"


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
    # -sig: tolerate a byte-order mark. surrogateescape: a byte that is not UTF-8 becomes a lone
    # surrogate instead of stopping the read, so its row is counted as bad_encoding and skipped.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix == ".json" and head.startswith("["):
            records = iter_json_array_records(f)
            for i, record in enumerate(records, 1):
                text = json.dumps(record, ensure_ascii=False)
                yield text if _is_utf8(text) else bad_encoding_row(f"{path}, record {i}")
            if not records.complete:
                log.warning(
                    "%s: JSON array is truncated or malformed after record %d; %d bytes ignored",
                    path, records.records, records.unparsed_bytes,
                )
            return
        # JSON lines (.jsonl, or a .json file holding one object per line as `datasets` allows)
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield line if _is_utf8(line) else bad_encoding_row(f"{path}:{lineno}")


def _is_utf8(text: str) -> bool:
    """False when `text` holds a lone surrogate: a byte that was not UTF-8 (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _raw_rows(source: str, split: str, limit: int | None) -> Iterator[str]:
    if source == MT_BENCH:
        yield from _raw_rows_of_file(MT_BENCH_PATH)
        return
    if source == SHAREGPT_PACKAGE:
        cache = _cache_dir() / f"sharegpt_{'all' if limit is None else limit}.jsonl"
        if not cache.is_file():
            n = write_sharegpt_jsonl(cache, limit=limit)
            log.info("wrote %d ShareGPT records to %s", n, cache)
        yield from _raw_rows_of_file(cache)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise ValueError(f"{source} holds no {'/'.join(SUFFIXES)} files")
        for p in files:
            yield from _raw_rows_of_file(p)
        return
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ValueError(f"{source}: unsupported file type; use one of {', '.join(SUFFIXES)}")
        yield from _raw_rows_of_file(path)
        return
    if path.suffix in SUFFIXES or source.startswith((".", "/", "~")):
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
