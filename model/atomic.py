"""Atomic writes: a file or a directory appears complete, or not at all.

    atomic_write_text(path, text)                  # JSON, YAML, manifests
    with atomic_file(path, "wb") as f: ...         # anything streamed
    with atomic_dir(out) as tmp: ...               # a whole directory; replaces `out` at the end

Every writer in the project goes through these, so there is one temp-name scheme: the temp
sibling `.<name>.tmp-<tag>` (the tag is the pid unless the caller names one, e.g. a step that
all ranks of a distributed run write into). The temp lies next to its destination, on the same
filesystem, so the final `os.replace` is atomic. A crash leaves only such a dot-file behind,
which the next writer of the same name and tag removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temp_path(path: str | Path, tag: str | int | None = None) -> Path:
    """The temp sibling of `path` used while it is being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if tag is None else tag}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp sibling of `path` for writing; on a clean exit it is flushed, synced and
    renamed over `path`; on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    _remove(tmp)
    f = open(tmp, mode, encoding=None if "b" in mode else encoding)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`. An existing `out` is first renamed aside and
    deleted last, so a crash leaves the old or the new directory in place, never half of one."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    _remove(old)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path, tag: str | int | None = None) -> Iterator[Path]:
    """Yield an empty temp directory next to `out`; on a clean exit it replaces `out`
    (`replace_dir`); on an exception it is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out, tag)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
