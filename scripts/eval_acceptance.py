"""Acceptance length and speedup of an MTP head under SGLang-style chain drafting (NEXTN, topk 1).

    python scripts/eval_acceptance.py --target artifacts/tiny-target --mtp runs/tiny/final \
        --prompts data/mt_bench/question.jsonl --num-prompts 80 --steps 3 \
        --max-new-tokens 256 --batch-size 8 --report eval.json --plot eval.png

--mtp takes a training checkpoint dir (head.safetensors), final/, an exported draft dir or a
.safetensors file. --drafter ngram measures prompt-lookup drafting instead (no --mtp needed).
Each prompt batch is decoded twice by the same engine: speculatively and plainly (the baseline,
and at T=0 the lossless reference). Decoding is greedy at --temperature 0, else sampled.

Report fields (JSON):
  acceptance_length        tokens per verify step, bonus included (SGLang avg_spec_accept_length)
  per_position_acceptance  K rates: P(draft i accepted | drafts before it accepted)
  per_position_acceptance_unconditional  K rates: steps accepting draft i / all verify steps
  accept_histogram         K+1 counts: verify steps that emitted 1 .. K+1 tokens
  num_prompts, generated_tokens, verify_steps, steps, temperature
  spec_tokens_per_s, baseline_tokens_per_s, speedup   decode phase only (prefill excluded)
  lossless                 T=0: speculative == plain greedy for every prompt (null at T>0);
                           lossless_mismatches = how many prompts differ (bf16 GPU rounding can)
  per_category             category -> acceptance_length, per_position_acceptance, ...
  per_prompt               id, category, num_prompt_tokens, output_token_ids, verify_steps,
                           acceptance_length, accept_histogram, matches_baseline
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="Qwen3-MoE model dir")
    p.add_argument("--mtp", help="head weights: checkpoint dir, final/, draft dir or .safetensors")
    p.add_argument("--drafter", default="mtp", choices=["mtp", "ngram"])
    p.add_argument("--prompts", default="sharegpt-package",
                   help="chat/MT-Bench .jsonl/.json/.parquet file or dir, or 'sharegpt-package'")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="K draft tokens per verify step")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None,
                   help="KV cache slots (default: longest prompt + max-new-tokens + K + 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --target)")
    p.add_argument("--report", default=None, help="write the report JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of per-position acceptance and the histogram")
    p.add_argument("--no-baseline", action="store_true", help="skip plain decoding (no speedup, no lossless)")
    p.add_argument("--kernels", default=None, choices=["triton", "torch"],
                   help="decode-step kernels (default: triton on CUDA when Triton is installed, else torch; "
                        "docs/BENCHMARKS.md compares them)")
    p.add_argument("--experts", default=None, choices=["loop", "gather", "grouped_mm"],
                   help="MoE experts of the torch path (default: grouped_mm on CUDA, loop on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder layer of decode steps")
    return p.parse_args(argv)


def check_args(a) -> None:
    """Cheap checks before anything is loaded; SystemExit names the fix."""
    if a.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1 (got {a.steps}); K=3 matches SGLang's usual setting")
    if a.temperature < 0:
        raise SystemExit(f"error: --temperature must be >= 0 (got {a.temperature})")
    for name in ("num_prompts", "max_new_tokens", "batch_size"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    if a.drafter == "mtp" and not a.mtp:
        raise SystemExit("error: --mtp is required with --drafter mtp (or pass --drafter ngram)")
    if not Path(a.target).exists():
        raise SystemExit(f"error: --target '{a.target}' does not exist; pass a Qwen3-MoE model dir")
    if a.mtp and not Path(a.mtp).exists():
        raise SystemExit(f"error: --mtp '{a.mtp}' does not exist; pass a checkpoint dir, final/, a draft dir "
                         "or a .safetensors file")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; pass --device cpu")


def main(argv=None) -> int:
    a = parse_args(argv)
    check_args(a)
    from data.chat import chat_prompts
    from data.tokenizer import load_tokenizer
    from model.evaluate import EvalSettings, evaluate
    from model.mtp_weights import load_head
    from model.report import format_report, save_plot
    from model.target import FrozenTarget, default_dtype, loading_note

    try:
        dtype = default_dtype(a.device)
        target = FrozenTarget.load(a.target, device=a.device, dtype=dtype)
        if note := loading_note(target.quantization, dtype):
            print(note, flush=True)
        head = load_head(a.mtp, target.config, a.device, dtype) if a.drafter == "mtp" else None
        tokenizer = load_tokenizer(a.tokenizer or a.target)
        prompts = chat_prompts(a.prompts, tokenizer, limit=a.num_prompts)
        print(f"{len(prompts)} prompts from {a.prompts}; target {a.target}; drafter {a.drafter} "
              f"{a.mtp or ''}; device {a.device}", flush=True)
        settings = EvalSettings(steps=a.steps, temperature=a.temperature, batch_size=a.batch_size,
                                max_new_tokens=a.max_new_tokens, seed=a.seed, max_len=a.max_len, drafter=a.drafter,
                                baseline=not a.no_baseline, experts=a.experts, compile=a.compile, kernels=a.kernels)
        report = evaluate(target, head, tokenizer, prompts, settings, device=a.device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    report.update(target=a.target, mtp=a.mtp, prompts=a.prompts)
    print(format_report(report))
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(json.dumps(report, indent=1))
        print(f"report: {a.report}")
    if a.plot:
        save_plot(report, a.plot)
        print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
