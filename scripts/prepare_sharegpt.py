"""Write the complete records of the packaged (truncated) ShareGPT V3 file as JSONL.

    python scripts/prepare_sharegpt.py --out artifacts/sharegpt.jsonl [--limit N] [--skip N]

The output is what `datasets.load_dataset("json", data_files=...)` and
`data.chat.build_chat_dataset` read. --skip N drops the first N records (e.g. to hold out
the first N for evaluation and train on the rest).
"""

from __future__ import annotations

import argparse
import time


from data.sharegpt import write_sharegpt_jsonl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--limit", type=int, default=None, help="write at most N records")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N records")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    n = write_sharegpt_jsonl(args.out, limit=args.limit, skip=args.skip)
    print(f"wrote {n} ShareGPT conversations to {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
