"""Decode-step benchmark of our engine (model/engine.py) against transformers' generate() and the HBM floor.

    # one H200, Qwen3-30B-A3B shape, random bf16 weights built on the GPU; about 8 minutes
    python scripts/bench_decode.py --out docs/results/eval_speed.json
    # CPU smoke test of the same code path (torch kernels)
    python scripts/bench_decode.py --config tiny --device cpu --batch-sizes 1,2 --out /tmp/bench.json
    # an FP8 target as the engine runs it: weights rounded through block-FP8, held dequantized
    python scripts/bench_decode.py --fp8 --skip-hf --out docs/results/eval_speed_fp8.json

Side by side, in one process, on the same model:
  ours    plain decode step; verify step (target forward over K+1 tokens + acceptance, K=1,3);
          full speculative step (K-1 head draft forwards + verify + draft extend), each one
          CUDA graph, also with a draft vocabulary of --token-map-sizes ids (SGLang's
          --speculative-token-map: each draft step reads that many lm_head rows), with
            triton  the decode kernels (model/linear_kernels.py, attn_kernels.py,
                    moe_kernels.py; the engine's default on CUDA), layers eager;
            torch   the torch path (cuBLAS, SDPA, grouped_mm experts; the previous default);
          each also with the decoder layers under torch.compile (--skip-compile to omit)
  hf      generate() greedy with its default cache, and cache_implementation="static" (which
          makes transformers compile the step: 1-2 minutes per batch size; --skip-hf-static)
  floor   bytes a step must read from HBM / 4.3 TB/s: attention, router and norms of every
          layer, the experts hit (E * (1 - (1 - k/E)^(B*T)) per layer under uniform routing),
          embedding rows and the full lm_head; KV cache reads excluded
Ours: GPU time of back-to-back graph replays (CUDA events), prefill excluded. HF: wall time of
generate(), which includes its prefill of --ctx tokens (small next to --hf-tokens steps).
Checks in the same run: each kernels setting's logits against transformers' forward after a
shared prefill, decode-step vs verify-step logits of the same token (bit equality), and a
speculative-vs-plain lossless check (T=0).
--fp8: FrozenTarget.load dequantizes a block-FP8 checkpoint (Qwen3-*-FP8) to bf16, and the engine
reads those bf16 weights, so an FP8 target's steps are bf16 steps over FP8-representable values.
This flag builds exactly that (model/fp8.fp8_round_model_ on the random target, 128x128 blocks)
to show the step times equal the bf16 run's.
Stages run in priority order and are skipped when --budget-s would be exceeded; a failing
stage is recorded under "errors" and the rest still run. Prints a markdown table
(docs/BENCHMARKS.md) and writes every number to --out. scripts/profile_decode.py shows where a
step's time goes, kernel by kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers

from model import attn_kernels, linear_kernels, moe_kernels
from model.acceptance import SamplingParams, verify_drafts
from model.configs import NAMED
from model.decode_bench import (
    T_START, build_head, build_target, free_memory, hbm_floor_ms, kernels_check, log, lossless_check, time_steps,
)
from model.drafters import MTPDrafter
from model.fp8 import fp8_round_model_
from model.engine import Engine, MTPHeadLM, TargetLM, capture_graph

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen3-30b-a3b", choices=sorted(NAMED))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default="1,8,16")
    p.add_argument("--ks", default="1,3", help="draft lengths K of the verify / speculative steps")
    p.add_argument("--ctx", type=int, default=128, help="prompt tokens before the timed steps")
    p.add_argument("--iters", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--kernels", default=None,
                   help="decode kernels timed, comma-separated (default triton,torch on CUDA; torch on CPU)")
    p.add_argument("--experts", default=None, help="the torch path's MoE experts (default grouped_mm on CUDA, loop on CPU)")
    p.add_argument("--hf-tokens", type=int, default=32, help="new tokens per HF generate() call")
    p.add_argument("--hf-static-batch-sizes", default="1,8")
    p.add_argument("--skip-hf", action="store_true", help="no HF generate() at all")
    p.add_argument("--skip-hf-static", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--token-map-sizes", default="32768",
                   help="also time the speculative step with a token map of N ids (comma list; '' for none)")
    p.add_argument("--compile-ks", default="3",
                   help="K values measured with compiled layers (each K adds a compiled (B, K+1) shape)")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting stages after this")
    p.add_argument("--bandwidth-tbps", type=float, default=4.3, help="HBM bandwidth for the floor (H200: 4.8 peak, ~4.3 reachable)")
    p.add_argument("--std", type=float, default=0.02, help="std of the random weights")
    p.add_argument("--fp8", action="store_true",
                   help="round the target's attention and expert weights through block-FP8 (128x128), as an FP8 "
                        "checkpoint dequantized on load gives them")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- runs
@torch.no_grad()
def bench_ours(model, head, cfg, B: int, ks: list[int], a, kernels: str, experts: str | None, compile_: bool) -> dict:
    """ms per plain decode step, verify step and speculative step at batch B."""
    device = torch.device(a.device)
    gen = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, cfg.vocab_size, (B, a.ctx), generator=gen).tolist()
    K_max = max(ks)
    max_new = (a.iters + 4) * (K_max + 1) + 1  # rows never finish while timed
    max_len = a.ctx + max_new + K_max + 1
    out = {"verify_ms": {}, "spec_ms": {}, "spec_map_ms": {}}
    t = time.perf_counter()
    tlm = TargetLM(model, experts=experts, compile=compile_, kernels=kernels)
    plain = Engine(tlm, None, batch_size=B, max_len=max_len, max_new_tokens=max_new, steps=K_max)
    step = plain.start(prompts, speculative=False)
    out["decode_ms"] = time_steps(step, a.iters, device)
    out["setup_s"] = time.perf_counter() - t
    for K in ks:  # the plain engine's cache holds the prompt; verify K+1 tokens after it
        toks = torch.randint(0, cfg.vocab_size, (B, K + 1), generator=gen).to(device)
        pos = (a.ctx + torch.arange(K + 1, device=device)).expand(B, K + 1)
        def fn(lm=tlm, toks=toks, pos=pos):  # one verify step: the target forward over K+1 tokens and the rule
            return verify_drafts(toks[:, 1:], None, lm.logits(lm.forward(toks, pos)), SamplingParams())
        graph = capture_graph(fn) if device.type == "cuda" else None
        out["verify_ms"][K] = time_steps(graph.replay if graph else fn, a.iters, device)
        del graph
    del plain, step
    for K in ks:
        head_lm = MTPHeadLM(head, tlm, experts=experts, compile=compile_, kernels=kernels)
        eng = Engine(tlm, MTPDrafter(head_lm), batch_size=B, max_len=max_len, max_new_tokens=max_new, steps=K)
        step = eng.start(prompts, speculative=True)
        out["spec_ms"][K] = time_steps(step, a.iters, device)
        del eng, step, head_lm
    for size in a.token_map_sizes:  # any `size` ids: the draft step's cost depends on how many
        ids = torch.randperm(cfg.vocab_size, generator=gen)[:size].to(device)
        for K in ks:
            head_lm = MTPHeadLM(head, tlm, experts=experts, compile=compile_, kernels=kernels, token_map=ids)
            eng = Engine(tlm, MTPDrafter(head_lm), batch_size=B, max_len=max_len, max_new_tokens=max_new, steps=K)
            step = eng.start(prompts, speculative=True)
            out["spec_map_ms"].setdefault(size, {})[K] = time_steps(step, a.iters, device)
            del eng, step, head_lm
    out["total_s"] = time.perf_counter() - t
    del tlm
    free_memory()
    return out


@torch.no_grad()
def bench_hf(model, cfg, B: int, a, static: bool) -> dict:
    device = torch.device(a.device)
    gen = torch.Generator().manual_seed(2000 + B)
    ids = torch.randint(0, cfg.vocab_size, (B, a.ctx), generator=gen).to(device)
    n = a.hf_tokens
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, max_new_tokens=n, min_new_tokens=n)
    if static:
        kw["cache_implementation"] = "static"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    # warm-up: static needs the same shapes (its compiled step is specialised to the cache size)
    model.generate(ids, **(kw if static else dict(kw, max_new_tokens=2, min_new_tokens=2)))
    sync()
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(ids, **kw)
    sync()
    dt = time.perf_counter() - t
    assert out.shape[1] == a.ctx + n, out.shape
    free_memory()
    return {"tok_s": B * n / dt, "step_ms": dt * 1e3 / n, "first_call_s": first_s}


# ------------------------------------------------------------------------- output
MODE_LABELS = {"triton_graphs": "ours triton", "triton_compiled": "ours triton + compile",
               "torch_graphs": "torch path", "torch_compiled": "torch path + compile"}


def markdown(res: dict, batch_sizes: list[int], ks: list[int]) -> str:
    def f(x, spec="{:.0f}"):
        return "-" if x is None else spec.format(x)

    def g(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or str(k) not in d:
                return None
            d = d[str(k)]
        return d

    modes = [m for m in MODE_LABELS if m in res["decode_tok_s_by_mode"]]
    lines = [f"Decode throughput, {res['config']} random {res['dtype']} weights, {res['gpu']}, ctx {res['ctx']} "
             f"(torch {res['torch']}, transformers {res['transformers']}, {res['date'][:10]})", "",
             "| batch | " + " | ".join(f"{MODE_LABELS[m]} tok/s" for m in modes)
             + " | HF generate tok/s | HF static+compile tok/s | HBM floor tok/s |",
             "|---:|" + "---:|" * (len(modes) + 3)]
    for B in batch_sizes:
        floor = g(res, "hbm_floor_ms", "decode", B)
        lines.append(f"| {B} | " + " | ".join(f(g(res, "decode_tok_s_by_mode", m, B)) for m in modes)
                     + f" | {f(g(res, 'hf_generate_tok_s', B), '{:.1f}')} | {f(g(res, 'hf_static_compile_tok_s', B), '{:.1f}')} "
                     f"| {f(B * 1e3 / floor if floor else None)} |")
    lines += ["", "| step | batch | " + " | ".join(f"{MODE_LABELS[m]} ms" for m in modes) + " | HBM floor ms |",
              "|---|---:|" + "---:|" * (len(modes) + 1)]
    for name, key, K in ([("decode", "decode_step_ms", None)] + [(f"verify K={K}", "verify_step_ms", K) for K in ks]
                         + [(f"spec step K={K}", "spec_step_ms", K) for K in ks]):
        for B in batch_sizes:
            sub = [] if K is None else [f"K={K}"]
            vals = [g(res, key + "_by_mode", m, *sub, B) for m in modes]
            fl = g(res, "hbm_floor_ms", "decode" if K is None else f"verify_K={K}", B) if key != "spec_step_ms" else None
            lines.append(f"| {name} | {B} | " + " | ".join(f(v, "{:.2f}") for v in vals) + f" | {f(fl, '{:.3f}')} |")
    for size in res["spec_step_ms_token_map"]:
        for K in ks:
            for B in batch_sizes:
                vals = [g(res, "spec_step_ms_token_map_by_mode", m, size, f"K={K}", B) for m in modes]
                if any(v is not None for v in vals):
                    lines.append(f"| spec step K={K}, token map {int(size):,} | {B} | "
                                 + " | ".join(f(v, "{:.2f}") for v in vals) + " | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; pass --device cpu")
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    ks = [int(x) for x in a.ks.split(",")]
    if min(ks) < 1 or min(batch_sizes) < 1:
        raise SystemExit("error: --ks and --batch-sizes must be >= 1")
    compile_ks = [int(x) for x in a.compile_ks.split(",") if x] or ks[-1:]
    try:
        a.token_map_sizes = [int(x) for x in a.token_map_sizes.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --token-map-sizes must be a comma list of integers (got {a.token_map_sizes!r})") from None
    if any(n < 1 or n > NAMED[a.config].get("vocab_size", 151936) for n in a.token_map_sizes):
        raise SystemExit(f"error: --token-map-sizes must lie in [1, the vocabulary size] (got {a.token_map_sizes})")
    kernel_sets = (a.kernels or ("triton,torch" if cuda else "torch")).split(",")
    res = {
        "config": a.config, "device": str(device), "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "transformers": transformers.__version__, "triton": getattr(moe_kernels.triton, "__version__", None),
        "ctx": a.ctx, "iters": a.iters, "hf_tokens": a.hf_tokens, "kernels": kernel_sets,
        "torch_path_experts": a.experts or ("grouped_mm" if cuda else "loop"), "hbm_bandwidth_tbps": a.bandwidth_tbps,
        "triton_pdl": moe_kernels.PDL["enabled"],  # MTP_DECODE_PDL
        "attention_split_slots": attn_kernels.split_slots(),  # MTP_ATTN_SPLIT, else the config's
        "kernel_config": {"moe": moe_kernels.CONFIG, "attention": attn_kernels.CONFIG, "linear": linear_kernels.CONFIG},
        "decode_tok_s": {}, "verify_step_ms": {}, "spec_step_ms": {},  # best mode per batch size
        "decode_tok_s_by_mode": {}, "decode_step_ms_by_mode": {}, "verify_step_ms_by_mode": {}, "spec_step_ms_by_mode": {},
        # token map size -> K -> batch: the speculative step drafting among that many ids
        "spec_step_ms_token_map": {}, "spec_step_ms_token_map_by_mode": {},
        "hbm_floor_ms": {}, "hf_generate_tok_s": {}, "hf_generate_step_ms": {},
        "hf_static_compile_tok_s": {}, "hf_static_compile_first_call_s": {}, "setup_s": {},
        "kernels_check": None, "lossless_check": {}, "errors": {}, "skipped": [],
    }

    def left() -> float:
        return a.budget_s - (time.perf_counter() - T_START)

    def save(complete: bool = False):  # after every stage too: a device call cut short keeps what it measured
        if a.out:
            res["complete"] = complete
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))

    def stage(name: str, need_s: float, fn):
        if left() < need_s:
            res["skipped"].append(f"{name} (needs ~{need_s:.0f}s, {left():.0f}s of the budget left)")
            log(f"skip {name}: budget")
            return None
        log(f"start {name} ({left():.0f}s of budget left)")
        try:
            out = fn()
            log(f"done  {name}")
            res.setdefault("stages_done", []).append(name)
            return out
        except Exception as e:  # a benchmark records a failing stage and goes on
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"
            free_memory()
            return None
        finally:
            save()

    log(f"building {a.config} on {device}")
    model = build_target(a.config, a.device, a.std)
    if a.fp8:
        n = fp8_round_model_(model, (128, 128))
        res["fp8"] = {"block": [128, 128], "tensors_rounded": n, "held_as": "bf16 (dequantized on load)"}
        log(f"fp8: {n} attention/expert tensors rounded through block-FP8, held dequantized")
    cfg = model.config
    head = build_head(model, a.device, a.std)
    res["build_s"] = time.perf_counter() - T_START
    res["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    log(f"model ready: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
    for B in batch_sizes:
        res["hbm_floor_ms"].setdefault("decode", {})[str(B)] = hbm_floor_ms(cfg, B, 1, a.bandwidth_tbps, ctx=a.ctx)
        for K in ks:
            res["hbm_floor_ms"].setdefault(f"verify_K={K}", {})[str(B)] = hbm_floor_ms(cfg, B, K + 1, a.bandwidth_tbps, ctx=a.ctx)

    def record(mode: str, B: int, out: dict | None):
        if out is None:
            return
        b = str(B)
        tok_s = B * 1e3 / out["decode_ms"]
        res["decode_step_ms_by_mode"].setdefault(mode, {})[b] = out["decode_ms"]
        res["decode_tok_s_by_mode"].setdefault(mode, {})[b] = tok_s
        res["decode_tok_s"][b] = max(tok_s, res["decode_tok_s"].get(b, 0.0))
        for name, key in (("verify_ms", "verify_step_ms"), ("spec_ms", "spec_step_ms")):
            for K, ms in out[name].items():
                res[key + "_by_mode"].setdefault(mode, {}).setdefault(f"K={K}", {})[b] = ms
                best = res[key].setdefault(f"K={K}", {})
                best[b] = min(ms, best.get(b, float("inf")))
        for size, by_k in out["spec_map_ms"].items():
            for K, ms in by_k.items():
                res["spec_step_ms_token_map_by_mode"].setdefault(mode, {}).setdefault(str(size), {}).setdefault(f"K={K}", {})[b] = ms
                best = res["spec_step_ms_token_map"].setdefault(str(size), {}).setdefault(f"K={K}", {})
                best[b] = min(ms, best.get(b, float("inf")))
        res["setup_s"].setdefault(mode, {})[str(B)] = out["setup_s"]
        log(f"  {mode} B={B}: decode {out['decode_ms']:.2f} ms ({B * 1e3 / out['decode_ms']:.0f} tok/s), "
            f"verify {({k: round(v, 2) for k, v in out['verify_ms'].items()})} ms, spec {({k: round(v, 2) for k, v in out['spec_ms'].items()})} ms")
        save()

    # 1. ours, layers eager in CUDA graphs, each kernels setting, every batch size
    for B in batch_sizes:
        for kernels in kernel_sets:
            record(f"{kernels}_graphs", B, stage(f"ours {kernels} B={B}", 10,
                                                 lambda: bench_ours(model, head, cfg, B, ks, a, kernels, a.experts, False)))
    # 2. correctness in the same run: against transformers, decode vs verify, lossless at T=0
    res["kernels_check"] = stage("kernels check", 20, lambda: kernels_check(model, a, kernel_sets, a.experts))
    if res["kernels_check"]:
        log(f"  kernels check: {res['kernels_check']}")
    B_check = min(8, max(batch_sizes))
    for kernels in kernel_sets:
        out = stage(f"lossless check {kernels}", 15, lambda: lossless_check(model, head, cfg, B_check, max(ks), a, kernels, a.experts))
        if out:
            res["lossless_check"][kernels] = out
            log(f"  lossless {kernels}: {out['mismatching_rows']} of {B_check} rows differ")
    if len(res["lossless_check"]) == 2:
        outs = [v["plain_outputs"] for v in res["lossless_check"].values()]
        res["plain_rows_equal_across_kernels"] = sum(x == y for x, y in zip(*outs))
    # 3. HF generate, default cache
    if not a.skip_hf:
        for B in batch_sizes:
            out = stage(f"hf generate B={B}", 15, lambda: bench_hf(model, cfg, B, a, static=False))
            if out:
                res["hf_generate_tok_s"][str(B)] = out["tok_s"]
                res["hf_generate_step_ms"][str(B)] = out["step_ms"]
                log(f"  hf generate B={B}: {out['tok_s']:.1f} tok/s")
    # 4. ours with torch.compile'd layers (one compiled graph per (B, T) shape)
    if a.skip_compile or not cuda:
        res["skipped"].append("ours compiled" + ("" if a.skip_compile else " (CUDA only)"))
    else:
        for B in batch_sizes:
            for kernels in kernel_sets:
                record(f"{kernels}_compiled", B, stage(f"ours {kernels} compiled B={B}", 40,
                                                       lambda: bench_ours(model, head, cfg, B, compile_ks, a, kernels, a.experts, True)))
    # 5. HF generate with a static cache (transformers compiles its step)
    if a.skip_hf or a.skip_hf_static or not cuda:
        res["skipped"].append("hf static" + ("" if (a.skip_hf or a.skip_hf_static) else " (CUDA only)"))
    else:
        for B in [int(x) for x in a.hf_static_batch_sizes.split(",") if x]:
            out = stage(f"hf static B={B}", 80 if B == 1 else 140, lambda: bench_hf(model, cfg, B, a, static=True))
            if out:
                res["hf_static_compile_tok_s"][str(B)] = out["tok_s"]
                res["hf_static_compile_first_call_s"][str(B)] = out["first_call_s"]
                log(f"  hf static B={B}: {out['tok_s']:.1f} tok/s (first call {out['first_call_s']:.0f}s)")
    res["total_s"] = time.perf_counter() - T_START
    table = markdown(res, batch_sizes, ks)
    print("\n" + table + "\n")
    print(f"kernels check: {json.dumps(res['kernels_check'])}")
    print("lossless: " + ", ".join(f"{k} {v['mismatching_rows']}/{v['batch']} rows differ" for k, v in res["lossless_check"].items()))
    if res["errors"]:
        print(f"errors: {json.dumps(res['errors'], indent=1)}")
    if res["skipped"]:
        print(f"skipped: {res['skipped']}")
    res["markdown"] = table
    save(complete=True)
    if a.out:
        log(f"wrote {a.out}")
    log("total")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
