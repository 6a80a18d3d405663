"""The evaluator's report: acceptance figures, speeds, the lossless check, per prompt and category.

    report = build_report(rows, spec_out, base_out, spec_s, base_s, steps=3, sampling=sp.as_dict(), ...)
    print(format_report(report)); save_plot(report, "eval.png")

Field definitions are written into every report (`definitions`) and listed in
scripts/eval_acceptance.py's docstring.
"""

from __future__ import annotations

from model.acceptance import acceptance_stats


def build_report(rows, spec_out, base_out, spec_s, base_s, *, steps, sampling: dict, **settings) -> dict:
    """The report (scripts/eval_acceptance.py documents its fields). `sampling` is
    SamplingParams.as_dict(); greedy decoding is what the lossless check applies to."""
    K = steps
    greedy = sampling["temperature"] == 0
    total_hist = [0] * (K + 1)
    mode_sums = [0.0] * K if spec_out and all(s.mode_accept for s in spec_out) else None
    per_prompt, by_cat = [], {}
    for r, s, b in zip(rows, spec_out, base_out or [None] * len(rows)):
        st = acceptance_stats(s.hist)
        total_hist = [a + c for a, c in zip(total_hist, s.hist)]
        if mode_sums is not None:
            mode_sums = [a + c for a, c in zip(mode_sums, s.mode_accept)]
        row = {
            "id": r["id"], "category": r["category"], "num_prompt_tokens": len(r["prompt_ids"]),
            "prompt_token_ids": list(r["prompt_ids"]),
            "num_output_tokens": len(s.output_ids), "output_token_ids": s.output_ids,
            "verify_steps": st["verify_steps"], "acceptance_length": st["acceptance_length"],
            # SGLang's per-request meta_info.spec_accept_length: completion tokens (the prefill's
            # first token included, cut at EOS / max_new_tokens) over verify steps
            "spec_accept_length_meta": len(s.output_ids) / st["verify_steps"] if st["verify_steps"] else None,
            "accept_histogram": s.hist,
        }
        if b is not None and greedy:
            row["matches_baseline"] = s.output_ids == b.output_ids
        per_prompt.append(row)
        if r["category"] is not None:
            cat = by_cat.setdefault(r["category"], {"hist": [0] * (K + 1), "n": 0, "tokens": 0})
            cat["hist"] = [a + c for a, c in zip(cat["hist"], s.hist)]
            cat["n"] += 1
            cat["tokens"] += len(s.output_ids)
    stats = acceptance_stats(total_hist)
    gen = sum(len(s.output_ids) for s in spec_out)
    spec_tps = sum(len(s.output_ids) - 1 for s in spec_out) / spec_s if spec_s > 0 else None
    base_tps = None
    if base_out is not None and base_s > 0:
        base_tps = sum(len(b.output_ids) - 1 for b in base_out) / base_s
    lossless = mismatches = None
    if base_out is not None and greedy:
        mismatches = sum(s.output_ids != b.output_ids for s, b in zip(spec_out, base_out))
        lossless = mismatches == 0
    per_category = {}
    for name, c in sorted(by_cat.items()):
        cs = acceptance_stats(c["hist"])
        per_category[name] = {"num_prompts": c["n"], "generated_tokens": c["tokens"], "verify_steps": cs["verify_steps"],
                              "acceptance_length": cs["acceptance_length"],
                              "per_position_acceptance": cs["per_position_acceptance"]}
    per_request = [p["acceptance_length"] for p in per_prompt if p["acceptance_length"] is not None]
    meta = [p["spec_accept_length_meta"] for p in per_prompt if p["spec_accept_length_meta"] is not None]
    return {
        "acceptance_length": stats["acceptance_length"],
        "acceptance_length_per_request_mean": sum(per_request) / len(per_request) if per_request else None,
        "spec_accept_length_meta_mean": sum(meta) / len(meta) if meta else None,
        "per_position_acceptance": stats["per_position_acceptance"],
        "per_position_acceptance_unconditional": stats["per_position_acceptance_unconditional"],
        "per_position_mode_acceptance": per_position_mode(mode_sums, total_hist),
        "accept_histogram": total_hist,
        "num_prompts": len(rows),
        "generated_tokens": gen,
        "verify_steps": stats["verify_steps"],
        "spec_tokens_per_s": spec_tps,
        "baseline_tokens_per_s": base_tps,
        "speedup": spec_tps / base_tps if spec_tps and base_tps else None,
        "lossless": lossless,
        "lossless_mismatches": mismatches,
        "steps": K,
        "temperature": sampling["temperature"],
        "sampling": sampling,
        **settings,
        "per_category": per_category,
        "per_prompt": per_prompt,
        "definitions": DEFINITIONS,
    }


def per_position_mode(mode_sums: list[float] | None, hist: list[int]) -> list[float | None] | None:
    """Mean mode acceptance at each draft position over the verify steps that reached it (the
    denominator of per_position_acceptance); None where not tracked (greedy, rejection rule)."""
    if mode_sums is None:
        return None
    reached = [sum(hist[i:]) for i in range(len(mode_sums))]  # steps whose drafts before i were accepted
    return [m / n if n else None for m, n in zip(mode_sums, reached)]


