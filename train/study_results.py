"""The acceptance study's results: what ran, read back from the work dir, and the figures made of it.

    write_results(a, W, rows, eos, planned_rows=38, samplings={...})   # train/study.py's eval phase
    print(markdown(json.loads(Path("docs/results/acceptance_study.json").read_text())))

Every setting comes from what ran, never from the calling command's flags: each head's saved
config.yaml, final/metrics.json (or its last checkpoint's trainer_state.json), metrics.jsonl's
held-out records (the training curve) and the train phase's plan file; data.json of the data
phase; demo_target.json of the target; the evaluator's own reports (the rows).

Figures:
- loop-aware acceptance at T = 0 (`loop_numbers`): at T = 0 a speculative output equals the
  target's greedy output, so whether it ends in a loop (model/diversity.py) is the target's
  doing; the acceptance length over the prompts whose answer does not loop is pooled from their
  accept histograms, sum((n + 1) h[n]) / sum(h);
- the projection at the real shape (`projection`): acceptance length AL_K x batch /
  step_ms[K][batch] x 1000 tokens per second, against plain decoding's measured tokens per second,
  with the step times of scripts/bench_decode.py's results file (a head: its speculative step,
  draft + verify + draft extend; n-gram: the verify step alone);
- the top-1 ceiling (est.) at T > 0 (`top1_ceiling`): SGLang's target-only rule accepts a top-1
  draft d with probability p(d), so no top-1 drafter beats the target's own top token; with m_j a
  row's per_position_mode_acceptance, 1 + sum_k prod_{j<=k} m_j estimates the best acceptance
  length any top-1 drafter reaches (m_j at j >= 2 is averaged over the steps whose earlier drafts
  were accepted, so the product only approximates E[p1 p2 ...]); goal 3 carries it over n-gram;
- goals with their thresholds and pass/fail (`goals`); the training curve as a PNG.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
import yaml

from model.atomic import atomic_write_text
from model.diversity import LOOP_WINDOW, diversity_stats, ends_in_loop, strip_eos
from model.export import export_mtp

PROMPT_ORDER = ("mt_bench", "sharegpt_heldout")
SAMPLING_ORDER = ("greedy", "recommended")
GOAL_K = 3  # the goals' K (SGLang's usual --speculative-num-steps)
RATIO_GOAL = "best head / n-gram at the recommended sampling, K=3 (acceptance length ratio)"
CEILING_NOTE = ("the best ratio any top-1 drafter could reach under SGLang's target-only rule on this target: an "
                "estimate from the target's top-token probabilities at the positions the best head "
                "reached (1 + sum_k prod_{j<=k} m_j), over n-gram's measured acceptance length")
FP8_PROMPTS, FP8_SAMPLING, FP8_K = "mt_bench", "greedy", 3  # the FP8 item: one prompt set, one K
TOKEN_MAP_PROMPTS = "mt_bench"  # the token-map item: one prompt set
LOOP_KEYS = ("loop_share", "num_prompts_loop", "num_prompts_nonloop", "acceptance_length_nonloop",
             "acceptance_length_loop", "accept_histogram_nonloop")
ASSUMPTIONS = [
    "acceptance carries over from the demo target to Qwen3-30B-A3B (the same head recipe, trained on the real "
    "target's own answers)",
    "step times were measured with random weights, whose expert routing is near uniform; trained routing is skewed",
    "the speculative step time does not depend on acceptance (one draft chain and one verify forward per step)",
    "a head's step is the measured speculative step (K draft steps + verify + draft extend); n-gram's is the "
    "verify step alone (prompt lookup runs no forward)",
]


def fp8_rows(best: str) -> list[dict]:
    """The FP8 item's two rows: the best head exported as a bf16 and as an FP8 draft, each on the
    block-FP8 copy of the target."""
    return [{"drafter": "mtp", "head": f"{best}@fp8-target/{kind}-draft", "target": "fp8", "prompts": FP8_PROMPTS,
             "sampling_name": FP8_SAMPLING, "K": FP8_K, "draft": kind} for kind in ("bf16", "fp8")]


def token_map_rows(best: str, size: int, ks: list[int]) -> list[dict]:
    """The token-map item's rows: the best head drafting among the `size` most frequent tokens of
    its training data (SGLang's --speculative-token-map), greedy and recommended sampling, on the
    bf16 target, at the goals' K's."""
    return [{"drafter": "mtp", "head": f"{best}@token-map-{size}", "target": "bf16", "prompts": TOKEN_MAP_PROMPTS,
             "sampling_name": s, "K": K, "token_map_size": size}
            for s in SAMPLING_ORDER for K in (GOAL_K, 1) if K in ks]


def token_map_results(W: Path, rows: list[dict]) -> dict | None:
    """The token-map item's map (W/token_map/info.json: size, coverage, how it was built) and the
    head its rows drafted with; None without such rows."""
    mapped = [r for r in rows if r.get("token_map_size")]
    if not mapped or not (W / "token_map" / "info.json").exists():
        return None
    return {**json.loads((W / "token_map" / "info.json").read_text()), "head": mapped[0]["head"].split("@")[0]}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def head_dir(W: Path, name: str) -> Path | None:
    """final/ of a finished head, else its latest checkpoint (a run stopped by --train-budget-s),
    else None."""
    run = W / "heads" / name
    if (run / "final").exists():
        return run / "final"
    ckpts = sorted((d for d in run.glob("checkpoint-*") if d.name.split("-")[-1].isdigit()),
                   key=lambda d: int(d.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None


# ----------------------------------------------------------------------------- per row
def pooled_acceptance(hists: list[list[int]]) -> tuple[list[int] | None, float | None]:
    """(summed accept histogram, its acceptance length sum((n+1) h[n]) / sum(h)); (None, None)
    without histograms, (hist, None) without verify steps."""
    if not hists:
        return None, None
    total = [sum(col) for col in zip(*hists)]
    steps = sum(total)
    return total, (sum((n + 1) * c for n, c in enumerate(total)) / steps if steps else None)


def loop_numbers(per_prompt: list[dict], eos_ids, greedy: bool) -> dict:
    """At T = 0: the share of prompts whose output (EOS stripped) ends in a loop and the pooled
    acceptance length over the non-looping and the looping ones; None for every key otherwise."""
    if not greedy:
        return dict.fromkeys(LOOP_KEYS)
    loops = [ends_in_loop(strip_eos(p["output_token_ids"], eos_ids)) for p in per_prompt]
    hist_non, al_non = pooled_acceptance([p["accept_histogram"] for p, lp in zip(per_prompt, loops) if not lp])
    _, al_loop = pooled_acceptance([p["accept_histogram"] for p, lp in zip(per_prompt, loops) if lp])
    return {"loop_share": sum(loops) / len(loops) if loops else None, "num_prompts_loop": sum(loops),
            "num_prompts_nonloop": len(loops) - sum(loops), "acceptance_length_nonloop": al_non,
            "acceptance_length_loop": al_loop, "accept_histogram_nonloop": hist_non}


def top1_ceiling(r: dict) -> float | None:
    """The top-1 ceiling (est.) of a T > 0 row (module docstring): 1 + sum_k prod_{j<=k} m_j over
    its per_position_mode_acceptance m; None for greedy rows, rows without it and rows where a
    position was never reached (its m_j is None: no estimate there)."""
    mode = r.get("per_position_mode_acceptance")  # rows written before it existed lack it
    if r.get("sampling_name") == "greedy" or not mode or None in mode:
        return None
    total, chain = 1.0, 1.0
    for m in mode:
        chain *= m
        total += chain
    return total


def find_row(rows, drafter, head, prompts, sampling, K, target="bf16") -> dict | None:
    return next((r for r in rows if (r["drafter"], r["head"], r["target"], r["prompts"], r["sampling_name"], r["K"])
                 == (drafter, head, target, prompts, sampling, K)), None)


def goal_prompts(rows) -> str | None:
    """MT-Bench when it was evaluated, else the held-out ShareGPT prompts."""
    return next((p for p in PROMPT_ORDER if any(r["prompts"] == p for r in rows)), None)


def best_head(rows: list[dict], heads: list[str], ks: list[int]) -> str | None:
    """The head with the highest greedy acceptance length at K = 3 (else the largest K) on the
    goals' prompt set, on the bf16 target; None before any such row."""
    K = GOAL_K if GOAL_K in ks else max(ks)
    pset = goal_prompts(rows)
    scored = [(r["acceptance_length"], n) for n in heads if (r := find_row(rows, "mtp", n, pset, "greedy", K))]
    return max(scored)[1] if scored else None


# ----------------------------------------------------------------------------- heads
def head_info(W: Path, name: str) -> dict:
    """A head's settings and outcome, from its run dir (what trained, not this call's flags)."""
    run = W / "heads" / name
    d = head_dir(W, name)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    finished = d.name == "final"
    if finished:
        m = json.loads((d / "metrics.json").read_text())
    else:  # stopped by the budget: no final held-out pass
        st = json.loads((d / "trainer_state.json").read_text())
        m = {"step": st["step"], "tokens_seen": st["tokens_seen"], "train_seconds": st.get("train_seconds")}
    plan_path = W / "heads" / f"{name}.plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    curve = [{k: r.get(k) for k in ("step", "tokens_seen", "heldout_simulated_acceptance_length",
                                    "heldout_replayed_acceptance_length", "heldout_loss", "heldout_acc")}
             for r in (read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else [])
             if r.get("kind") == "heldout"]
    t = cfg["train"]
    return {
        "k": cfg["head"]["num_steps"], "loss": cfg["head"]["loss"], "init": cfg["head"]["init"],
        "data": Path(cfg["data"]["train"]).stem.removeprefix("train_"), "max_length": cfg["data"]["max_length"],
        "enable_thinking": cfg["data"]["enable_thinking"], "holdout_rows": cfg["data"]["holdout"],
        "finished": finished, "steps": m["step"], "max_steps": t["max_steps"], "micro_batch_size": t["micro_batch_size"],
        "grad_accum": t["grad_accum"], "lr": t["lr"], "warmup_steps": t["warmup_steps"],
        "heldout_every": t.get("heldout_every", 0), "seed": t["seed"],
        "train_tokens_requested": plan.get("train_tokens"), "mean_row_tokens": plan.get("mean_length"),
        "planned_tokens": plan.get("planned_tokens"), "tokens_seen": m.get("tokens_seen"),
        "train_seconds": m.get("train_seconds"),
        "heldout_simulated_acceptance_length": m.get("heldout_simulated_acceptance_length"),
        "heldout_replayed_acceptance_length": m.get("heldout_replayed_acceptance_length"),
        "heldout_loss": m.get("heldout_loss"), "heldout_acc": m.get("heldout_acc"), "curve": curve,
    }


