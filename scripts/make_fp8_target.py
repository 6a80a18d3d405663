"""Write a block-FP8 copy of a bf16/fp32 Qwen3-MoE model dir, laid out as the Qwen3 FP8 releases.

    python scripts/make_fp8_target.py --src artifacts/tiny-target --out artifacts/tiny-target-fp8 \
        [--block 128 128] [--scale-dtype fp32|bf16] [--force]

Attention q/k/v/o and every expert's gate/up/down become float8_e4m3fn with a
`<name>.weight_scale_inv` (the block multipliers, amax/448); embeddings, lm_head, norms and the
router are copied unchanged; config.json gains a Qwen-style `quantization_config`
(model/fp8.py). For trying the FP8 paths (training, evaluation, `export_mtp.py --quantize fp8`)
without the released checkpoints; the tiny target's dimensions (64, 32) are below one 128 block,
so each of its matrices gets a single, partial block.
"""

from __future__ import annotations

import argparse
import sys

import torch

from model.fp8 import quantize_checkpoint

SCALE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a bf16/fp32 Qwen3-MoE model dir (safetensors)")
    p.add_argument("--out", required=True, help="the block-FP8 model dir to write")
    p.add_argument("--block", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"),
                   help="weight_block_size (default 128 128, as the Qwen3 FP8 releases)")
    p.add_argument("--scale-dtype", default="fp32", choices=sorted(SCALE_DTYPES),
                   help="dtype of the weight_scale_inv tensors (the Qwen3 releases store bf16)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    if min(args.block) < 1:
        raise SystemExit(f"error: --block must be two positive integers, got {args.block}")
    try:
        out = quantize_checkpoint(args.src, args.out, tuple(args.block), SCALE_DTYPES[args.scale_dtype], force=args.force)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {out}: block-FP8 (e4m3, {args.block[0]}x{args.block[1]} blocks, {args.scale_dtype} scales) copy of {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
