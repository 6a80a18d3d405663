"""Regeneration's output: rows appended as they finish, a state sidecar, resuming a killed run.

    check_out_path(out, data)                       # --out may not be, or sit inside, --data
    output = RegenOutput.open(out, settings, force=False)
    if not output.complete:
        for result in rows_in_order(start=output.rows_done):
            output.add(result)                      # RowResult, in input order
        output.finish()
    report = output.tally.report(total_rows)

Files, for `--out chats_regen.jsonl`:
  .chats_regen.jsonl.tmp-regen    the rows so far, one JSON line each, in input order (the
                                  temp name of model/atomic.py; locked while a run writes it)
  chats_regen.jsonl.regen-state   JSON: the run's settings, `rows_done` (input rows judged so
                                  far), `bytes` (of the partial file that holds their rows), the
                                  counts of the report so far, `complete`
  chats_regen.jsonl               the partial file, renamed when every input row is done

Rows are written (and synced) before the state that counts them, so after a kill the state is
true for a prefix of the partial file: a rerun with the same settings cuts the partial file to
that prefix and continues at row `rows_done`. The state is saved at most every `state_every_s`
seconds (rows after the last save are made again). It stays after the run: it is how a rerun
knows --out as its own (a rerun of a finished run does nothing) and which settings made it.

Refused unless `force`: a state with other settings (the differing keys are listed); an
existing --out without a matching state (another run's file, or the source itself); a partial
file shorter than its state says. With `force` the run starts over; an existing --out is
replaced only when the new one is complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from data.rows import MAX_WHERE, SkipReport
from model.atomic import atomic_write_text, temp_path

STATE_SUFFIX = ".regen-state"  # not a data suffix: a dir of outputs stays a valid data source
PARTIAL_TAG = "regen"
STATE_FORMAT = "regenerate-state/1"


class RowResult(NamedTuple):
    """What became of one input row: its output row, or the reason it was skipped."""

    index: int  # in the input
    row: dict | None  # None: skipped
    skip: str | None = None  # data.rows REASONS
    where: str = ""  # file:line of a skipped row, when known
    cut: str | None = None  # why the conversation ended early
    turns: int = 0  # assistant turns regenerated
    tokens: int = 0  # tokens generated


@dataclass
class Tally:
    """The counts of a regeneration report, over the rows judged so far."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    where: dict = field(default_factory=dict)
    turns: int = 0
    tokens: int = 0
    cuts: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, r: RowResult) -> None:
        self.turns += r.turns
        self.tokens += r.tokens
        if r.row is None:
            self.skipped[r.skip] += 1
            if r.where and len(self.where.setdefault(r.skip, [])) < MAX_WHERE:
                self.where[r.skip].append(r.where)
            return
        self.kept += 1
        if r.cut is not None:
            self.cuts[r.cut] += 1

    def as_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "where": self.where, "turns": self.turns,
                "tokens": self.tokens, "cuts": dict(self.cuts), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "Tally":
        return cls(d["kept"], Counter(d["skipped"]), dict(d["where"]), d["turns"], d["tokens"], Counter(d["cuts"]),
                   d["seconds"])

    def report(self, total: int) -> dict:
        skips = SkipReport(total=total, kept=self.kept, skipped=Counter(self.skipped), where=dict(self.where))
        return {"rows": skips.as_dict(), "summary": skips.summary(), "turns_regenerated": self.turns,
                "conversations_cut": dict(sorted(self.cuts.items())), "generated_tokens": self.tokens,
                "seconds": self.seconds, "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None}


def state_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + STATE_SUFFIX)


def partial_path(out: str | Path) -> Path:
    return temp_path(out, PARTIAL_TAG)


def check_out_path(out: str | Path, data: str) -> None:
    """Refuse an --out that is a directory, or equal to or inside the --data file or dir (it
    would replace the source, or become part of it)."""
    out_p, data_p = Path(out).absolute(), Path(data).expanduser()
    if out_p.is_dir():
        raise ValueError(f"--out '{out}' is a directory; pass a .jsonl file path")
    if not data_p.exists():
        return
    data_p = data_p.resolve()
    resolved = out_p.resolve()
    if resolved == data_p or data_p in resolved.parents:
        raise ValueError(f"--out '{out}' is {'the' if resolved == data_p else 'inside the'} --data source '{data}'; "
                         "write the regenerated rows somewhere else")


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {json.dumps(old)} then, {json.dumps(new)} now"]