def save_curve_png(heads: dict, path: Path) -> None:
    """Held-out simulated acceptance length against training tokens, one line per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, h in heads.items():
        pts = [(p["tokens_seen"] / 1e6, p["heldout_simulated_acceptance_length"]) for p in h["curve"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{name} (k={h['k']})")
    ax.set(xlabel="training tokens seen (M)", ylabel="held-out simulated acceptance length",
           title="MTP heads on the demo target: held-out acceptance vs training tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- projection, goals
def projection(rows: list[dict], best: str | None, step_times: str, batches: list[int]) -> dict:
    """Projected tok/s and speed-up at the real shape (module docstring), for the best head and
    n-gram, greedy and recommended sampling, each K the step-times file has and each batch."""
    path = Path(step_times)
    if not path.is_file():
        return {"skipped": f"no step-times file {step_times} (scripts/bench_decode.py --out)", "entries": []}
    st = json.loads(path.read_text())
    pset = goal_prompts(rows)
    entries = []
    mapped = sorted({r["token_map_size"] for r in rows if best and r.get("token_map_size")
                     and r["head"] == f"{best}@token-map-{r['token_map_size']}"})
    for drafter, head, size in (([("mtp", best, None)] if best else []) + [("ngram", None, None)]
                                + [("mtp", f"{best}@token-map-{n}", n) for n in mapped]):
        table = (st["verify_step_ms"] if drafter == "ngram" else st["spec_step_ms"] if size is None
                 else st.get("spec_step_ms_token_map", {}).get(str(size), {}))  # files before token maps lack it
        for sampling in SAMPLING_ORDER:
            for key in sorted(table, key=lambda k: int(k.split("=")[1])):
                K = int(key.split("=")[1])
                row = find_row(rows, drafter, head, pset, sampling, K)
                if row is None:
                    continue
                for B in batches:
                    step_ms, decode = table[key].get(str(B)), st["decode_tok_s"].get(str(B))
                    if step_ms is None or decode is None:
                        continue
                    tok_s = row["acceptance_length"] * B / step_ms * 1000
                    entries.append({"drafter": drafter, "head": head, "token_map": size, "prompts": pset,
                                    "sampling_name": sampling,
                                    "K": K, "batch": B, "acceptance_length": row["acceptance_length"],
                                    "step_ms": step_ms, "step": "speculative" if drafter == "mtp" else "verify",
                                    "decode_tok_s": decode, "projected_tok_s": tok_s, "projected_speedup": tok_s / decode})
    return {"label": "a projection, not a measurement: the demo target's measured acceptance combined with step "
                     f"times measured at the {st.get('config')} shape",
            "formula": "projected tok/s = AL_K x batch / step_ms[K][batch] x 1000; speed-up = projected tok/s / "
                       "plain decode tok/s[batch]",
            "assumptions": ASSUMPTIONS,
            "step_times": {"file": str(step_times), "date": st.get("date"), "gpu": st.get("gpu"),
                           "config": st.get("config"), "dtype": st.get("dtype"), "ctx": st.get("ctx"),
                           "kernels": st.get("kernels"), "torch": st.get("torch"), "command": st.get("command"),
                           **({} if st.get("command") else {"command_note": "the file does not record its command; "
                                                            "docs/BENCHMARKS.md names the one that wrote it"})},
            "entries": entries}


def ceiling_ratio(rows, best) -> float | None:
    """Goal 3's top-1 ceiling (est.): the best head's top1_ceiling over n-gram's acceptance length,
    both at the recommended sampling, K = 3, on the goals' prompts; None without either row."""
    pset = goal_prompts(rows)
    head = find_row(rows, "mtp", best, pset, "recommended", GOAL_K)
    ngram = find_row(rows, "ngram", None, pset, "recommended", GOAL_K)
    ceiling = top1_ceiling(head) if head else None
    return ceiling / ngram["acceptance_length"] if ceiling and ngram and ngram["acceptance_length"] else None


