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
    va = json.load(open(args.a))[args.key]
    vb = json.load(open(args.b))[args.key]
    ok = abs(va - vb) <= args.tolerance
    print(f"{args.key}: {args.a} = {va:.4f}, {args.b} = {vb:.4f} -> {'match' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
