"""Rewrite the assistant turns of a chat dataset with the target's own outputs (self-distillation).

    python scripts/regenerate_data.py --target artifacts/study/target --data chats.jsonl \
        --out chats_regen.jsonl --max-new-tokens 256 --temperature 0 --batch-size 64 [--limit N]

What is kept and what changes is data/regenerate.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data.regenerate import regenerate, write_jsonl
from model.acceptance import resolve_sampling
from data.sources import load_chat_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="Qwen3-MoE model dir (with its tokenizer)")
    p.add_argument("--data", required=True, help="chat .jsonl/.json/.parquet file or dir, or 'sharegpt-package'")
    p.add_argument("--out", required=True, help="output .jsonl (same row format as the input)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sampling", choices=["explicit", "model"], default="explicit",
                   help="model: values not given here come from the target's generation_config.json")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="-1 = all tokens")
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="enable_thinking of the chat template (default: the template's own default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=2048, help="prompt + answer tokens; longer turns end the conversation")
    p.add_argument("--max-turns", type=int, default=None, help="regenerate at most N assistant turns per conversation")
    p.add_argument("--limit", type=int, default=None, help="read only the first N rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="also write the report JSON here")
    a = p.parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "max_len"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.temperature is not None and a.temperature < 0:
        p.error("--temperature must be >= 0")
    if a.max_turns is not None and a.max_turns < 1:
        p.error("--max-turns must be >= 1")
    if not Path(a.target).is_dir():
        p.error(f"--target {a.target} is not a directory; pass a Qwen3-MoE model dir")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        sampling, _ = resolve_sampling({"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
                                        "min_p": a.min_p}, a.target, a.sampling)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    raws = load_chat_rows(a.data, limit=a.limit)["raw"]
    rows, report = regenerate(a.target, raws, max_new_tokens=a.max_new_tokens, sampling=sampling,
                              thinking=None if a.thinking is None else a.thinking == "on",
                              batch_size=a.batch_size, max_len=a.max_len, max_turns=a.max_turns,
                              device=a.device, seed=a.seed)
    write_jsonl(rows, a.out)
    report["out"] = str(a.out)
    if a.report:
        Path(a.report).write_text(json.dumps(report, indent=2))
    print(f"{a.out}: {report['summary']}; {report['turns_regenerated']} turns, {report['generated_tokens']} tokens "
          f"in {report['seconds']:.0f}s; cut: {report['conversations_cut'] or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