def goal(name: str, value, op: str, threshold: float, source: str) -> dict:
    ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"goal": name, "value": value, "op": op, "threshold": threshold, "pass": ok, "source": source}


def goals(rows, best, proj, demo) -> list[dict]:
    pset = goal_prompts(rows)

    def al(drafter, head, sampling, K):
        r = find_row(rows, drafter, head, pset, sampling, K)
        return r["acceptance_length"] if r else None

    k3, k1 = al("mtp", best, "greedy", 3), al("mtp", best, "greedy", 1)
    rec_head, rec_ngram = al("mtp", best, "recommended", 3), al("ngram", None, "recommended", 3)
    speed = next((e["projected_speedup"] for e in proj["entries"] if (e["drafter"], e.get("token_map"), e["sampling_name"],
                                                                        e["K"], e["batch"]) == ("mtp", None, "greedy", 3, 1)), None)
    mapped = [e for e in proj["entries"] if e.get("token_map") and (e["sampling_name"], e["K"], e["batch"]) == ("greedy", 3, 1)]
    loop_row = next((r for r in rows if r["target"] == "bf16" and r["prompts"] == pset and r["sampling_name"] == "greedy"
                     and r["loop_share"] is not None), None)
    where = f"{pset}, best head {best}"
    return [
        goal("best head, greedy, K=3: acceptance length", k3, ">=", 3.0, where),
        goal("best head, greedy, K=1: acceptance length", k1, ">=", 1.85, where),
        {**goal(RATIO_GOAL, rec_head / rec_ngram if rec_head and rec_ngram else None, ">=", 1.5, where),
         "ceiling": ceiling_ratio(rows, best), "ceiling_note": CEILING_NOTE},
        goal("projected speed-up at batch 1, K=3 (greedy acceptance)", speed, ">=", 1.8,
             "projection (step times: " + str(proj.get("step_times", {}).get("file")) + ")"),
        *[goal(f"projected speed-up at batch 1, K=3 (greedy acceptance), drafting among a {e['token_map']:,}-id token map",
               e["projected_speedup"], ">=", 1.8, f"projection, {e['head']} (SGLang's --speculative-token-map)")
          for e in mapped],
        goal("demo target: share of greedy answers that end in a loop", loop_row["loop_share"] if loop_row else None,
             "<=", 0.2, f"this study's greedy {pset} outputs, {loop_row['num_prompts'] if loop_row else '-'} prompts x "
                        f"{loop_row['max_new_tokens'] if loop_row else '-'} new tokens"),
        goal("demo target: held-out loss", demo.get("heldout_loss"), "<=", 3.6, "demo_target.json"),
    ]


