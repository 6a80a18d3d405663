"""A run dir (`train.output_dir`) belongs to one run: checked, locked and claimed before the target loads.

    run = open_run(cfg, rank=0, num_processes=1)    # every rank; rank 0 also takes the lock
    ...                                               # run.run_id, run.resume_from
    run.close()                                       # releases the lock (rank 0)

What `open_run` refuses, each with a one-line ValueError that names the way out:
- an output dir that cannot be written (found before minutes of target loading, not after);
- a second run in the same dir while the first holds its lock (`run.lock`: pid, host, start
  time); a lock left by a dead process on this host is taken over with a warning;
- a fresh run (`train.resume=none`, or `auto` with no checkpoint) in a dir that holds another
  run's checkpoints or final weights: it would mix two runs' outputs and its pruning would
  delete the wrong checkpoints;
- a resume whose checkpoint does not verify or whose config changes the trajectory
  (train/checkpoint.py);
- an `export.out` that holds something this run did not write.

The run's id is kept in `run.json` and in every checkpoint; a resumed run keeps its id, so
its own checkpoints, and its own earlier export, are recognised as its own.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from model.atomic import atomic_write_text, temp_path
from model.export import EXPORT_INFO_NAME
from train.checkpoint import check_resume, checkpoint_dirs, checkpoint_run_id, choose_checkpoint
from train.common import print0
from train.config import Config

RUN_INFO_NAME = "run.json"
LOCK_NAME = "run.lock"
FINAL_NAME = "final"


def check_writable(path: Path, key: str) -> None:
    """Create `path` if needed and write a probe file in it; ValueError naming `key` if that fails."""
    probe = path / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{key}={path} is not writable ({e.strerror or e}); choose a directory you can write to") from None


# ----------------------------------------------------------------------------- the lock

def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    start = holder.get("pid_start")
    return start is None or _process_start(pid) in (None, start)


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


class RunLock:
    """`run.lock` in the output dir, held by rank 0 of one run. The file is created whole (linked
    from a temp file), so two runs can never both create it."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.me = {
            "pid": os.getpid(), "host": socket.gethostname(), "pid_start": _process_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        self.held = False

    def _read(self, path: Path) -> dict:
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _create(self) -> bool:
        tmp = temp_path(self.path)
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> RunLock:
        if self._create():
            self.held = True
            return self
        holder = self._read(self.path)
        local = holder.get("host") == self.me["host"]
        if not holder or not local or _alive(holder):
            who = _describe(holder) if holder else "a run whose lock file is unreadable"
            raise ValueError(
                f"train.output_dir={self.path.parent} is in use by another run ({who}); wait for it to end or "
                f"choose another train.output_dir (if that run is gone, delete {self.path})"
            )
        # A dead process on this host: move its lock aside (one taker wins the rename), check it
        # is still the one judged stale, and create ours.
        aside = self.path.with_name(f".{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            pass
        else:
            if self._read(aside) != holder:  # another run replaced it meanwhile: put it back
                os.rename(aside, self.path)
                return self.acquire()
            aside.unlink()
        if not self._create():
            return self.acquire()
        print0(f"warning: took over the lock of {self.path.parent} left by a process that is gone ({_describe(holder)})")
        self.held = True
        return self

    def release(self) -> None:
        if self.held and self._read(self.path) == self.me:
            self.path.unlink(missing_ok=True)
        self.held = False


# ----------------------------------------------------------------------------- ownership

def read_run_id(out_dir: Path) -> str | None:
    try:
        return json.loads((Path(out_dir) / RUN_INFO_NAME).read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_info(out_dir: Path, run_id: str) -> None:
    atomic_write_text(Path(out_dir) / RUN_INFO_NAME, json.dumps({"run_id": run_id}, indent=1))


def foreign_outputs(out_dir: Path, run_id: str | None) -> list[str]:
    """Names of the checkpoints and final weights in `out_dir` that belong to another run than
    `run_id`: all of them for a fresh run (`run_id=None`); for a resumed run, those that name
    another run (a checkpoint without a readable manifest was already reported as not verifying)."""
    if run_id is None:
        found = [p.name for _, p in checkpoint_dirs(out_dir)]
        return found + [FINAL_NAME] if (out_dir / FINAL_NAME).exists() else found
    found = [p.name for _, p in checkpoint_dirs(out_dir) if checkpoint_run_id(p) not in (run_id, None)]
    owner = read_run_id(out_dir)
    if (out_dir / FINAL_NAME).exists() and owner is not None and owner != run_id:
        found.append(FINAL_NAME)
    return found


def export_dir(cfg: Config) -> Path:
    return Path(cfg.export.out) if cfg.export.out else Path(cfg.train.output_dir) / "export"


def export_is_ours(out: Path, run_id: str) -> bool:
    """False when `out` is absent or empty; True when it holds this run's earlier export (its
    export_info.json names the run); ValueError when it holds anything else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    try:
        owner = json.loads((out / EXPORT_INFO_NAME).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner == run_id:
        return True
    raise ValueError(
        f"export.out={out} exists, is not empty and was not written by this run; choose another export.out, "
        "remove it, or set export.enabled=false"
    )


@dataclass
class Run:
    out_dir: Path
    run_id: str
    resume_from: Path | None
    lock: RunLock | None

    def claim(self) -> None:
        """Rank 0, once every check passed: the dir now names this run."""
        write_run_info(self.out_dir, self.run_id)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def open_run(cfg: Config, rank: int, num_processes: int) -> Run:
    """Every check a run dir needs before the target loads; see the module docstring."""
    out_dir = Path(cfg.train.output_dir)
    check_writable(out_dir, "train.output_dir")
    lock = RunLock(out_dir).acquire() if rank == 0 else None
    try:
        owner = read_run_id(out_dir)
        resume_from = choose_checkpoint(cfg, out_dir, owner, warn=rank == 0)
        if resume_from is None:
            run_id = uuid.uuid4().hex
            foreign = foreign_outputs(out_dir, None)
        else:
            run_id = check_resume(cfg, resume_from, num_processes).run_id
            foreign = foreign_outputs(out_dir, run_id)
        if foreign:
            raise ValueError(
                f"train.output_dir={out_dir} holds another run's outputs ({', '.join(foreign)}); resume that run "
                "with train.resume=auto, or choose another train.output_dir (or remove the old checkpoints)"
            )
        if cfg.export.enabled:
            export_is_ours(export_dir(cfg), run_id)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Run(out_dir, run_id, resume_from, lock)
