"""Measure what the storage of offline hidden states does to the head: dump h_t once per storage
(fp32, bf16, fp8_e4m3), train the same head offline from each (same seed, same steps), compare
the held-out loss, top-1 accuracy and simulated acceptance length of final/metrics.json.

    python scripts/make_tiny_target.py --out artifacts/tiny-target
    python scripts/bench_hidden_storage.py --target artifacts/tiny-target --work /tmp/storage \
        --report docs/results/hidden_storage_cpu.json train.max_steps=300
    # on a GPU: the run's own config and target
    python scripts/bench_hidden_storage.py --target /models/Qwen3-30B-A3B --config configs/qwen3_30b_a3b.yaml \
        --data artifacts/sharegpt.jsonl --limit 20000 --max-length 2048 --work /data/storage --storages bf16 fp8

The dumps are computed in --dtype (fp32 on CPU, bf16 on GPU) and only stored differently, and the
reader returns --dtype for all of them, so the runs differ by the storage alone. Dotted overrides
after the flags go to every training run (train/train_mtp.py); data.holdout sets the held-out rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from data.hidden_dump import dump_hidden_states
from data.hidden_states import DTYPES, FP8
from model.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
STORAGE_NAMES = {"fp32": "fp32", "bf16": "bf16", "fp8": FP8}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="local Qwen3-MoE model dir")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="training config of the runs")
    p.add_argument("--data", default="sharegpt-package", help="chat source (data.train)")
    p.add_argument("--limit", type=lambda v: None if v in ("null", "none") else int(v), default=600,
                   help="data.limit (default 600; null = all rows)")
    p.add_argument("--max-length", type=int, default=128, help="data.max_length (default 128)")
    p.add_argument("--holdout", type=int, default=64, help="data.holdout: rows of the held-out metrics (default 64)")
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="data.enable_thinking of the dumps and the runs (default: the chat template's own)")
    p.add_argument("--storages", nargs="+", default=["fp32", "bf16", "fp8"], choices=sorted(STORAGE_NAMES))
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)], help="compute dtype of the dumps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--batch-size", type=int, default=8, help="sequences per target forward of the dumps")
    p.add_argument("--work", required=True, help="dir for the dumps and the runs (replaced)")
    p.add_argument("--report", default=None, help="write the comparison as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every training run, e.g. train.max_steps=300")
    return p.parse_args(argv)


def _in_repo(path: str) -> str:
    """A path inside this checkout, relative to it (the report names no local checkout)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def main(argv=None) -> int:
    a = parse_args(argv)
    from data.tokenizer import load_tokenizer
    from model.target import FrozenTarget, default_dtype

    device = torch.device(a.device)
    dtype = default_dtype(device) if a.dtype == "auto" else DTYPES[a.dtype]
    work = Path(a.work)
    thinking = None if a.thinking is None else a.thinking == "on"
    target = FrozenTarget.load(a.target, device=device, dtype=dtype)
    tokenizer = load_tokenizer(a.target)
    rows = []
    for name in a.storages:
        dump, run = work / f"dump-{name}", work / f"run-{name}"
        t0 = time.perf_counter()
        manifest = dump_hidden_states(target, tokenizer, target_path=a.target, source=a.data, out=dump,
                                      max_length=a.max_length, limit=a.limit, enable_thinking=thinking,
                                      batch_size=a.batch_size, dtype=dtype,
                                      storage=STORAGE_NAMES[name], force=True, progress=False)
        dump_s = time.perf_counter() - t0
        shutil.rmtree(run, ignore_errors=True)  # a fresh run each time
        cmd = [sys.executable, str(ROOT / "train" / "train_mtp.py"), "--config", a.config,
               f"target.path={a.target}", f"data.train={a.data}", f"data.limit={'null' if a.limit is None else a.limit}",
               f"data.max_length={a.max_length}", f"data.enable_thinking={'null' if thinking is None else str(thinking).lower()}",
               f"data.holdout={a.holdout}", f"data.hidden_states={dump}", "eval.enabled=false", "export.enabled=false",
               "train.resume=none", f"train.output_dir={run}", *a.overrides]
        print(f"[{name}] dump {dump_s:.0f} s; training: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        m = json.loads((run / "final" / "metrics.json").read_text(encoding="utf-8"))
        tokens = manifest["data"]["tokens"]
        shard_bytes = sum(s["bytes"] for s in manifest["shards"])
        rows.append({
            "storage": manifest["storage"], "dump_bytes": shard_bytes, "bytes_per_token": shard_bytes / tokens,
            "heldout_loss": m["heldout_loss"], "heldout_acc": m["heldout_acc"],
            "heldout_simulated_acceptance_length": m["heldout_simulated_acceptance_length"],
            "heldout_rows": m["heldout_rows"], "steps": m["step"], "train_seconds": m["train_seconds"],
        })
    ref = next((r for r in rows if r["storage"] == "bf16"), rows[0])
    for r in rows:
        r["acceptance_vs_" + ref["storage"]] = (r["heldout_simulated_acceptance_length"]
                                               / ref["heldout_simulated_acceptance_length"] - 1)
    print(f"\n| storage | bytes/token | held-out loss | held-out top-1 acc per step | simulated acceptance length | vs {ref['storage']} |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        acc = " / ".join(f"{x:.4f}" for x in r["heldout_acc"])
        print(f"| {r['storage']} | {r['bytes_per_token']:.0f} | {r['heldout_loss']:.4f} | {acc} | "
              f"{r['heldout_simulated_acceptance_length']:.4f} | {100 * r['acceptance_vs_' + ref['storage']]:+.2f}% |")
    if a.report:
        report = {"command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
                  "device": str(device), "dtype": str(dtype).replace("torch.", ""), "target": a.target,
                  "data": {"source": _in_repo(a.data), "limit": a.limit, "max_length": a.max_length, "holdout": a.holdout,
                           "enable_thinking": thinking},
                  "config": _in_repo(a.config), "overrides": a.overrides, "runs": rows}
        atomic_write_text(a.report, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