# ----------------------------------------------------------------------------- the results file
def row_order(r: dict) -> tuple:
    return (PROMPT_ORDER.index(r["prompts"]), SAMPLING_ORDER.index(r["sampling_name"]), r["K"], r["target"] != "bf16",
            r["drafter"] != "ngram", r["head"] or "")


def curve_path(results: str | Path) -> Path:
    """The training-curve PNG that goes beside a results file."""
    out = Path(results)
    return out.with_name(out.stem + "_curve.png")


def write_results(a, W: Path, rows: list[dict], eos, planned_rows: int, samplings: dict,
                  running: dict | None = None) -> dict:
    """Assemble the results (module docstring), write them to a.results, the curve PNG next to
    it, the markdown to W/acceptance_study.md (and print it); export the best head to
    W/best_export. Returns the results. `running`: the phase that writes them, with its seconds so
    far (W/phase_times.jsonl gets its line only once the phase returns)."""
    demo = json.loads((W / "target" / "demo_target.json").read_text())
    data = json.loads((W / "data" / "data.json").read_text())
    heads = {n: head_info(W, n) for n in a.heads if head_dir(W, n)}
    diversity = {f"{r['prompts']}@{r['sampling_name']}": diversity_stats(r["outputs"], eos)
                 for r in rows if r.get("outputs")}
    table = [{k: v for k, v in r.items() if k != "outputs"} for r in sorted(rows, key=row_order)]
    agreement = {}
    for n, h in heads.items():
        sim = h["heldout_simulated_acceptance_length"]
        meas = (find_row(rows, "mtp", n, "sharegpt_heldout", "greedy", h["k"]) or {}).get("acceptance_length")
        rep = h.get("heldout_replayed_acceptance_length")
        agreement[n] = {"K": h["k"], "simulated": sim, "measured": meas,
                        "relative_difference": (meas - sim) / sim if sim and meas else None,
                        "within_10pct": abs(meas - sim) / sim <= 0.10 if sim and meas else None,
                        "replayed": rep, "replayed_relative_difference": (meas - rep) / rep if rep and meas else None}
    best = best_head(rows, list(heads), sorted({r["K"] for r in rows}) or [GOAL_K])
    if best:  # the draft dir a reader would serve, with its measured acceptance length recorded
        ref = find_row(rows, "mtp", best, goal_prompts(rows), "greedy", GOAL_K)
        export_mtp(head_dir(W, best), W / "target", W / "best_export", force=True,
                   acceptance_length=ref["acceptance_length"] if ref else None)
    fp8_info = json.loads((W / "fp8" / "fp8_info.json").read_text()) if (W / "fp8" / "fp8_info.json").exists() else None
    fp8 = None
    if fp8_info and any(r["target"] == "fp8" for r in rows):
        b = fp8_info["best_head"]
        ref = find_row(rows, "mtp", b, FP8_PROMPTS, FP8_SAMPLING, FP8_K)
        al = {"bf16_target_bf16_head": ref["acceptance_length"] if ref else None}
        for r in fp8_rows(b):
            got = find_row(rows, r["drafter"], r["head"], FP8_PROMPTS, FP8_SAMPLING, FP8_K, target="fp8")
            al[f"fp8_target_{r['draft']}_draft"] = got["acceptance_length"] if got else None
        fp8 = {**fp8_info, "prompts": FP8_PROMPTS, "sampling": FP8_SAMPLING, "K": FP8_K, "acceptance_length": al,
               "relative_change": {k: v / al["bf16_target_bf16_head"] - 1 if v and al["bf16_target_bf16_head"] else None
                                   for k, v in al.items() if k != "bf16_target_bf16_head"}}
    proj = projection(rows, best, a.step_times, a.projection_batches)
    out = Path(a.results)
    png = curve_path(out)
    if any(h["curve"] for h in heads.values()):
        save_curve_png(heads, png)
    result = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "commands": read_jsonl(W / "commands.jsonl") if (W / "commands.jsonl").exists() else [],
        "phase_seconds": (read_jsonl(W / "phase_times.jsonl") if (W / "phase_times.jsonl").exists() else [])
                         + ([running] if running else []),
        "complete": len(rows) >= planned_rows, "rows_planned": planned_rows, "rows_done": len(rows),
        "settings": {
            "data": data,
            "eval": {"max_new_tokens": sorted({r["max_new_tokens"] for r in rows}),
                     "batch_size": sorted({r["batch_size"] for r in rows}),
                     "thinking": sorted({str(r["thinking"]) for r in rows}),
                     "verify_rules": sorted({json.dumps(r["verify_rule"], sort_keys=True) for r in rows}),
                     "K": sorted({r["K"] for r in rows}), "samplings": samplings,
                     "num_prompts": {p: max(r["num_prompts"] for r in rows if r["prompts"] == p)
                                     for p in PROMPT_ORDER if any(r["prompts"] == p for r in rows)}},
        },
        "demo_target": {**{k: demo.get(k) for k in ("params", "params_embedding_and_head", "params_active_non_embedding",
                                                    "model", "recipe", "tokens_trained", "train_seconds", "heldout_loss",
                                                    "heldout_tokens", "command")},
                        **{k: v for k, v in demo.items() if k.startswith(("diversity", "loop"))}},
        "target_output_diversity": diversity,
        "heads": heads,
        "best_head": best,
        "best_export": str(W / "best_export") if best else None,
        "simulated_vs_measured": agreement,
        "fp8": fp8,
        # the token-map item: the map the best head drafted among (built from its training data)
        "token_map": token_map_results(W, rows),
        "projection": proj,
        "curve": {"png": str(png) if any(h["curve"] for h in heads.values()) else None,
                  "points": {n: h["curve"] for n, h in heads.items()}},
        "goals": goals(rows, best, proj, demo),
        "rows": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    md = markdown(result)
    atomic_write_text(W / "acceptance_study.md", md)
    print(md)
    print(f"wrote {out}" + (f" and {png}" if result["curve"]["png"] else ""))
    return result


