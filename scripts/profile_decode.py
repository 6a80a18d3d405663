"""Where a decode step's GPU time goes: a per-kernel table of the engine's (model/engine.py) plain decode step.

    # one H200, Qwen3-30B-A3B shape, random bf16 weights (about 3 minutes with compiling)
    python scripts/profile_decode.py --batch-sizes 1,8 --modes compiled:triton --out /tmp/profile.json
    # CPU smoke test of the same code (no CUDA graphs, no profiler kernel names)
    python scripts/profile_decode.py --config tiny --device cpu --batch-sizes 1 --modes eager:loop

For each (mode, batch) it builds the plain-decode Engine of bench_decode.py, times back-to-back
step replays (CUDA events), then records a few replays under torch.profiler and aggregates the
GPU kernels by name: calls and microseconds per step, and the share of the step. "gaps" is the
step time the kernels do not cover (launch latency and tails between kernels in the graph).
Modes are `eager|compiled:<kernels>[:<experts>]` (kernels: triton, torch; experts, for the torch
path: grouped_mm, gather).

--tune first times the Triton kernels of model/moe_kernels.py and model/attn_kernels.py alone,
with every layer's own weights in turn (48 calls per CUDA graph replay, so the weights come from
HBM as in a step), for a grid of tile sizes, and keeps the fastest for the profiled runs.
--check compares the Triton kernels' decode step with the torch path (logits after a shared
prefill) and runs a speculative-vs-plain lossless check with them.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

from model import attn_kernels, linear_kernels, moe_kernels
from model.configs import NAMED
from model.decode_bench import build_head, build_target, hbm_floor_ms, kernels_check, log, lossless_check, time_steps
from model.engine import Engine, TargetLM, capture_graph
from model.qwen3_forward import Dims, LayerWeights


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen3-30b-a3b", choices=sorted(NAMED))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--modes", default="compiled:triton", help="comma-separated eager|compiled:<experts>")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25, help="kernels listed per table")
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--tune", action="store_true", help="time tile sizes of the Triton kernels first")
    p.add_argument("--tune-batch-sizes", default="1,8")
    p.add_argument("--tune-kernels", default=None, help="comma-separated subset of the tuned kernels (default all)")
    p.add_argument("--tune-grid", default="full", choices=["full", "splits"],
                   help="splits: only the config in use and the grid's split configs (SPLIT_K, SPLIT_S)")
    p.add_argument("--tune-pick", default="first", choices=["first", "sum"],
                   help="keep the fastest config at the first tuned batch size, or the best over all of them")
    p.add_argument("--check", action="store_true", help="both kernel settings against transformers, and lossless")
    p.add_argument("--hf-tokens", type=int, default=32, help="new tokens of the lossless check")
    p.add_argument("--pdl", default="noprefetch", choices=["off", "noprefetch", "on", "all"],
                   help="programmatic dependent launch of the Triton kernels (model/moe_kernels.py's PDL): "
                        "noprefetch (the default) or on (also the linear kernel's early weight tile); "
                        "all: each run off, noprefetch, on")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# persistent grids of the expert kernels (model/moe_kernels.py `programs`): programs per SM (0: one
# program an item) and whether Triton flattens the item and tile loops into one pipelined loop
PERSIST = [dict(per_sm=0), dict(per_sm=1, flatten=True), dict(per_sm=2), dict(per_sm=2, flatten=True)]
GRID = {
    "gate_up": [dict(BLOCK_I=bi, BLOCK_IN=bk, num_warps=4, num_stages=st, **p)
                for bi, bk, st in ((64, 128, 4), (32, 128, 4), (64, 256, 3)) for p in PERSIST],
    "down": [dict(BLOCK_H=bh, BLOCK_IN=bk, num_warps=4, num_stages=st, **p)
             for bh, bk, st in ((64, 128, 3), (64, 128, 4), (128, 128, 3), (64, 256, 3)) for p in PERSIST],
    "combine": [dict(BLOCK=b, num_warps=w) for b in (256, 512, 1024) for w in (2, 4)],
    "router": [dict(BLOCK_E=be, BLOCK_IN=bk, num_warps=w) for be in (2, 4, 8) for bk in (512, 1024) for w in (4, 8)],
    # SPLIT_S: cache slots per program (0: one program walks a row's whole cache); tune at a long --ctx
    "attention": [dict(BLOCK_S=bs, num_warps=w, SPLIT_S=sp) for bs in (32, 64, 128) for w in (4, 8)
                  for sp in (0, 256, 512, 1024)],
    # 16: 320 programs for q/k/v at batch 1, spread over all 132 SMs of an H200 (64 fills 80 of them)
    # SPLIT_K > 1: more programs per output tile, each over part of K (the last adds them up)
    "small": [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, SPLIT_K=1)
              for bn in (16, 32, 64, 128) for bk in (128, 256, 512) for w in (4, 8) for st in (3, 4, 5)]
             + [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st, SPLIT_K=sk)
                for bn in (32, 64) for bk in (128, 256) for st in (3, 4) for sk in (2, 4)],
    "wide": [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, SPLIT_K=1)
             for bn in (16, 32, 64) for bk in (256, 512, 1024) for w in (4, 8) for st in (3, 4, 5)]
            + [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st, SPLIT_K=sk)
               for bn in (16, 32) for bk in (256, 512) for st in (3, 4) for sk in (2, 4)],
    "large": [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, SPLIT_K=1)
              for bn in (64, 128) for bk in (64, 128, 256) for w in (4, 8) for st in (3, 4, 5)],
}
CONFIGS = {"gate_up": moe_kernels.CONFIG, "down": moe_kernels.CONFIG, "combine": moe_kernels.CONFIG,
           "router": moe_kernels.CONFIG, "attention": attn_kernels.CONFIG, "small": linear_kernels.CONFIG, "wide": linear_kernels.CONFIG,
           "large": linear_kernels.CONFIG}


def graph_ms(fn, reps: int = 20) -> float:
    """ms per replay of a CUDA graph of fn()."""
    g = capture_graph(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def tune_grid(name: str, grid: str) -> list[dict]:
    """The configs tune() times for a kernel: its whole GRID ("full"), or ("splits") the config in
    use followed by the grid's split configs (SPLIT_K > 1, SPLIT_S > 0), a short side-by-side."""
    if grid == "full":
        return GRID[name]
    split = [c for c in GRID[name] if c.get("SPLIT_K", 1) > 1 or c.get("SPLIT_S", 0) > 0]
    return [dict(CONFIGS[name][name])] + split


