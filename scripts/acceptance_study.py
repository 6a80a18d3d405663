"""The acceptance study on real text: demo target -> regenerated data -> heads -> evaluation.

    python scripts/acceptance_study.py --phase target --data artifacts/study_inputs/sharegpt.jsonl.gz
    python scripts/acceptance_study.py --phase data        # every training chat the target did not hold out
    python scripts/acceptance_study.py --phase data --sampled-passes 1   # + one sampled answer each (the *-mix heads)
    python scripts/acceptance_study.py --phase train --train-tokens 25000000 --train-budget-s 560
    python scripts/acceptance_study.py --phase eval --eval-budget-s 300
    python scripts/acceptance_study.py --phase all --smoke --work /tmp/study     # CPU, minutes
    python scripts/acceptance_study.py --phase markdown    # docs/BENCHMARKS.md's tables from --results

What each phase does: train/study.py; what the results hold: train/study_results.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.study import DEFAULT_HEADS, HEADS, STUDY_KEYS, run_study
from train.config import load_config, parse_override
from train.study_results import curve_path, markdown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", required=True, choices=["target", "data", "train", "eval", "all", "markdown"],
                   help="markdown: print the tables of an existing --results file and exit")
    p.add_argument("--work", default="artifacts/study", help="state dir (keep it under an ignored path)")
    p.add_argument("--data", default="artifacts/study_inputs/sharegpt.jsonl.gz", help="ShareGPT .jsonl(.gz) for the target")
    p.add_argument("--mt-bench", default="data/mt_bench/question.jsonl")
    p.add_argument("--results", default="docs/results/acceptance_study.json",
                   help="results JSON; the training curve goes next to it as <name>_curve.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo the target or data phase's finished outputs")
    # the defaults: the demo target measured on an H200 at held-out loss 3.47 with 7 of 80 greedy
    # MT-Bench answers in a loop, in 425 s (docs/BENCHMARKS.md, "Acceptance on real text")
    p.add_argument("--target-budget-s", type=float, default=340.0, help="the target's cross-entropy schedule")
    p.add_argument("--target-unlikelihood", type=float, default=0.0, metavar="A",
                   help="make_demo_target.py --unlikelihood: weight of the token-level unlikelihood term that "
                        "discourages greedy loops (0: cross-entropy only)")
    p.add_argument("--target-seq-unlikelihood-s", type=float, default=60.0, metavar="S",
                   help="make_demo_target.py --seq-unlikelihood-s: seconds, after the target's schedule, of "
                        "sequence-level unlikelihood on its own greedy answers (0: none; without it the demo "
                        "target ends about half its greedy answers in a loop)")
    p.add_argument("--target-seq-unlikelihood-weight", type=float, default=0.6,
                   help="make_demo_target.py --seq-unlikelihood-weight: the term's weight beside each CE batch")
    p.add_argument("--num-train", type=int, default=None,
                   help="training conversations to regenerate (default: all of the target's training chats; "
                        "25M tokens over 8,000 short ones is 8-9 epochs, and the heads overfit)")
    p.add_argument("--sampled-passes", type=int, default=0, metavar="N",
                   help="also regenerate the training conversations N times at the target's recommended sampling "
                        "(seeds --seed + 1..N): the 'mix' data of the *-mix heads (default 0: greedy answers only); "
                        "a *-mix head with checkpoints from fewer passes is not resumed: --phase train says so")
    p.add_argument("--max-new-tokens", type=int, default=256, help="regeneration and evaluation")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per conversation (regeneration and training)")
    p.add_argument("--regen-batch-size", type=int, default=1024)
    p.add_argument("--heads", nargs="*", default=list(DEFAULT_HEADS), choices=list(HEADS),
                   help=f"heads to train and evaluate (default {' '.join(DEFAULT_HEADS)})")
    p.add_argument("--train-tokens", type=int, default=25_000_000,
                   help="training tokens per head: train.max_steps = ceil(this / (batch x mean row length))")
    p.add_argument("--train-batch-size", type=int, default=32, help="rows per optimizer step (one process per head)")
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--train-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more train_mtp.py config overrides for every head, e.g. head.compile=true (not the keys "
                        "the study sets itself)")
    p.add_argument("--curve-points", type=int, default=10, help="held-out evaluations per head (the training curve)")
    p.add_argument("--train-budget-s", type=float, default=480.0, help="then SIGTERM: the heads checkpoint; a rerun resumes")
    p.add_argument("--heldout-prompts", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-budget-s", type=float, default=300.0, help="no new evaluation starts after this")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3], help="draft steps K to evaluate")
    p.add_argument("--mt-bench-prompts", type=int, default=None, help="first N MT-Bench questions (default all 80)")
    p.add_argument("--fp8-block", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"),
                   help="block of the FP8 copy of the target (scripts/make_fp8_target.py --block)")
    p.add_argument("--step-times", default="docs/results/eval_speed_persistent.json",
                   help="scripts/bench_decode.py results at the real shape, for the projection")
    p.add_argument("--projection-batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--token-map-size", type=int, default=32768, metavar="N",
                   help="also evaluate the best head drafting among the N most frequent tokens of its training data "
                        "(SGLang's --speculative-token-map); 0 = skip")
    p.add_argument("--smoke", action="store_true",
                   help="the whole study in minutes on a CPU: tiny target, a few rows, the default heads (tests)")
    a = p.parse_args(argv)
    for name in ("num_train", "max_new_tokens", "max_length", "regen_batch_size", "train_tokens", "train_batch_size",
                 "curve_points", "heldout_prompts", "eval_batch_size"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.sampled_passes < 0:
        p.error("--sampled-passes must be >= 0")
    mix = [h for h in a.heads if HEADS[h][3] == "mix"]
    if mix and a.phase == "all" and not a.sampled_passes:
        p.error(f"--heads {' '.join(mix)} train on the 'mix' data: add --sampled-passes 1 (or more)")
    if a.token_map_size < 0:
        p.error("--token-map-size must be >= 0 (0 skips the token-map rows)")
    if min(a.ks) < 1 or min(a.fp8_block) < 1 or min(a.projection_batches) < 1:
        p.error("--ks, --fp8-block and --projection-batches take positive integers")
    if not a.heads:
        p.error("--heads needs at least one head")
    try:  # unknown keys and bad values fail now, not minutes later in the train phase
        for o in a.train_overrides:
            key, _ = parse_override(o)
            if key in STUDY_KEYS:
                p.error(f"--train-overrides {o!r}: the study sets {key} itself (use its own flag, e.g. --train-lr, "
                        "--train-batch-size, --train-tokens, --heads)")
        if a.train_overrides:
            load_config(None, list(a.train_overrides))
    except ValueError as e:
        p.error(f"--train-overrides: {e}")
    if a.smoke:
        a.data = "sharegpt-package" if a.data == p.get_default("data") else a.data
        a.results = str(Path(a.work) / "acceptance_study.json") if a.results == p.get_default("results") else a.results
        if a.mt_bench and not Path(a.mt_bench).is_file():
            a.mt_bench = None
        # 40 new tokens: longer than model/diversity.py's 32-token loop window, so loops are detected
        a.num_train, a.max_new_tokens, a.max_length, a.regen_batch_size = 12, 40, 256, 8
        a.train_tokens, a.train_batch_size, a.train_lr, a.curve_points = 1500, 2, 1e-3, 3
        a.heldout_prompts, a.eval_batch_size, a.mt_bench_prompts, a.ks = 3, 4, 3, [1, 3]
        for name in ("train_budget_s", "eval_budget_s"):  # a busy CPU must not cut the smoke run short
            if getattr(a, name) == p.get_default(name):
                setattr(a, name, 3600.0)
    elif a.mt_bench and not Path(a.mt_bench).is_file():
        p.error(f"--mt-bench {a.mt_bench}: no such file (the toolkit ships data/mt_bench/question.jsonl)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.phase == "markdown":
        res = json.loads(Path(a.results).read_text(encoding="utf-8"))
        png = curve_path(a.results)
        if res.get("curve", {}).get("png") and png.exists():  # the plot beside the file read (a copy's own)
            res["curve"]["png"] = str(png)
        print(markdown(res), end="")
        return 0
    run_study(a, command=" ".join(["python scripts/acceptance_study.py", *(sys.argv[1:] if argv is None else argv)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