# ----------------------------------------------------------------------------- markdown
def f(x, spec="{:.2f}") -> str:
    return "-" if x is None else spec.format(x)


def tokens(n) -> str:
    """1234567 -> "1.2M", 4321 -> "4,321", None -> "-"."""
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,.0f}"


def sampling_text(r: dict) -> str:
    s = r["sampling"]
    if s["temperature"] == 0:
        return "greedy"
    return f"T={s['temperature']:g}, top_p={s['top_p']:g}, top_k={s['top_k']}"


def mode_text(r: dict) -> str:
    """" (top token 0.70 / 0.74; ceiling ~2.22)": the row's per_position_mode_acceptance and its
    top1_ceiling (T > 0), or ""."""
    mode = r.get("per_position_mode_acceptance")  # rows written before it existed lack it
    ceiling = top1_ceiling(r)
    return (f" (top token {' / '.join(f(x) for x in mode)}" + (f"; ceiling ~{ceiling:.2f}" if ceiling else "") + ")"
            if mode else "")


def drafter_text(r: dict, heads: dict) -> str:
    if r["drafter"] == "ngram":
        return "n-gram"
    h = heads.get(r["head"])
    if h is None:  # the FP8 rows name their export
        return r["head"]
    text = f"{r['head']} (k={h['k']}, {h['loss']}, {h['init']}, {h['data']})"
    return text if h["finished"] else text + f" stopped at step {h['steps']}/{h['max_steps']}"


