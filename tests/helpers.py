"""Helpers shared by test modules (fixtures live in conftest.py).

    from helpers import ROOT, TRAIN, LAUNCH, run, base_overrides, train_records, load_script
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "train" / "train_mtp.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def env() -> dict:
    """The environment of every subprocess a test starts: one thread, no network, no wandb key."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
             WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    e.pop("WANDB_API_KEY", None)
    return e


def base_overrides(target, chats, out, **extra) -> list[str]:
    """Dotted overrides for a short tiny-target run: 8 steps, no eval, no export."""
    o = {
        "target.path": target, "data.train": chats, "data.limit": "null", "data.holdout": 0,
        "data.max_length": 64, "train.output_dir": out, "train.micro_batch_size": 2,
        "train.max_steps": 8, "train.lr": 1e-2, "train.warmup_steps": 2, "train.log_every": 1,
        "train.save_every": 0, "head.loss_chunk_size": 0, "head.num_steps": 2,
        "eval.enabled": "false", "export.enabled": "false",
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def run(cmd, timeout=600, check=True) -> subprocess.CompletedProcess:
    """Run a command from the repository root; on failure the assertion shows its output."""
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-6000:]}")
    return p


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_records(out: Path) -> list[dict]:
    return [r for r in metrics(out) if r.get("kind", "train") == "train"]


def load_script(name: str):
    """A script of scripts/ as a module (to call its main() or parse_args() in process)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
