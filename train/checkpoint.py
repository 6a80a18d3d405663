"""Training checkpoints: save, find, resume, and the final weights.

    path = save_checkpoint(accelerator, head, cfg, state, out_dir)    # every rank calls it
    resume_from = resolve_resume(cfg, out_dir)                       # None for a fresh run

A checkpoint-<step>/ dir holds the DeepSpeed engine (or accelerate's) state with the optimizer,
scheduler and RNG, the head as `head.safetensors` (model/mtp_weights.py reads it), the resolved
`config.yaml` and `trainer_state.json` (step and data position). All ranks write into one temp
dir, which rank 0 renames into place when complete (model/atomic.py), so a crash never leaves
a half checkpoint under the final name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from model.atomic import replace_dir, temp_path
from model.mtp_weights import HEAD_WEIGHTS_NAME, RUN_CONFIG_NAME
from train.common import print0
from train.config import Config, save_config

TRAINER_STATE_NAME = "trainer_state.json"
PARTIAL_TAG = "partial"  # every rank writes into the same temp dir: its name cannot hold a pid


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens_seen: int = 0
    train_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """checkpoint-<step> dirs that were renamed into place (complete), oldest first."""
    found = []
    for p in out_dir.glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if p.is_dir() and tail.isdigit() and (p / TRAINER_STATE_NAME).exists():
            found.append((int(tail), p))
    return [p for _, p in sorted(found)]


def resolve_resume(cfg: Config, out_dir: Path) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        ckpts = complete_checkpoints(out_dir)
        return ckpts[-1] if ckpts else None
    path = Path(cfg.train.resume)
    if not (path / TRAINER_STATE_NAME).exists():
        raise ValueError(f"train.resume={path}: not a complete checkpoint dir (no {TRAINER_STATE_NAME})")
    return path


def save_checkpoint(accelerator, head, cfg: Config, state: TrainerState, out_dir: Path) -> Path:
    """Full training state (DeepSpeed engine, optimizer, scheduler, RNG) + head weights + config +
    data position, written to a temporary dir and renamed when complete."""
    final = out_dir / f"checkpoint-{state.step}"
    tmp = temp_path(final, PARTIAL_TAG)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    weights = accelerator.get_state_dict(head)  # gathers ZeRO-3 partitions; every rank calls it
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / HEAD_WEIGHTS_NAME))
        save_config(cfg, tmp / RUN_CONFIG_NAME)
        (tmp / TRAINER_STATE_NAME).write_text(state.to_json())
        replace_dir(tmp, final)
        for old in complete_checkpoints(out_dir)[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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


def resume_or_start(accelerator, cfg: Config, out_dir: Path, metrics) -> TrainerState:
    """Load the checkpoint `train.resume` names (after `accelerator.prepare`) and return its
    state, with metrics.jsonl cut back to its step; or a fresh state and a fresh metrics log."""
    resume_from = resolve_resume(cfg, out_dir)
    if resume_from is None:
        if accelerator.is_main_process and metrics.path.exists():
            metrics.path.unlink()  # a fresh run starts a fresh log
        return TrainerState()
    accelerator.load_state(str(resume_from))
    state = TrainerState(**json.loads((resume_from / TRAINER_STATE_NAME).read_text()))
    metrics.truncate_after(state.step)
    print0(f"resumed from {resume_from} at step {state.step}")
    return state
