"""Train a small Qwen3-MoE from scratch on ShareGPT: a demo target that has learned a language.

    # CPU side, once: all complete ShareGPT conversations, gzip'd (27 MB), to carry to the GPU
    python scripts/make_demo_target.py --prepare-data artifacts/study_inputs/sharegpt.jsonl.gz
    # one H200, about 8 minutes in all
    python scripts/make_demo_target.py --out artifacts/study/target \
        --data artifacts/study_inputs/sharegpt.jsonl.gz
    # CPU, under a minute: the same code path with a tiny model (tests)
    python scripts/make_demo_target.py --out /tmp/demo --smoke

The recipe and why each piece is there: train/demo_target.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from train.demo_target import DemoRecipe, prepare_data, train_demo_target


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output model dir")
    p.add_argument("--prepare-data", metavar="OUT.jsonl.gz", help="write the packaged ShareGPT as gzip'd JSONL and exit")
    p.add_argument("--data", default="sharegpt-package", help="'sharegpt-package' or a .jsonl(.gz) file")
    p.add_argument("--limit", type=int, default=None, help="read only the first N rows (prepare-data or training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=420.0, help="training-loop seconds (auto steps fit in it)")
    p.add_argument("--max-steps", default="auto", help="optimizer steps, or 'auto' (fit --time-budget-s)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per packed block")
    p.add_argument("--batch-size", type=int, default=32, help="blocks per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--loss-chunk", type=int, default=8192, help="tokens per chunk of the vocabulary projection")
    p.add_argument("--holdout", type=int, default=200, help="conversations held out for the held-out loss")
    p.add_argument("--mt-bench", default="mt-bench",
                   help="prompts of the greedy diversity/loop check (default: the shipped MT-Bench questions)")
    p.add_argument("--diversity-prompts", type=int, default=80)
    p.add_argument("--diversity-tokens", type=int, default=256)
    p.add_argument("--vocab", default="full", choices=["full", "data"],
                   help="'full': every lm_head row; 'data': the loss computes logits of the tokens the training "
                        "chats use and the other rows stay zero (the exact full-vocab loss, fewer multiply-adds; "
                        "not yet timed on a GPU)")
    p.add_argument("--unlikelihood", type=float, default=0.0, metavar="A",
                   help="weight of token-level unlikelihood (Welleck et al. 2019): each distinct token of the "
                        "last --unlikelihood-window tokens other than the next one adds -log(1 - p); 0 (default): "
                        "cross-entropy only")
    p.add_argument("--unlikelihood-window", type=int, default=128)
    p.add_argument("--seq-unlikelihood-s", type=float, default=0.0, metavar="S",
                   help="seconds of sequence-level unlikelihood after the schedule: greedy answers to training "
                        "prompts, their tokens in repeated n-grams pushed down, one CE batch per update (0: none)")
    p.add_argument("--seq-unlikelihood-ngram", type=int, default=4)
    p.add_argument("--seq-unlikelihood-prompts", type=int, default=512, help="prompts answered per round")
    p.add_argument("--seq-unlikelihood-batch", type=int, default=32, help="answers per update")
    p.add_argument("--seq-unlikelihood-weight", type=float, default=1.0,
                   help="weight of the unlikelihood term beside each update's CE batch")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (not measured yet)")
    p.add_argument("--config-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Qwen3MoeConfig fields, e.g. hidden_size=640 num_hidden_layers=10")
    p.add_argument("--smoke", action="store_true", help="tiny model, few rows and steps, CPU: the test path")
    a = p.parse_args(argv)
    if a.prepare_data is None and a.out is None:
        p.error("--out is required (or --prepare-data)")
    return a


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --config-overrides {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = json.loads(v) if v not in ("", "None") else None
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.prepare_data:
        info = prepare_data(a.prepare_data, a.limit)
        print(f"wrote {info['records']} conversations to {info['path']} ({info['bytes'] / 1e6:.1f} MB)")
        return 0
    fields = {f.name for f in dataclasses.fields(DemoRecipe)}
    recipe = DemoRecipe(**{k: v for k, v in vars(a).items() if k in fields and k != "config_overrides"},
                        config_overrides=parse_overrides(a.config_overrides))
    try:
        train_demo_target(recipe, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