def markdown(res: dict) -> str:
    """BENCHMARKS.md's tables of the study, regenerated from the results JSON."""
    d, heads = res["demo_target"], res["heads"]
    L = []
    if not res["complete"]:
        L += [f"**Incomplete:** {res['rows_done']} of {res['rows_planned']} evaluations ran (the budget ended the "
              "eval phase; the least important rows are missing).", ""]
    div = d.get("diversity") or {}
    L += [f"Demo target: {f(d['params'] and d['params'] / 1e6, '{:.0f}')}M params "
          f"({f(d['params_embedding_and_head'] and d['params_embedding_and_head'] / 1e6, '{:.0f}')}M embedding + head), "
          f"{tokens(d['tokens_trained'])} tokens in {f(d['train_seconds'], '{:.0f}')} s, "
          f"held-out loss {f(d['heldout_loss'], '{:.3f}')}"
          + (f"; its own greedy check: {div.get('loops')}/{div.get('num_outputs')} of {div.get('num_prompts')} prompts x "
             f"{div.get('max_new_tokens')} tokens loop." if div else "."), ""]
    for key, s in res["target_output_diversity"].items():
        L.append(f"- target outputs {key} ({s['num_outputs']} answers): distinct-2 {f(s['distinct_2'])}, "
                 f"distinct-4 {f(s['distinct_4'])}, loops {s['loops']}/{s['num_outputs']}"
                 + (f"; mean {s['mean_output_tokens']:.0f} tokens, median {s['median_output_tokens']}, "
                    f"{s['short_outputs']} shorter than the loop test's {LOOP_WINDOW} tokens"
                    if s.get("short_outputs") is not None else ""))
    L += ["", "| head | k | init | data | steps | planned tokens | tokens seen | held-out sim. AL |",
          "|---|---:|---|---|---:|---:|---:|---:|"]
    for n, h in heads.items():
        L.append(f"| {n} | {h['k']} | {h['init']} | {h['data']} | {h['steps']}/{h['max_steps']} | "
                 f"{tokens(h['planned_tokens'])} | {tokens(h['tokens_seen'])} | "
                 f"{f(h['heldout_simulated_acceptance_length'], '{:.3f}')} |")
    sd = res.get("settings", {}).get("data") or {}
    if sd.get("mean_length"):  # how much distinct text each data kind holds (one pass over its training rows)
        per_pass = {k: sd["training_rows"][k] * v for k, v in sd["mean_length"].items()}
        line = (f"Training data: {sd['train_regen']:,} conversations answered greedily by the target, "
                f"{tokens(per_pass['regen'])} tokens a pass (mean row {sd['mean_length']['regen']:.0f})")
        if sd.get("sampled_passes"):
            how = sd["sampled_regeneration"]["settings"][0]["sampling"]
            passes = sd["sampled_passes"]
            line += (f"; `mix` adds {sd['train_sampled']:,} sampled answers ({passes} pass{'es' if passes > 1 else ''} at T "
                     f"{how.get('temperature')}, top_p {how.get('top_p')}, top_k {how.get('top_k')}), "
                     f"{tokens(per_pass['mix'])} tokens a pass")
        L += ["", line + "."]
    L += ["", "Training curve (held-out simulated acceptance length at tokens seen):", ""]
    for n, h in heads.items():
        pts = ", ".join(f"{tokens(p['tokens_seen'])}: {p['heldout_simulated_acceptance_length']:.3f}" for p in h["curve"])
        L.append(f"- {n}: {pts or '-'}")
    if res["curve"]["png"]:
        L.append(f"- plot: `{res['curve']['png']}`")
    L += ["", "Per position: the share of drafts accepted given the ones before them; at T > 0, in brackets, how "
          "often SGLang's rule would accept the target's own top token at the same positions (no top-1 drafter "
          "does better on those contexts), and the top-1 ceiling (est.) of the acceptance length, 1 + sum_k "
          "prod_{j<=k} of those shares: about the best any top-1 drafter reaches there.",
          "", "| prompts | sampling | K | drafter | accept len | non-looping: AL (prompts) | per position | speedup | lossless |",
          "|---|---|---:|---|---:|---:|---|---:|---|"]
    for r in res["rows"]:
        if r["target"] != "bf16":
            continue
        nonloop = (f"{f(r['acceptance_length_nonloop'], '{:.3f}')} ({r['num_prompts_nonloop']}/{r['num_prompts']})"
                   if r["loop_share"] is not None else "-")
        L.append(f"| {r['prompts']} | {sampling_text(r)} | {r['K']} | {drafter_text(r, heads)} | "
                 f"{f(r['acceptance_length'], '{:.3f}')} | {nonloop} | "
                 f"{' / '.join(f(x) for x in r['per_position_acceptance'])}{mode_text(r)} | "
                 f"{f(r['speedup'], '{:.2f}x')} | {r['lossless']} |")
    L += loop_table(res)
    if res["fp8"]:
        x = res["fp8"]
        L += ["", f"FP8 (block {x['block'][0]}x{x['block'][1]} copy of the demo target), {x['best_head']}, MT-Bench greedy, K=3:",
              "", "| target | draft | accept len | change |", "|---|---|---:|---:|",
              f"| bf16 | bf16 (final/) | {f(x['acceptance_length']['bf16_target_bf16_head'], '{:.3f}')} | - |"]
        for kind in ("bf16", "fp8"):
            L.append(f"| fp8 | {kind} export | {f(x['acceptance_length'][f'fp8_target_{kind}_draft'], '{:.3f}')} | "
                     f"{f(x['relative_change'][f'fp8_target_{kind}_draft'], '{:+.1%}')} |")
    if res.get("token_map"):  # older files lack the key
        x = res["token_map"]
        L += ["", f"Token map: rows `{x['head']}@token-map-{x['size']}` drafted among the {x['size']:,} most frequent "
                  f"assistant tokens of the head's training data ({x['coverage']:.2%} of them; SGLang's "
                  f"--speculative-token-map, `{x['path']}`)."]
    L += projection_table(res["projection"])
    L += ["", "| head | K | simulated (training log, held-out) | measured (evaluator, held-out greedy) | diff | within 10% "
          "| replayed (same hits, walked as decoding walks) | measured vs replayed |",
          "|---|---:|---:|---:|---:|---|---:|---:|"]
    for n, g in res["simulated_vs_measured"].items():
        L.append(f"| {n} | {g['K']} | {f(g['simulated'], '{:.3f}')} | {f(g['measured'], '{:.3f}')} | "
                 f"{f(g['relative_difference'], '{:+.1%}')} | {g['within_10pct']} | {f(g.get('replayed'), '{:.3f}')} | "
                 f"{f(g.get('replayed_relative_difference'), '{:+.1%}')} |")
    L += ["", "| goal | value | threshold | met |", "|---|---:|---:|---|"]
    notes = []
    for g in res["goals"]:
        ceiling = (g["ceiling"] if "ceiling" in g  # files written before goal 3 carried it: from the rows
                   else ceiling_ratio(res["rows"], res.get("best_head")) if g["goal"] == RATIO_GOAL else None)
        if ceiling is not None:
            notes.append(f"- {g['goal']}: top-1 ceiling (est.) {ceiling:.3f}, {g.get('ceiling_note', CEILING_NOTE)}.")
        L.append(f"| {g['goal']} ({g['source']}) | {f(g['value'], '{:.3f}')}"
                 + (f" (top-1 ceiling (est.) {ceiling:.3f})" if ceiling is not None else "")
                 + f" | {g['op']} {g['threshold']:g} | {'-' if g['pass'] is None else ('yes' if g['pass'] else 'no')} |")
    L += ([""] + notes) if notes else []
    return "\n".join(L) + "\n"


