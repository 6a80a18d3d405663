"""The acceptance study on real text: demo target -> regenerated data -> heads -> evaluation.

    python scripts/acceptance_study.py --phase target --data artifacts/study_inputs/sharegpt.jsonl.gz
    python scripts/acceptance_study.py --phase data
    python scripts/acceptance_study.py --phase train
    python scripts/acceptance_study.py --phase eval
    python scripts/acceptance_study.py --phase all --smoke --work /tmp/study     # CPU, minutes

What each phase does and how long it takes: train/study.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.study import HEADS, run_study


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", required=True, choices=["target", "data", "train", "eval", "all"])
    p.add_argument("--work", default="artifacts/study", help="state dir (keep it under an ignored path)")
    p.add_argument("--data", default="artifacts/study_inputs/sharegpt.jsonl.gz", help="ShareGPT .jsonl(.gz) for the target")
    p.add_argument("--mt-bench", default="data/mt_bench/question.jsonl")
    p.add_argument("--results", default="docs/results/acceptance_study.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo a phase's finished outputs")
    p.add_argument("--target-budget-s", type=float, default=400.0)
    p.add_argument("--num-train", type=int, default=4000, help="training conversations to regenerate")
    p.add_argument("--max-new-tokens", type=int, default=256, help="regeneration and evaluation")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per conversation (regeneration and training)")
    p.add_argument("--regen-batch-size", type=int, default=128)
    p.add_argument("--heads", nargs="*", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--train-batch-size", type=int, default=16)
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--train-budget-s", type=float, default=480.0)
    p.add_argument("--heldout-prompts", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-budget-s", type=float, default=480.0)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3], help="draft steps K to evaluate")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--mt-bench-prompts", type=int, default=None, help="first N MT-Bench questions (default all 80)")
    p.add_argument("--smoke", action="store_true",
                   help="the whole study in minutes on a CPU: tiny target, a few rows, two heads (tests)")
    a = p.parse_args(argv)
    if a.smoke:
        a.data = "sharegpt-package" if a.data == p.get_default("data") else a.data
        a.results = str(Path(a.work) / "acceptance_study.json") if a.results == p.get_default("results") else a.results
        if a.mt_bench and not Path(a.mt_bench).is_file():
            a.mt_bench = None
        a.num_train, a.max_new_tokens, a.max_length, a.regen_batch_size = 12, 12, 128, 8
        a.train_steps, a.train_batch_size, a.train_lr = 4, 2, 1e-3
        a.heldout_prompts, a.eval_batch_size, a.mt_bench_prompts, a.ks = 3, 4, 3, [1, 3]
        if a.heads == p.get_default("heads"):
            a.heads = ["k1-ce-last-regen", "k3-ce-last-orig"]
    elif a.mt_bench and not Path(a.mt_bench).is_file():
        p.error(f"--mt-bench {a.mt_bench}: no such file (the toolkit ships data/mt_bench/question.jsonl)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    run_study(a, command=" ".join(["python scripts/acceptance_study.py", *(sys.argv[1:] if argv is None else argv)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
