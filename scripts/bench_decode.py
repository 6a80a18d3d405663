"""Decode-step benchmark of model/decode.py against transformers' generate() and the HBM floor.

    # one H200, Qwen3-30B-A3B shape, random bf16 weights built on the GPU; about 8 minutes
    python scripts/bench_decode.py --out docs/results/eval_speed.json
    # CPU smoke test of the same code path (torch kernels)
    python scripts/bench_decode.py --config tiny --device cpu --batch-sizes 1,2 --out /tmp/bench.json

Side by side, in one process, on the same model:
  ours    plain decode step; verify step (target forward over K+1 tokens + acceptance, K=1,3);
          full speculative step (K-1 head draft forwards + verify + draft extend), each one
          CUDA graph, with
            triton  the decode kernels (model/linear_kernels.py, attn_kernels.py,
                    moe_kernels.py; decode.py's default on CUDA), layers eager;
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402

from model import attn_kernels, linear_kernels, moe_kernels  # noqa: E402
from model.configs import NAMED, make_config  # noqa: E402
from model.decode import Engine, MTPDrafter, MTPHeadLM, TargetLM, capture_graph, verify_drafts  # noqa: E402
from model.head import MTPHead  # noqa: E402
from model.target import set_experts_implementation  # noqa: E402

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s] {msg}", flush=True)


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
    p.add_argument("--compile-ks", default="3",
                   help="K values measured with compiled layers (each K adds a compiled (B, K+1) shape)")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting stages after this")
    p.add_argument("--bandwidth-tbps", type=float, default=4.3, help="HBM bandwidth for the floor (H200: 4.8 peak, ~4.3 reachable)")
    p.add_argument("--std", type=float, default=0.02, help="std of the random weights")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- model
@torch.no_grad()
def build_target(name: str, device: str, std: float) -> Qwen3MoeForCausalLM:
    """Random weights allocated and initialised directly on `device` (bf16 on CUDA)."""
    cfg = make_config(name)
    set_experts_implementation(cfg, device)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        if p.ndim == 1:
            p.fill_(1.0)  # norms
        else:
            p.normal_(0.0, std, generator=gen)
    return model.eval()


@torch.no_grad()
def build_head(model, device: str, std: float) -> MTPHead:
    """A head initialised from the target's last layer (fc = [noise | I]), built on `device`."""
    with torch.device(device):
        head = MTPHead(model.config)
    head = head.to(next(model.parameters()).dtype).eval()
    head.layers[0].load_state_dict(model.model.layers[-1].state_dict())
    H = model.config.hidden_size
    head.fc.weight.normal_(0.0, std)
    head.fc.weight[:, H:].copy_(torch.eye(H, device=device))
    for norm in (head.pre_fc_norm_embedding, head.pre_fc_norm_hidden, head.norm):
        norm.weight.fill_(1.0)
    return head


def hbm_floor_ms(cfg, batch: int, tokens: int, tbps: float) -> float:
    """Weight bytes one forward over batch x tokens must read, over the bandwidth (module doc)."""
    b = 2  # bf16
    H, D, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    E, k, inter = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    attn = (2 * nq * D * H + 2 * nkv * D * H) * b
    norms = (2 * H + 2 * D) * b
    router = E * H * b
    hit = E * (1 - (1 - k / E) ** (batch * tokens))
    experts = hit * 3 * inter * H * b
    total = cfg.num_hidden_layers * (attn + norms + router + experts)
    total += cfg.vocab_size * H * b + batch * tokens * H * b + H * b  # lm_head, embedding rows, final norm
    return total / (tbps * 1e12) * 1e3