def loop_table(res: dict) -> list[str]:
    """Greedy acceptance length overall and on the answers that do not loop, n-gram beside the heads."""
    rows = [r for r in res["rows"] if r["target"] == "bf16" and r["loop_share"] is not None]
    cols = ["ngram"] + list(res["heads"])
    L = ["", "Greedy: acceptance length on all answers / on the answers that do not end in a loop:", "",
         "| prompts | K | looping answers | " + " | ".join("n-gram" if c == "ngram" else c for c in cols) + " |",
         "|---|---:|---:|" + "---:|" * len(cols)]
    for pset in PROMPT_ORDER:
        for K in sorted({r["K"] for r in rows if r["prompts"] == pset}):
            by = {("ngram" if r["drafter"] == "ngram" else r["head"]): r for r in rows if r["prompts"] == pset and r["K"] == K}
            any_row = next(iter(by.values()))
            cells = [f"{f(by[c]['acceptance_length'])} / {f(by[c]['acceptance_length_nonloop'])}" if c in by else "-"
                     for c in cols]
            L.append(f"| {pset} | {K} | {any_row['num_prompts_loop']}/{any_row['num_prompts']} | " + " | ".join(cells) + " |")
    return L


def projection_table(p: dict) -> list[str]:
    if p.get("skipped"):
        return ["", f"Projection skipped: {p['skipped']}."]
    st = p["step_times"]
    L = ["", f"**Projection** ({p['label']}; step times {st['file']}, {st['gpu']}, {st['date']}). {p['formula']}.",
         "Assumptions: " + "; ".join(p["assumptions"]) + ".", "",
         "| drafter | sampling | K | batch | accept len | step ms | projected tok/s | plain decode tok/s | projected speed-up |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in p["entries"]:
        L.append(f"| {e['head'] or 'n-gram'} | {e['sampling_name']} | {e['K']} | {e['batch']} | "
                 f"{e['acceptance_length']:.3f} | {e['step_ms']:.2f} ({e['step']}) | {e['projected_tok_s']:.0f} | "
                 f"{e['decode_tok_s']:.0f} | {e['projected_speedup']:.2f}x |")
    return L
