"""Run the frozen target once over a chat dataset and store its hidden states for offline training.

    python scripts/dump_hidden_states.py --target artifacts/tiny-target --data sharegpt-package \
        --limit 600 --max-length 256 --out artifacts/tiny-hidden
    python train/train_mtp.py --config configs/tiny.yaml data.hidden_states=artifacts/tiny-hidden \
        eval.enabled=false

The dump is tied to the target, the tokenizer and the data settings (--data, --limit,
--max-length): training refuses it unless data.train, data.limit and data.max_length match.
Disk: hidden_size x 2 bytes per token in bf16 (4 KiB for Qwen3-30B-A3B). See docs/training.md
and data/hidden_states.py for the layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


import torch

from data.hidden_dump import dump_hidden_states
from data.hidden_states import DEFAULT_SHARD_TOKENS, DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="local Qwen3-MoE model dir (target.path of the training run)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --target; target.tokenizer of the run)")
    p.add_argument("--data", required=True, help="chat source, as data.train: .jsonl/.json/.parquet path or sharegpt-package")
    p.add_argument("--out", required=True, help="output dir (written to a temporary sibling, renamed when complete)")
    p.add_argument("--max-length", type=int, default=2048, help="as data.max_length (default 2048)")
    p.add_argument("--limit", type=int, default=None, help="as data.limit: raw rows read (default all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per target forward (default 8)")
    p.add_argument("--topk-logits", type=int, default=0, metavar="K",
                   help="also store the target's top-K next-token log-probs per token (default off; "
                        "the trainer's soft labels need no top-k, it recomputes them from h_{t+1})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="target compute and storage dtype (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--num-proc", type=int, default=1, help="tokenization processes")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from data.tokenizer import load_tokenizer
    from model.target import FrozenTarget, default_dtype, loading_note

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible; pass --device cpu")
    dtype = default_dtype(device) if args.dtype == "auto" else DTYPES[args.dtype]
    t0 = time.perf_counter()
    try:
        target = FrozenTarget.load(args.target, device=device, dtype=dtype, attn_implementation=args.attn_implementation)
        if note := loading_note(target.quantization, dtype):
            print(note, flush=True)
        tokenizer = load_tokenizer(args.tokenizer or args.target)
        manifest = dump_hidden_states(
            target, tokenizer, target_path=args.target, source=args.data, out=args.out,
            max_length=args.max_length, limit=args.limit, batch_size=args.batch_size, topk=args.topk_logits,
            shard_tokens=args.shard_tokens, dtype=dtype, num_proc=args.num_proc, force=args.force,
        )
    except ValueError as exc:  # user and input errors: the message says what to fix
        raise SystemExit(f"error: {exc}") from None
    d = manifest["data"]
    gib = sum((Path(args.out) / s["file"]).stat().st_size for s in manifest["shards"]) / 2**30
    print(f"wrote {args.out}: {d['rows']} rows, {d['tokens']:,} tokens, {len(manifest['shards'])} shards, "
          f"{gib:.2f} GiB, {manifest['dtype']}, in {time.perf_counter() - t0:.0f} s")
    print(f"train with: data.hidden_states={args.out} data.train={args.data} data.limit={'null' if args.limit is None else args.limit} "
          f"data.max_length={args.max_length}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
