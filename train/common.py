"""Distributed boilerplate in one place: rank, device, print0, JSONL metrics.

Everything here works both under `accelerate launch` (any number of processes, GPU or CPU/gloo)
and under plain `python` (one process).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device() -> torch.device:
    """cuda:<local rank> when a GPU is visible, else CPU. Decided before the Accelerator exists
    because the target must be loaded first (ZeRO-3 would partition it otherwise)."""
    if torch.cuda.is_available():
        return torch.device("cuda", env_local_rank())
    return torch.device("cpu")


def print0(*args, **kwargs) -> None:
    if env_rank() == 0:
        print(*args, **kwargs, flush=True)
        sys.stdout.flush()


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint we resume from, so the file
        reads as if the run never stopped: training records and periodic held-out records
        (`kind` "heldout", written before the checkpoint of their step) at steps <= `step` stay."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
                if rec.get("step", 0) <= step and rec.get("kind", "train") in ("train", "heldout"):
                    keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
