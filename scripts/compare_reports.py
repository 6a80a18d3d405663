"""Check that two evaluator reports agree on a figure (the demo uses it for the export check).

    python scripts/compare_reports.py runs/demo/eval.json runs/demo/eval_export.json \
        --key acceptance_length --tolerance 0
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--key", default="acceptance_length")
    p.add_argument("--tolerance", type=float, default=0.0, help="allowed absolute difference")
    args = p.parse_args(argv)
    ra, rb = json.load(open(args.a)), json.load(open(args.b))
    va, vb = ra[args.key], rb[args.key]
    ok = abs(va - vb) <= args.tolerance
    print(f"{args.key}: {args.a} = {va:.4f}, {args.b} = {vb:.4f} -> {'match' if ok else 'MISMATCH'}")
    # the same head on the same prompts must also draft and emit the same tokens
    rows_a, rows_b = ra.get("per_prompt", []), rb.get("per_prompt", [])
    same = len(rows_a) == len(rows_b) and all(
        x["output_token_ids"] == y["output_token_ids"] and x["verify_steps"] == y["verify_steps"]
        for x, y in zip(rows_a, rows_b))
    print(f"per-prompt outputs and verify steps: {'identical' if same else 'DIFFERENT'} ({len(rows_a)} prompts)")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
