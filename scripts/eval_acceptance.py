"""Acceptance length and speed-up of an MTP head, measured as SGLang's NEXTN chain drafting runs it.

    python scripts/eval_acceptance.py --target artifacts/tiny-target --mtp runs/tiny/final \
        --prompts mt-bench --num-prompts 80 --steps 3 --max-new-tokens 256 --batch-size 8 \
        --report eval.json --plot eval.png
    # the target's recommended sampling (generation_config.json), thinking as the template's default
    python scripts/eval_acceptance.py --target DIR --mtp DIR --prompts mt-bench --sampling model
    # one table of plain vs speculative tok/s per batch size
    python scripts/eval_acceptance.py --target DIR --mtp DIR --batch-sizes 1,8,16

--mtp takes a training checkpoint dir (head.safetensors), final/, an exported draft dir or a
.safetensors file. --drafter ngram measures prompt-lookup drafting instead (no --mtp needed).
--token-map FILE drafts among the file's token ids only, as SGLang's --speculative-token-map does
(scripts/build_token_map.py builds one; each draft step then reads those lm_head rows only).
Each prompt batch is decoded twice by the same engine with the same sampler: speculatively and
plainly (the baseline, and when greedy the lossless reference).

Sampling (model/acceptance.py): greedy at --temperature 0 (the default). At T > 0 drafts are
verified with SGLang's default rule (top-1 drafts, each accepted with the target's probability
after temperature, top-k and top-p; --accept-threshold-single/-acc as SGLang's flags);
--rejection-sampling selects SGLang's --speculative-use-rejection-sampling (sampled drafts, p/q).
--sampling model takes temperature, top_p, top_k and min_p from the target's
generation_config.json where not given, as SGLang's --sampling-defaults model does.
Prompts are rendered with the tokenizer's chat template from the messages as sent;
--thinking on|off sets enable_thinking (default: what the template does when not told).

Report fields (JSON; `definitions` in the report says the same):
  acceptance_length        pooled: tokens per verify step, bonus included (SGLang avg_spec_accept_length)
  acceptance_length_per_request_mean   the same per request, averaged
  spec_accept_length_meta_mean   SGLang's per-request meta_info.spec_accept_length, averaged
  per_position_acceptance  K rates: P(draft i accepted | drafts before it accepted)
  per_position_acceptance_unconditional  K rates: steps accepting draft i / all verify steps
  per_position_mode_acceptance   T > 0, target-only rule: K rates at which the rule would accept the
                           target's own top token at the positions reached (a top-1 drafter's ceiling)
  accept_histogram         K+1 counts: verify steps that emitted 1 .. K+1 tokens
  sampling, verify_rule, thinking     how the run decoded and rendered
  token_map                with --token-map: its path, size and sha256 (null without)
  num_prompts, generated_tokens, verify_steps, steps, temperature
  spec_tokens_per_s, baseline_tokens_per_s, speedup   decode phase only (prefill excluded)
  by_batch_size            with --batch-sizes: per batch size tok/s, speed-up, speculation_slower
  lossless                 greedy: speculative == plain for every prompt (null when sampling);
                           lossless_mismatches = how many prompts differ (bf16 GPU rounding can)
  per_category             category -> acceptance_length, per_position_acceptance, ...
  per_prompt               id, category, prompt_token_ids, output_token_ids, verify_steps,
                           acceptance_length, spec_accept_length_meta, accept_histogram, matches_baseline
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
    p.add_argument("--token-map", default=None, metavar="FILE",
                   help="draft among these token ids only (scripts/build_token_map.py; SGLang's --speculative-token-map)")
    p.add_argument("--prompts", default="mt-bench",
                   help="'mt-bench' (the 80 questions shipped in data/mt_bench/), 'sharegpt-package', or a "
                        "chat/MT-Bench .jsonl/.json/.parquet file or dir")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="K draft tokens per verify step")
    p.add_argument("--sampling", choices=["explicit", "model"], default="explicit",
                   help="model: temperature/top_p/top_k/min_p not given here come from the target's "
                        "generation_config.json (SGLang's --sampling-defaults model); explicit: greedy unless given")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="-1 = all tokens")
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--rejection-sampling", action="store_true",
                   help="verify sampled drafts with p/q rejection (SGLang's --speculative-use-rejection-sampling) "
                        "instead of SGLang's default target-only rule")
    p.add_argument("--accept-threshold-single", type=float, default=1.0,
                   help="accept a draft whose target probability reaches this (SGLang's flag of the same name)")
    p.add_argument("--accept-threshold-acc", type=float, default=1.0,
                   help="accept a draft when a uniform draw < p / this (SGLang's flag of the same name)")
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="render prompts with enable_thinking true/false (default: the chat template's own default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-sizes", default=None,
                   help="comma list, e.g. 1,8,16: one table of plain and speculative tok/s per batch size")
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
    if a.temperature is not None and a.temperature < 0:
        raise SystemExit(f"error: --temperature must be >= 0 (got {a.temperature})")
    if a.batch_sizes is not None:
        try:
            a.batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"error: --batch-sizes must be a comma list of integers (got {a.batch_sizes!r})") from None
        if not a.batch_sizes or min(a.batch_sizes) < 1:
            raise SystemExit(f"error: --batch-sizes must list batch sizes >= 1 (got {a.batch_sizes})")
    for name in ("num_prompts", "max_new_tokens", "batch_size"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    if a.drafter == "mtp" and not a.mtp:
        raise SystemExit("error: --mtp is required with --drafter mtp (or pass --drafter ngram)")
    if not Path(a.target).exists():
        raise SystemExit(f"error: --target '{a.target}' does not exist; pass a Qwen3-MoE model dir")
    if a.token_map and a.drafter != "mtp":
        raise SystemExit("error: --token-map limits an MTP head's drafts; drop it with --drafter ngram")
    if a.token_map and not Path(a.token_map).is_file():
        raise SystemExit(f"error: --token-map '{a.token_map}' does not exist; build one with scripts/build_token_map.py")
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
    from model.acceptance import VerifyRule, resolve_sampling
    from model.evaluate import EvalSettings, evaluate, evaluate_batch_sizes
    from model.mtp_weights import load_head
    from model.report import format_report, save_plot
    from model.target import FrozenTarget, default_dtype, loading_note

    thinking = None if a.thinking is None else a.thinking == "on"
    try:
        sampling, origin = resolve_sampling({"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
                                             "min_p": a.min_p}, a.target, a.sampling)
        rule = VerifyRule("rejection" if a.rejection_sampling else "target_only",
                          threshold_single=a.accept_threshold_single, threshold_acc=a.accept_threshold_acc)
        dtype = default_dtype(a.device)
        target = FrozenTarget.load(a.target, device=a.device, dtype=dtype)
        if note := loading_note(target.quantization, dtype):
            print(note, flush=True)
        head = load_head(a.mtp, target.config, a.device, dtype) if a.drafter == "mtp" else None
        tokenizer = load_tokenizer(a.tokenizer or a.target)
        prompts = chat_prompts(a.prompts, tokenizer, limit=a.num_prompts, enable_thinking=thinking)
        print(f"{len(prompts)} prompts from {a.prompts}; target {a.target}; drafter {a.drafter} "
              f"{a.mtp or ''}; device {a.device}; sampling {sampling.as_dict()}", flush=True)
        settings = EvalSettings(steps=a.steps, sampling=sampling, verify=rule, batch_size=a.batch_size,
                                max_new_tokens=a.max_new_tokens, seed=a.seed, max_len=a.max_len, drafter=a.drafter,
                                baseline=not a.no_baseline, experts=a.experts, compile=a.compile, kernels=a.kernels,
                                thinking=thinking, token_map=a.token_map)
        if a.batch_sizes:
            report = evaluate_batch_sizes(target, head, tokenizer, prompts, settings, a.batch_sizes, device=a.device)
        else:
            report = evaluate(target, head, tokenizer, prompts, settings, device=a.device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    report.update(target=a.target, mtp=a.mtp, prompts=a.prompts, sampling_source=origin)
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