def _read_state(path: Path) -> dict | None:
    """A state file's content; None when it is not one (cut short, or another file)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = ("settings", "rows_done", "bytes", "tally", "complete")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or any(k not in state for k in keys):
        return None
    return state


class RegenOutput:
    """The output of one regeneration run (module docstring)."""

    def __init__(self, out: Path, settings: dict, rows_done: int, tally: Tally, complete: bool, f=None,
                 state_every_s: float = 1.0):
        self.out, self.settings, self.rows_done, self.tally = out, settings, rows_done, tally
        self.complete, self._f, self.state_every_s = complete, f, state_every_s
        self._saved_at = time.monotonic()

    @classmethod
    def open(cls, out: str | Path, settings: dict, force: bool = False, state_every_s: float = 1.0) -> "RegenOutput":
        """Take --out for a run with `settings` (JSON-serializable): continue this run, or start
        over (always with `force`); ValueError with the way out when --out belongs to something else."""
        out = Path(out)
        settings = json.loads(json.dumps(settings))  # compared with what a state file gives back
        spath, partial = state_path(out), partial_path(out)
        state = _read_state(spath) if spath.exists() else None
        if state is None and spath.exists() and not force:
            raise ValueError(f"'{spath}' is not a regeneration state file; pass --force to start over "
                             "(an existing --out is replaced when the new run is complete)")
        ours = state is not None and state["settings"] == settings and not force
        if state is not None and not ours and not force:
            diff = "; ".join(_differences(state["settings"], settings))
            raise ValueError(f"'{out}' is being (or was) regenerated with other settings ({diff}); rerun with "
                             f"those settings to continue, pass --force to start over, or choose another --out")
        if ours and state["complete"]:
            if partial.is_file() and partial.stat().st_size == state["bytes"]:
                os.replace(partial, out)  # the run was killed between its last state and the rename
            if out.is_file() and out.stat().st_size == state["bytes"]:
                return cls(out, settings, state["rows_done"], Tally.from_dict(state["tally"]), True)
            ours = False  # --out was removed or replaced since
        if not ours and out.exists() and not force:
            raise ValueError(f"--out '{out}' exists and is not the output of this regeneration (no matching "
                             f"'{spath.name}'); pass --force to replace it when the new run is complete, "
                             "or choose another --out")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            f = open(partial, "a+b")  # noqa: SIM115 (held open, closed by finish/close)
        except OSError as e:
            raise ValueError(f"cannot write next to --out '{out}' ({e.strerror or e}); choose a writable --out") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ValueError(f"another regeneration is writing '{partial}' now; wait for it to end or choose "
                             "another --out") from None
        size = os.fstat(f.fileno()).st_size
        if ours and size < state["bytes"]:
            f.close()
            raise ValueError(f"'{partial}' holds {size} bytes, fewer than the {state['bytes']} its state "
                             f"'{spath.name}' counts; pass --force to start over")
        rows_done, tally = (state["rows_done"], Tally.from_dict(state["tally"])) if ours else (0, Tally())
        f.truncate(state["bytes"] if ours else 0)  # rows written after the last state are made again
        f.seek(0, os.SEEK_END)
        self = cls(out, settings, rows_done, tally, False, f, state_every_s)
        if not ours:
            self._save(complete=False)
        return self

    def _save(self, complete: bool) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        state = {"format": STATE_FORMAT, "settings": self.settings, "rows_done": self.rows_done,
                 "bytes": os.fstat(self._f.fileno()).st_size, "tally": self.tally.as_dict(), "complete": complete}
        atomic_write_text(state_path(self.out), json.dumps(state, indent=1, ensure_ascii=False) + "\n")
        self._saved_at = time.monotonic()

    def add(self, r: RowResult, seconds: float = 0.0) -> None:
        """Append one judged row (the next in input order); `seconds`: time spent since the last add."""
        assert r.index == self.rows_done, (r.index, self.rows_done)
        if r.row is not None:
            try:
                line = json.dumps(r.row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape: keep the escape
                line = json.dumps(r.row).encode("utf-8")
            self._f.write(line + b"\n")
        self.tally.add(r)
        self.tally.seconds += seconds
        self.rows_done = r.index + 1
        if time.monotonic() - self._saved_at >= self.state_every_s:
            self._save(complete=False)

    def save_progress(self) -> None:
        """Save the state now (a run stopped by an error or Ctrl-C keeps every row it wrote)."""
        if self._f is not None:
            self._save(complete=False)

    def finish(self) -> None:
        """Every row is done: save the state as complete, rename the partial file to --out."""
        self._save(complete=True)
        os.replace(partial_path(self.out), self.out)
        self.close()
        self.complete = True

    def discard(self) -> None:
        """Remove the partial file and the state (a run that kept no row)."""
        self.close()
        partial_path(self.out).unlink(missing_ok=True)
        state_path(self.out).unlink(missing_ok=True)

    def close(self) -> None:
        """Release the partial file; what was saved stays for a rerun."""
        if self._f is not None:
            self._f.close()
            self._f = None
