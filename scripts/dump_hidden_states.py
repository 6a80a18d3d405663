"""Run the frozen target once over a chat dataset and store its hidden states for offline training.

    python scripts/dump_hidden_states.py --target artifacts/tiny-target --data sharegpt-package \
        --limit 600 --max-length 256 --out artifacts/tiny-hidden
    python train/train_mtp.py --config configs/tiny.yaml data.hidden_states=artifacts/tiny-hidden \
        eval.enabled=false
    # one process per GPU, each running the whole target on its share of the shards
    accelerate launch --num_processes 8 scripts/dump_hidden_states.py --target ... --out /data/hidden
    # two CPU processes (--multi_gpu only selects accelerate's torchrun launcher)
    accelerate launch --multi_gpu --num_processes 2 scripts/dump_hidden_states.py --device cpu ...

The dump is tied to the target, the tokenizer and the data settings (--data, --limit,
--max-length): training refuses it unless data.train, data.limit and data.max_length match.
Any number of processes writes the same shards and manifest. A killed dump resumes: run the same
command again (the temp dir `.<out>.tmp-dump` next to --out keeps the finished shards).
Disk: hidden_size x 2 bytes per token in bf16 (4 KiB for Qwen3-30B-A3B), about half that with
--storage fp8; the need is printed before the first forward and a dump that would not fit is
refused (--no-disk-check to go on). See docs/training.md and data/hidden_states.py for the layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from data.hidden_dump import (
    check_out,
    close_dump_processes,
    dump_hidden_states,
    init_dump_processes,
)
from data.hidden_states import DEFAULT_SHARD_TOKENS, DTYPES, FP8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="local Qwen3-MoE model dir (target.path of the training run)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --target; target.tokenizer of the run)")
    p.add_argument("--data", required=True, help="chat source, as data.train: .jsonl/.json/.parquet path or sharegpt-package")
    p.add_argument("--out", required=True, help="output dir (written to a temporary sibling, renamed when complete)")
    p.add_argument("--max-length", type=int, default=2048, help="as data.max_length (default 2048)")
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="as data.enable_thinking: render rows with enable_thinking true/false (default: the template's own)")
    p.add_argument("--limit", type=int, default=None, help="as data.limit: raw rows read (default all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per target forward (default 8)")
    p.add_argument("--topk-logits", type=int, default=0, metavar="K",
                   help="also store the target's top-K next-token log-probs per token (default off; "
                        "the trainer's soft labels need no top-k, it recomputes them from h_{t+1})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"],
                   help="cuda: one GPU per process (cuda:<local rank> under accelerate launch)")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="target compute dtype, and what training reads back (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--storage", default="auto", choices=["auto", *sorted(DTYPES), "fp8"],
                   help="how h_t is stored: auto = --dtype; fp8 = e4m3 with a float32 scale per token "
                        "(H + 4 bytes a token), dequantized to --dtype when training reads it")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--num-proc", type=int, default=1, help="tokenization processes")
    p.add_argument("--force", action="store_true", help="replace an existing --out (once the new dump is complete)")
    p.add_argument("--no-disk-check", action="store_true", help="write even when the estimated size exceeds the free disk")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also MTP_DEBUG=1)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from data.tokenizer import load_tokenizer
    from model.target import (
        FrozenTarget,
        avoid_cudnn_attention,
        default_dtype,
        loading_note,
    )

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible; pass --device cpu")
    if not Path(args.target).is_dir():
        raise ValueError(f"--target '{args.target}' is not a directory; pass a local Qwen3-MoE model dir")
    check_out(args.out, args.force)  # before the target loads
    device = init_dump_processes(args.device)
    avoid_cudnn_attention()  # rows of every length: no per-shape cuDNN plans
    dtype = default_dtype(device) if args.dtype == "auto" else DTYPES[args.dtype]
    storage = {"auto": None, "fp8": FP8}.get(args.storage, args.storage)
    t0 = time.perf_counter()
    target = FrozenTarget.load(args.target, device=device, dtype=dtype, attn_implementation=args.attn_implementation)
    if (note := loading_note(target.quantization, dtype)) and int(os.environ.get("RANK", "0")) == 0:
        print(note, flush=True)
    tokenizer = load_tokenizer(args.tokenizer or args.target)
    manifest = dump_hidden_states(
        target, tokenizer, target_path=args.target, source=args.data, out=args.out,
        max_length=args.max_length, limit=args.limit, batch_size=args.batch_size, topk=args.topk_logits,
        enable_thinking=None if args.thinking is None else args.thinking == "on",
        shard_tokens=args.shard_tokens, dtype=dtype, storage=storage, num_proc=args.num_proc, force=args.force,
        disk_check=not args.no_disk_check,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        d = manifest["data"]
        gib = sum(s["bytes"] for s in manifest["shards"]) / 2**30
        print(f"wrote {args.out}: {d['rows']} rows, {d['tokens']:,} tokens, {len(manifest['shards'])} shards, "
              f"{gib:.2f} GiB, {manifest['dtype']} ({manifest['storage']} storage), in {time.perf_counter() - t0:.0f} s")
        thinking = "null" if args.thinking is None else str(args.thinking == "on").lower()
        print(f"train with: data.hidden_states={args.out} data.train={args.data} "
              f"data.limit={'null' if args.limit is None else args.limit} data.max_length={args.max_length} "
              f"data.enable_thinking={thinking}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as exc:  # user and input errors: the message names the problem and the fix
        if args.debug or os.environ.get("MTP_DEBUG") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        close_dump_processes()


if __name__ == "__main__":
    sys.exit(main())