# ------------------------------------------------------------------------- timing
def time_steps(step, iters: int, device) -> float:
    """ms per call of `step`, back to back (GPU time via CUDA events on CUDA)."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t) * 1e3 / iters


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@torch.no_grad()
def bench_ours(model, head, cfg, B: int, ks: list[int], a, kernels: str, experts: str | None, compile_: bool) -> dict:
    """ms per plain decode step, verify step and speculative step at batch B."""
    device = torch.device(a.device)
    gen = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, cfg.vocab_size, (B, a.ctx), generator=gen).tolist()
    K_max = max(ks)
    max_new = (a.iters + 4) * (K_max + 1) + 1  # rows never finish while timed
    max_len = a.ctx + max_new + K_max + 1
    out = {"verify_ms": {}, "spec_ms": {}}
    t = time.perf_counter()
    tlm = TargetLM(model, experts=experts, compile=compile_, kernels=kernels)
    plain = Engine(tlm, None, batch_size=B, max_len=max_len, max_new_tokens=max_new, steps=K_max)
    step = plain.start(prompts, speculative=False)
    out["decode_ms"] = time_steps(step, a.iters, device)
    out["setup_s"] = time.perf_counter() - t
    for K in ks:  # the plain engine's cache holds the prompt; verify K+1 tokens after it
        toks = torch.randint(0, cfg.vocab_size, (B, K + 1), generator=gen).to(device)
        pos = (a.ctx + torch.arange(K + 1, device=device)).expand(B, K + 1)
        fn = lambda: verify_drafts(toks[:, 1:], None, tlm.logits(tlm.forward(toks, pos)), 0.0)  # noqa: E731
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
    out["total_s"] = time.perf_counter() - t
    del tlm
    free_memory()
    return out


@torch.no_grad()
def lossless_check(model, head, cfg, B: int, K: int, a, kernels: str, experts: str | None) -> dict:
    """T=0 speculative vs plain outputs of the same engine (mismatches are reported, not hidden)."""
    gen = torch.Generator().manual_seed(1000 + B)
    prompts = [torch.randint(0, cfg.vocab_size, (a.ctx,), generator=gen).tolist() for _ in range(B)]
    n = a.hf_tokens
    tlm = TargetLM(model, experts=experts, kernels=kernels)
    eng = Engine(tlm, MTPDrafter(MTPHeadLM(head, tlm, experts=experts, kernels=kernels)), batch_size=B,
                 max_len=a.ctx + n + K + 1, max_new_tokens=n, steps=K)
    spec, ref = eng.generate(prompts), eng.generate(prompts, speculative=False)
    mism = [i for i, (s, r) in enumerate(zip(spec.rows, ref.rows)) if s.output_ids != r.output_ids]
    first = [next(j for j, (x, y) in enumerate(zip(spec.rows[i].output_ids, ref.rows[i].output_ids)) if x != y)
             for i in mism]
    del eng, tlm
    free_memory()
    return {"batch": B, "K": K, "new_tokens": n, "mismatching_rows": len(mism), "first_mismatch_at": first,
            "plain_outputs": [r.output_ids for r in ref.rows]}


@torch.no_grad()
def kernels_check(model, a, kernel_sets: list[str], experts: str | None, batch_sizes=(1, 8)) -> dict:
    """Per kernels setting, after a shared prefill: logits of a 4-token verify step against
    transformers' forward on the same tokens (relative error), and whether the decode step of
    the first token gives bit-identical logits to the verify step's first position."""
    cfg, dev = model.config, torch.device(a.device)
    res = {}
    g = torch.Generator().manual_seed(5)

    def rel(x, y):
        return ((x.float() - y.float()).norm() / y.float().norm()).item()

    for B in batch_sizes:
        prompts = torch.randint(0, cfg.vocab_size, (B, a.ctx), generator=g).to(dev)
        nxt = torch.randint(0, cfg.vocab_size, (B, 4), generator=g).to(dev)
        pos = a.ctx + torch.arange(4, device=dev).expand(B, 4)
        hf = model(torch.cat([prompts, nxt], 1)).logits[:, a.ctx:].float()  # the reference
        for kernels in kernel_sets:
            tlm = TargetLM(model, experts=experts, kernels=kernels)
            tlm.allocate(B, a.ctx + 16)
            tlm.forward(prompts, torch.arange(a.ctx, device=dev).expand(B, -1), prefill=True)
            one = tlm.logits(tlm.forward(nxt[:, :1], pos[:, :1]))  # decode step (writes slot ctx)
            four = tlm.logits(tlm.forward(nxt, pos))  # verify step over the same first token
            res.setdefault(kernels, {})[str(B)] = {
                "verify_vs_hf_rel_err": rel(four, hf), "decode_vs_hf_rel_err": rel(one, hf[:, :1]),
                "decode_equals_verify": bool(torch.equal(one[:, 0], four[:, 0]))}
            del tlm
    free_memory()
    return res


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
    kernel_sets = (a.kernels or ("triton,torch" if cuda else "torch")).split(",")
    res = {
        "config": a.config, "device": str(device), "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "transformers": transformers.__version__, "triton": getattr(moe_kernels.triton, "__version__", None),
        "ctx": a.ctx, "iters": a.iters, "hf_tokens": a.hf_tokens, "kernels": kernel_sets,
        "torch_path_experts": a.experts or ("grouped_mm" if cuda else "loop"), "hbm_bandwidth_tbps": a.bandwidth_tbps,
        "kernel_config": {"moe": moe_kernels.CONFIG, "attention": attn_kernels.CONFIG, "linear": linear_kernels.CONFIG},
        "decode_tok_s": {}, "verify_step_ms": {}, "spec_step_ms": {},  # best mode per batch size
        "decode_tok_s_by_mode": {}, "decode_step_ms_by_mode": {}, "verify_step_ms_by_mode": {}, "spec_step_ms_by_mode": {},
        "hbm_floor_ms": {}, "hf_generate_tok_s": {}, "hf_generate_step_ms": {},
        "hf_static_compile_tok_s": {}, "hf_static_compile_first_call_s": {}, "setup_s": {},
        "kernels_check": None, "lossless_check": {}, "errors": {}, "skipped": [],
    }

    def left() -> float:
        return a.budget_s - (time.perf_counter() - T_START)

    def stage(name: str, need_s: float, fn):
        if left() < need_s:
            res["skipped"].append(f"{name} (needs ~{need_s:.0f}s, {left():.0f}s of the budget left)")
            log(f"skip {name}: budget")
            return None
        log(f"start {name} ({left():.0f}s of budget left)")
        try:
            out = fn()
            log(f"done  {name}")
            return out
        except Exception as e:  # a benchmark records a failing stage and goes on
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"
            free_memory()
            return None

    log(f"building {a.config} on {device}")
    model = build_target(a.config, a.device, a.std)
    cfg = model.config
    head = build_head(model, a.device, a.std)
    res["build_s"] = time.perf_counter() - T_START
    res["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    log(f"model ready: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
    for B in batch_sizes:
        res["hbm_floor_ms"].setdefault("decode", {})[str(B)] = hbm_floor_ms(cfg, B, 1, a.bandwidth_tbps)
        for K in ks:
            res["hbm_floor_ms"].setdefault(f"verify_K={K}", {})[str(B)] = hbm_floor_ms(cfg, B, K + 1, a.bandwidth_tbps)

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
        res["setup_s"].setdefault(mode, {})[str(B)] = out["setup_s"]
        log(f"  {mode} B={B}: decode {out['decode_ms']:.2f} ms ({B * 1e3 / out['decode_ms']:.0f} tok/s), "
            f"verify {({k: round(v, 2) for k, v in out['verify_ms'].items()})} ms, spec {({k: round(v, 2) for k, v in out['spec_ms'].items()})} ms")

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
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        log(f"wrote {a.out}")
    log("total")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