DEFINITIONS = {
    "acceptance_length": "pooled over all requests: tokens emitted per verify step, the bonus token included, "
                         "counted before EOS/max_new_tokens truncation, the prefill's first token excluded "
                         "(SGLang's server metric avg_spec_accept_length)",
    "acceptance_length_per_request_mean": "the same ratio per request, averaged over requests",
    "spec_accept_length_meta_mean": "SGLang's per-request meta_info.spec_accept_length averaged over requests: "
                                    "completion tokens (first token included, cut at EOS/max_new_tokens) / verify steps",
    "per_position_acceptance": "P(draft i accepted | drafts 1..i-1 accepted)",
    "per_position_acceptance_unconditional": "steps accepting draft i / all verify steps",
    "per_position_mode_acceptance": "T > 0, target-only rule: at draft position i, the mean probability that the "
                                    "rule accepts the target's own most likely token, over the verify steps that "
                                    "reached i; no top-1 drafter is accepted more often on those contexts, so it "
                                    "bounds per_position_acceptance (null at T = 0 and for the rejection rule)",
    "accept_histogram": "index n: verify steps that emitted n+1 tokens (n drafts accepted)",
    "tokens_per_s": "decode-step tokens over decode time (prefill and its first token excluded)",
    "lossless": "greedy: every prompt's speculative output equals plain greedy decoding (null when sampling)",
    "token_map": "the draft vocabulary: the head drafted among these token ids only (SGLang's "
                 "--speculative-token-map); null = the whole vocabulary",
    "verify_rule": "target_only = SGLang's default (top-1 drafts, accept with probability p(d)); "
                   "rejection = --speculative-use-rejection-sampling (sampled drafts, min(1, p/q))",
}


def batch_size_table(reports: list[dict]) -> list[dict]:
    """One row per batch size: plain and speculative tok/s, speed-up, and whether speculation
    is slower than plain decoding there."""
    rows = []
    for r in reports:
        slower = r["speedup"] is not None and r["speedup"] < 1.0
        rows.append({"batch_size": r["batch_size"], "spec_tokens_per_s": r["spec_tokens_per_s"],
                     "baseline_tokens_per_s": r["baseline_tokens_per_s"], "speedup": r["speedup"],
                     "acceptance_length": r["acceptance_length"], "speculation_slower": slower})
    return rows


def format_report(report: dict) -> str:
    """Console summary: totals, per-position rates, histogram, per-category lines."""
    def f(x, spec="{:.3f}"):
        return "-" if x is None else spec.format(x)

    K = report["steps"]
    sp = report["sampling"]
    rule = report.get("verify_rule", {}).get("kind", "target_only") if sp["temperature"] > 0 else "greedy"
    lines = [
        f"drafter {report.get('drafter', 'mtp')}  K={K}  prompts {report['num_prompts']}  "
        f"tokens {report['generated_tokens']}  verify steps {report['verify_steps']}"
        + (f"  token map {tm['size']:,} ids ({tm['path']})" if (tm := report.get("token_map")) else ""),
        f"sampling T={sp['temperature']} top_p={sp['top_p']} top_k={sp['top_k']} min_p={sp['min_p']}  "
        f"verify {rule}  thinking {report.get('thinking')}",
        f"acceptance length   {f(report['acceptance_length'])} (pooled, SGLang avg_spec_accept_length)  "
        f"per-request mean {f(report['acceptance_length_per_request_mean'])}",
        f"per position (cond) {'  '.join(f(x) for x in report['per_position_acceptance'])}",
        f"per position (all)  {'  '.join(f(x) for x in report['per_position_acceptance_unconditional'])}",
        *([f"target's top token  {'  '.join(f(x) for x in report['per_position_mode_acceptance'])} "
           "(accepted at the same positions: the ceiling of a top-1 drafter)"]
          if report.get("per_position_mode_acceptance") else []),
        f"histogram (1..{K + 1} tokens) {report['accept_histogram']}",
        f"spec tok/s {f(report['spec_tokens_per_s'], '{:.1f}')}   baseline tok/s "
        f"{f(report['baseline_tokens_per_s'], '{:.1f}')}   speedup {f(report['speedup'], '{:.2f}x')}",
        f"lossless {report['lossless']} (mismatching prompts: {report['lossless_mismatches']})",
    ]
    if report["per_category"]:
        lines.append(f"{'category':<16}{'prompts':>8}{'accept len':>12}")
        for name, c in report["per_category"].items():
            lines.append(f"{name:<16}{c['num_prompts']:>8}{f(c['acceptance_length']):>12}")
    if report.get("by_batch_size"):
        lines.append(f"{'batch':>6}{'plain tok/s':>13}{'spec tok/s':>12}{'speedup':>9}")
        for r in report["by_batch_size"]:
            mark = "  <- speculation slower" if r["speculation_slower"] else ""
            lines.append(f"{r['batch_size']:>6}{f(r['baseline_tokens_per_s'], '{:.1f}'):>13}"
                         f"{f(r['spec_tokens_per_s'], '{:.1f}'):>12}{f(r['speedup'], '{:.2f}x'):>9}{mark}")
    return "\n".join(lines)


def save_plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = report["steps"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = list(range(1, K + 1))
    cond = [x or 0.0 for x in report["per_position_acceptance"]]
    unc = [x or 0.0 for x in report["per_position_acceptance_unconditional"]]
    ax1.bar([x - 0.2 for x in xs], cond, width=0.4, label="given previous accepted")
    ax1.bar([x + 0.2 for x in xs], unc, width=0.4, label="over all verify steps")
    ax1.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1), xticks=xs,
            title=f"per-position acceptance (AL {report['acceptance_length'] or 0:.2f})")
    ax1.legend()
    ax2.bar(list(range(1, K + 2)), report["accept_histogram"])
    ax2.set(xlabel="tokens emitted per verify step", ylabel="verify steps", xticks=list(range(1, K + 2)),
            title=f"K={K}, T={report['temperature']}, {report['num_prompts']} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
