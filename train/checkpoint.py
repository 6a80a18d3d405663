"""Training checkpoints: save, verify, find, resume, prune, and the final weights.

    path = save_checkpoint(accelerator, head, cfg, state, out_dir)    # every rank calls it
    resume_from = choose_checkpoint(cfg, out_dir, owner)              # None for a fresh run
    check_resume(cfg, resume_from, num_processes)                     # ValueError on a changed config

A checkpoint-<step>/ dir holds the DeepSpeed engine (or accelerate's) state with the optimizer,
scheduler and RNG, the head as `head.safetensors` (model/mtp_weights.py reads it), the resolved
`config.yaml`, `trainer_state.json` (step, data position, the run's id) and, written last,
`manifest.json`: every other file with its size and sha256. All ranks write into one temp dir,
which rank 0 renames into place when complete (model/atomic.py), so a crash never leaves a half
checkpoint under the final name; the manifest catches what a rename cannot (a file truncated or
deleted later, a disk that lost a block). Resume takes the newest checkpoint that verifies.
Hashing costs one read of the checkpoint on rank 0 at each save, and one read per rank of the
checkpoint resumed from (each rank verifies on its own, before the target loads).

A run dir belongs to one run (train/run_dir.py): each checkpoint names its run, and pruning
(`train.keep_checkpoints`) only ever removes checkpoints of the current run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors.torch import save_file

from model.atomic import atomic_write_text, replace_dir, temp_path
from model.mtp_weights import HEAD_WEIGHTS_NAME, RUN_CONFIG_NAME
from train.common import print0
from train.config import Config, resume_conflicts, save_config

TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
PARTIAL_TAG = "partial"  # every rank writes into the same temp dir: its name cannot hold a pid
_HASH_CHUNK = 1 << 24


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens_seen: int = 0
    train_seconds: float = 0.0
    run_id: str = ""  # the run this state belongs to (train/run_dir.py)
    num_processes: int = 1  # the data position is per rank: a resume needs the same number

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


# ----------------------------------------------------------------------------- manifest

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path, run_id: str, step: int) -> None:
    """manifest.json: every file under `ckpt` with its size and sha256. Written last."""
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            files[p.relative_to(ckpt).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    atomic_write_text(ckpt / MANIFEST_NAME, json.dumps({"run_id": run_id, "step": step, "files": files}, indent=1))


def read_manifest(ckpt: Path) -> dict | None:
    """The manifest as written, or None when it is missing or unreadable."""
    try:
        manifest = json.loads((ckpt / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file of the manifest is there with its size and sha256; else what is
    wrong, naming the file."""
    if not (ckpt / MANIFEST_NAME).is_file():
        return f"{ckpt / MANIFEST_NAME} is missing (an incomplete checkpoint, or one written before checkpoints carried a manifest)"
    manifest = read_manifest(ckpt)
    if manifest is None:
        return f"{ckpt / MANIFEST_NAME} is not a readable manifest"
    for name in (TRAINER_STATE_NAME, HEAD_WEIGHTS_NAME, RUN_CONFIG_NAME):
        if name not in manifest["files"]:
            return f"{ckpt / MANIFEST_NAME} does not list {name}"
    for name, entry in manifest["files"].items():
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path} is {size} bytes, the manifest says {entry['size']}"
        if _sha256(path) != entry["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
    return None


# ----------------------------------------------------------------------------- finding

def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-<step> dir, complete or not, oldest first."""
    found = []
    for p in Path(out_dir).glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if p.is_dir() and tail.isdigit():
            found.append((int(tail), p))
    return sorted(found)


def checkpoint_run_id(ckpt: Path) -> str | None:
    """The run a checkpoint belongs to, from its manifest (None when it has none)."""
    manifest = read_manifest(ckpt)
    return manifest.get("run_id") if manifest else None


def read_state(ckpt: Path) -> TrainerState:
    return TrainerState(**json.loads((ckpt / TRAINER_STATE_NAME).read_text()))


def choose_checkpoint(cfg: Config, out_dir: Path, owner: str | None, warn: bool = True) -> Path | None:
    """The checkpoint `train.resume` asks for, verified; None for a fresh run.

    auto: the newest checkpoint of the dir's run (`owner`, train/run_dir.py; any run when the dir
    names none) that verifies; each newer one that does not is named in a warning. No checkpoint
    at all means a fresh run; checkpoints of which none verifies is an error. A path: that
    checkpoint, which must verify."""
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume != "auto":
        path = Path(cfg.train.resume)
        if not path.is_dir():
            raise ValueError(f"train.resume={path}: no such checkpoint dir; pass a checkpoint-<step> dir, auto or none")
        problem = verify_checkpoint(path)
        if problem:
            raise ValueError(f"train.resume={path} does not verify: {problem}")
        return path
    mine = [p for _, p in checkpoint_dirs(out_dir) if owner is None or checkpoint_run_id(p) in (owner, None)]
    problems = []
    for path in reversed(mine):
        problem = verify_checkpoint(path)
        if problem is None:
            if problems and warn:
                for bad in problems:
                    print0(f"warning: skipping a checkpoint that does not verify: {bad}")
            return path
        problems.append(problem)
    if problems:
        raise ValueError(
            f"train.resume=auto: no checkpoint in {out_dir} verifies ({'; '.join(problems)}); remove the broken "
            "checkpoint dirs to start over there, or choose another train.output_dir"
        )
    return None


def check_resume(cfg: Config, ckpt: Path, num_processes: int) -> TrainerState:
    """The checkpoint's state, after refusing a resume that would silently train something else:
    a changed trajectory key (train/config.py's RESUME_FIXED), a max_steps below the checkpoint's
    step, another number of processes."""
    state = read_state(ckpt)
    saved = yaml.safe_load((ckpt / RUN_CONFIG_NAME).read_text(encoding="utf-8")) or {}
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in conflicts)
        raise ValueError(
            f"cannot resume {ckpt} with a changed config ({listed}); these keys change what is trained: "
            "resume with the checkpoint's values, or start a new run in another train.output_dir"
        )
    if cfg.train.max_steps < state.step:
        raise ValueError(
            f"train.max_steps={cfg.train.max_steps} is below the step of {ckpt} ({state.step}); set "
            f"train.max_steps >= {state.step} to continue it (= {state.step} writes final/ from it), or start a new "
            "run in another train.output_dir"
        )
    if state.num_processes != num_processes:
        raise ValueError(
            f"{ckpt} was written by {state.num_processes} process(es) and this run has {num_processes}: the saved "
            "data position and optimizer shards are per process; resume with the same number of processes"
        )
    return state


# ----------------------------------------------------------------------------- saving

def save_checkpoint(accelerator, head, cfg: Config, state: TrainerState, out_dir: Path) -> Path:
    """Full training state (DeepSpeed engine, optimizer, scheduler, RNG) + head weights + config +
    data position + manifest, written to a temporary dir and renamed when complete; then the
    run's older checkpoints beyond `train.keep_checkpoints` are removed."""
    final = out_dir / f"checkpoint-{state.step}"
    tmp = temp_path(final, PARTIAL_TAG)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    weights = accelerator.get_state_dict(head)  # gathers ZeRO-3 partitions; every rank calls it
    accelerator.wait_for_everyone()  # every rank's engine files are in tmp before the manifest
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / HEAD_WEIGHTS_NAME))
        save_config(cfg, tmp / RUN_CONFIG_NAME)
        (tmp / TRAINER_STATE_NAME).write_text(state.to_json())
        write_manifest(tmp, state.run_id, state.step)
        replace_dir(tmp, final)
        prune_checkpoints(out_dir, state.run_id, state.step, cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(out_dir: Path, run_id: str, step: int, keep: int) -> list[Path]:
    """Remove this run's checkpoints at or below `step` beyond the newest `keep`; checkpoints
    of another run, or without a manifest, are never touched. Returns what was removed."""
    mine = [p for s, p in checkpoint_dirs(out_dir) if s <= step and checkpoint_run_id(p) == run_id]
    removed = mine[:-keep]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def save_final(accelerator, head, cfg: Config, out_dir: Path, extra: dict) -> Path:
    final = out_dir / "final"
    tmp = temp_path(final, PARTIAL_TAG)
    weights = accelerator.get_state_dict(head)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / HEAD_WEIGHTS_NAME))
        save_config(cfg, tmp / RUN_CONFIG_NAME)
        (tmp / "metrics.json").write_text(json.dumps(extra, indent=2))
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def resume_or_start(accelerator, resume_from: Path | None, run_id: str, metrics) -> TrainerState:
    """Load the checkpoint chosen at start (after `accelerator.prepare`) and return its state,
    with metrics.jsonl cut back to its step; or a fresh state and a fresh metrics log."""
    if resume_from is None:
        if accelerator.is_main_process and metrics.path.exists():
            metrics.path.unlink()  # a fresh run starts a fresh log
        return TrainerState(run_id=run_id, num_processes=accelerator.num_processes)
    accelerator.load_state(str(resume_from))
    state = read_state(resume_from)
    assert state.run_id == run_id, (state.run_id, run_id)
    metrics.truncate_after(state.step)
    print0(f"resumed from {resume_from} at step {state.step}")
    return state