@torch.no_grad()
def tune(model, batch_sizes: list[int], ctx: int, names: list[str], pick: str = "first", grid: str = "full",
         on_kernel=None) -> dict:
    """Per kernel and batch size: us per call (mean over the 48 layers) for each tile config.
    Kernels are tuned one after the other, each keeping the configs chosen before it. The one kept
    is the fastest at the first batch size (pick="first"), or the one with the least sum over the
    batch sizes of its time relative to that batch size's fastest (pick="sum"): the tiles are fixed
    for every step size, so one config serves batch 1, 8 and 16. grid: tune_grid's. on_kernel(out)
    runs after each kernel (main() writes --out then, so a run cut short keeps what it timed)."""
    cfg, dev = model.config, next(model.parameters()).device
    d = Dims.of(cfg)
    lws = [LayerWeights.of(layer, dev, torch.bfloat16) for layer in model.model.layers]
    L, H = len(lws), cfg.hidden_size
    lm_head = model.lm_head.weight.detach()
    fns = {}
    for B in batch_sizes:
        g = torch.Generator(device=dev).manual_seed(B)
        x = torch.randn(B, H, device=dev, dtype=torch.bfloat16, generator=g)
        a = torch.randn(B, H, device=dev, dtype=torch.bfloat16, generator=g) * 0.1
        S = ctx + 16
        cache = torch.randn(L, 2, B, d.n_kv, S, d.head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        q = torch.randn(B, d.n_heads, d.head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        pos = torch.full((B, 1), ctx, device=dev, dtype=torch.long)
        xo = torch.randn(B, d.n_heads * d.head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        hs = [moe_kernels.router(x, a, lw.post_norm, lw.router, d.eps, d.top_k, d.norm_topk) for lw in lws]
        fns[B] = {  # default arguments bind this batch size's tensors
            "router": lambda x=x, a=a: [moe_kernels.router(x, a, lw.post_norm, lw.router, d.eps, d.top_k, d.norm_topk)
                                        for lw in lws],
            "gate_up": lambda hs=hs: [moe_kernels.experts(h[1], h[2], h[3], h[0], lw.gate_up, lw.down)
                                      for h, lw in zip(hs, lws)],
            # "down" and "combine" are timed inside the same op
            "attention": lambda q=q, cache=cache, pos=pos: [attn_kernels.decode_attention(q, cache[i], pos, d.n_kv)
                                                            for i in range(L)],
            "small": lambda x=x: [linear_kernels.linear(x, lw.qkv, norm_w=lw.input_norm) for lw in lws],
            "wide": lambda xo=xo: [linear_kernels.linear(xo, lw.o) for lw in lws],
            "large": lambda x=x: [linear_kernels.linear(x, lm_head, True) for _ in range(L)],
        }
    out = {str(B): {} for B in batch_sizes}
    for name in names:
        base = "gate_up" if name in ("down", "combine") else name
        conf = CONFIGS[name]
        keep = dict(conf[name])
        configs = tune_grid(name, grid)
        times = []  # per config: {B: us} (None where it failed)
        for c in configs:
            conf[name] = dict(c)
            row = {}
            for B in batch_sizes:
                try:
                    row[B] = graph_ms(fns[B][base]) * 1e3 / L
                except Exception as e:  # a tile that does not compile or fit
                    row[B] = f"{type(e).__name__}: {str(e)[:80]}"
            times.append(row)
        ok = [i for i, row in enumerate(times) if all(isinstance(v, float) for v in row.values())]
        fastest = {B: min((times[i][B] for i in ok), default=None) for B in batch_sizes}
        if ok:
            score = ((lambda i: times[i][batch_sizes[0]]) if pick == "first"
                     else (lambda i: sum(times[i][B] / fastest[B] for B in batch_sizes)))
            chosen = min(ok, key=score)
            conf[name] = dict(configs[chosen])
        else:
            conf[name] = keep
        for B in batch_sizes:
            rows = [{**c, **({"us": t[B]} if isinstance(t[B], float) else {"error": t[B]})}
                    for c, t in zip(configs, times)]
            best = min(ok, key=lambda i: times[i][B]) if ok else None
            out[str(B)][name] = {"best": configs[best] if ok else None, "best_us": fastest[B],
                                 "kept": conf[name], "kept_us": times[chosen][B] if ok else None,
                                 "was": keep, "all": rows}
            log(f"tune B={B} {name}: fastest {out[str(B)][name]['best']} {fastest[B]}; "
                f"kept {conf[name]} {out[str(B)][name]['kept_us']}")
        if on_kernel:
            on_kernel(out)
    torch.cuda.empty_cache()
    return out


def kernel_table(step, n: int, device) -> list[dict]:
    """GPU kernels of `n` calls of `step`, aggregated by name (per step)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[ev.name]
            a[0] += 1
            a[1] += ev.device_time  # us
    rows = [{"kernel": k, "calls_per_step": c / n, "us_per_step": t / n} for k, (c, t) in agg.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


@torch.no_grad()
def main(argv=None) -> int:
    a = parse_args(argv)
    unknown = set(a.tune_kernels.split(",") if a.tune_kernels else []) - set(GRID)
    if unknown:
        raise SystemExit(f"error: --tune-kernels {sorted(unknown)} unknown; choose from {sorted(GRID)}")
    device = torch.device(a.device)
    log(f"building {a.config} on {device}")
    model = build_target(a.config, a.device, a.std)
    cfg = model.config
    res = {"config": a.config, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "runs": []}

    def save():
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))

    if a.tune:
        res["tune"] = tune(model, [int(x) for x in a.tune_batch_sizes.split(",")], a.ctx,
                           a.tune_kernels.split(",") if a.tune_kernels else list(GRID), a.tune_pick, a.tune_grid,
                           on_kernel=lambda out: (res.update(tune=out), save()))
        res["config"] = {"moe": moe_kernels.CONFIG, "attention": attn_kernels.CONFIG, "linear": linear_kernels.CONFIG}
        log(f"tuned: {res['config']}")
    if a.check:
        res["check"] = kernels_check(model, a, ["torch", "triton"], None)
        log(f"check: {res['check']}")
        head = build_head(model, a.device, a.std)
        for kernels in ("torch", "triton"):
            out = lossless_check(model, head, cfg, 8, 3, a, kernels, None)
            res["check"][f"lossless_{kernels}"] = out
            log(f"lossless {kernels}: {out['mismatching_rows']} of 8 rows differ")
    gen = torch.Generator().manual_seed(0)
    pdl_settings = ["off", "noprefetch", "on"] if a.pdl == "all" else [a.pdl]
    for mode, B, pdl in [(m, int(b), p) for m in a.modes.split(",") for b in a.batch_sizes.split(",")
                         for p in pdl_settings]:
        kind, kernels, experts = (mode.split(":") + ["", ""])[:3]
        moe_kernels.PDL.update(enabled=pdl != "off", prefetch=pdl == "on")
        prompts = torch.randint(0, cfg.vocab_size, (B, a.ctx), generator=gen).tolist()
        max_new = a.iters * 3 + a.profile_steps + 8
        tlm = TargetLM(model, experts=experts or None, compile=kind == "compiled", kernels=kernels or None)
        eng = Engine(tlm, None, batch_size=B, max_len=a.ctx + max_new + 4, max_new_tokens=max_new, steps=1)
        step = eng.start(prompts, speculative=False)
        ms = time_steps(step, a.iters, device)
        table = kernel_table(step, a.profile_steps, device)
        covered = sum(r["us_per_step"] for r in table)
        floor = hbm_floor_ms(cfg, B, 1, 4.3, ctx=a.ctx)
        log(f"{mode} B={B} pdl={pdl}: step {ms:.3f} ms ({B * 1e3 / ms:.0f} tok/s), "
            f"kernels {covered / 1e3:.3f} ms, "
            f"{sum(r['calls_per_step'] for r in table):.0f} launches, floor {floor:.3f} ms")
        print("| kernel | calls/step | us/step | share |\n|---|---:|---:|---:|")
        for r in table[: a.top]:
            print(f"| {r['kernel'][:90]} | {r['calls_per_step']:.0f} | {r['us_per_step']:.1f} | {r['us_per_step'] / (ms * 10):.1f}% |")
        print(f"| gaps (step - kernels) | | {ms * 1e3 - covered:.1f} | {(ms * 1e3 - covered) / (ms * 10):.1f}% |\n", flush=True)
        res["runs"].append({"mode": mode, "batch": B, "pdl": pdl, "step_ms": ms, "kernels_ms": covered / 1e3,
                            "floor_ms": floor, "kernels": table})
        del eng, step, tlm
        torch.cuda.empty_cache() if device.type == "cuda" else None
        save()  # after each run too
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
