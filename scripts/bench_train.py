"""Benchmark one MTP training step on one GPU: a naive step vs ours (old and new, online and offline).

    python scripts/bench_train.py --out docs/results/bench_train_h200.json     # one H200, about 3 min
    python scripts/bench_train.py --activation-checkpointing --out ...         # + rows with a checkpointed head
    python scripts/bench_train.py --compile-target --out ...                   # + a row with compiled target layers
    python scripts/bench_train.py --config tiny --device cpu --batch 2 --seq 64   # smoke test on a CPU

A Qwen3-30B-A3B-shaped target with random bf16 weights is built directly on the GPU (61 GB), then
each variant runs `--warmup` steps, then `--iters` steps with a sync after each (`tok/s` and the
breakdown: their median), then `--iters` more back to back with one sync at the end, as the trainer
runs them (`b2b tok/s`: their mean), at batch x seq tokens (default 4 x 2048), one after the other:

  naive    the plain transformers forward of the frozen target (272 ms measured before this project's work)
           with transformers' default experts implementation (printed), the MTP head, full fp32
           logits [B, T, V] and cross-entropy over all tokens (full-vocab KL for ce+kl), fused AdamW;
  online_old  ours before the fast paths: `train.train_mtp.loss_for_batch` with FrozenTarget.hidden on
           transformers' grouped_mm experts and model.loss's "checkpoint" vocabulary loss (chunks
           under activation checkpointing: the logits matmul runs again in backward), backward,
           grad clipping and the trainer's fused AdamW + scheduler (`build_optimizer`);
  online   ours now (the trainer's default): the same step with the lean experts forward of
           model/fast_moe.py in the target and the "fused" vocabulary loss (d loss / d h computed
           in the forward, two matmuls per chunk);
  online_lean  `online` with FrozenTarget.use_lean_layers(): the target runs model/qwen3_forward.py's
           decoder-layer forward (no KV cache), not transformers' layers;
  online_compiled  (--compile-target) `online` + FrozenTarget.compile_layers();
  online_compiled_all / offline_compiled  (--compile-head) `online_compiled` / `offline` with the
           head's step compiled too (MTPHead.compile_step, the trainer's head.compile=true);
  offline / offline_old  `online` / `online_old`'s loss with the hidden states given in the batch
           (data.hidden_states): no target forward; measured after the target's decoder layers are
           freed, so its peak memory is that of an offline run (embed_tokens + lm_head + head +
           optimizer + activations). The batch is on the GPU before the step starts, as the
           trainer's prefetcher (train/loop.py) copies the next batch during the current step.

The JSON summary has <variant>_tok_s, <variant>_steady_tok_s (back to back), peak_gib per variant
and <variant>_over_naive ratios.

for loss in ce, ce+kl and k in 1, 3. Every variant is checked against the naive step in the same
run: from the same initial head weights, its first step's loss and head gradients are compared with
the naive step's (relative loss difference, relative L2 error and cosine of the gradients; the naive
step scores the same positions, so the objectives are equal and only bf16 rounding differs).
No DeepSpeed: the head keeps fp32 weights and runs under
bf16 autocast (accelerate's single-GPU mixed precision). Breakdown per step from CUDA events:
target forward, head forward+backward including the loss, optimizer (clip + AdamW + zero_grad).
The FLOP floor counts 2 x active params x tokens (+ causal attention) for the target forward,
3x that for the head's forward+backward per step, and 4 x H x V per scored token per step for the
lm_head (forward + input gradient; + 2 x H x V once for ce+kl's target distribution), at
`--peak-tflops` (801 = bf16 matmul measured on the H200). The naive step, the gradient check, the
timed loop and the floor are model/train_bench.py's; the trainer's own step is built here.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import torch

from model.configs import NAMED
from model.fast_moe import use_head_experts
from model.shared_weights import SharedTarget
from model.target import FrozenTarget, avoid_cudnn_attention, default_dtype
from model.train_bench import (GradCheck, Marks, as_prefetched, autocast, build_head, build_target, floor_flops, free,
                               make_batch, naive_loss, naive_step, peak_gib, run_variant, set_checkpointing, sync)
from train.config import config_from_dict
from train.loop import loss_for_batch
from train.timeline import profile_gpu
from train.train_mtp import build_optimizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen3-30b-a3b", choices=sorted(NAMED))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--layers", type=int, default=None, help="target decoder layers (default: the config's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--losses", default="ce,ce+kl")
    p.add_argument("--steps", default="1,3", help="k values (head.num_steps)")
    p.add_argument("--chunk-size", type=int, default=4096, help="head.loss_chunk_size")
    p.add_argument("--mask-frac", type=float, default=1.0, help="fraction of tokens with loss_mask=1 (naive scores all)")
    p.add_argument("--activation-checkpointing", action="store_true", help="also time our head with a checkpointed decoder layer")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--skip-old", action="store_true", help="skip online_old and offline_old")
    p.add_argument("--compile-target", action="store_true", help="also time online with compiled target layers")
    p.add_argument("--compile-head", action="store_true",
                   help="also time online_compiled_all (target and head compiled) and offline_compiled (head compiled)")
    p.add_argument("--profile", nargs="?", const="online", default="",
                   help="comma-separated variants whose ce k=1 step is profiled (torch.profiler's CUDA kernels, "
                        "largest first, and the GPU's idle gaps); the flag alone profiles `online`")
    p.add_argument("--trace-dir", default=None, help="also write each profiled step's chrome trace here (<variant>.json.gz)")
    p.add_argument("--peak-tflops", type=float, default=801.0)
    p.add_argument("--out", default=None, help="write the results as JSON")
    return p.parse_args(argv)


def our_loss(cfg, target, head, batch, device, vocab_impl: str = "fused") -> torch.Tensor:
    with autocast(device):
        out, _ = loss_for_batch(cfg, target, head, batch, device, vocab_impl=vocab_impl)
    return out.loss


def our_step(cfg, target, head, optimizer, scheduler, batch, device, marks: Marks, vocab_impl: str = "fused") -> None:
    """The trainer's own step: loss_for_batch (target.hidden or batch["hidden"], mtp_loss), backward,
    clipping, AdamW + scheduler. target.hidden is timed through an instance wrapper."""
    our_loss(cfg, target, head, batch, device, vocab_impl).backward()
    marks("backward_end")
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.train.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def timed_hidden(target, marks_ref: list):
    """target.hidden with time marks, run outside autocast as in the trainer (accelerate's autocast
    wraps only the head's forward)."""
    orig = type(target).hidden.__get__(target)

    def hidden(*args, **kwargs):
        marks_ref[0]("target_start")
        with torch.autocast("cuda", enabled=False):
            h = orig(*args, **kwargs)
        marks_ref[0]("target_end")
        return h

    return hidden


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no GPU visible; use --device cpu for a smoke test")
    dtype = default_dtype(device)
    avoid_cudnn_attention()  # the trainer's attention kernels (flash, not cuDNN)
    losses = args.losses.split(",")
    ks = [int(k) for k in args.steps.split(",")]
    B, T = args.batch, args.seq
    t_start = time.perf_counter()

    target, naive_impl = build_target(args.config, device, dtype, args.layers)
    ours_impl = "grouped_mm" if device.type == "cuda" else "eager"  # transformers' experts for online_old
    cfg_t = target.config
    sync(device)
    print(f"target {args.config}: {sum(p.numel() for p in target.parameters()) / 1e9:.2f}B params, {dtype}, "
          f"built in {time.perf_counter() - t_start:.0f} s; experts: naive={naive_impl} (transformers default), online_old={ours_impl}, online=model/fast_moe.py")
    batch = make_batch(cfg_t.vocab_size, B, T, args.mask_frac)
    n_scored = int(batch["loss_mask"][:, 2:].sum())
    marks_ref = [Marks(device)]
    results = []

    profiles = set(filter(None, args.profile.split(","))) if device.type == "cuda" else set()

    def record(variant, loss, k, med, ac=False):
        online = not variant.startswith("offline")
        flops = floor_flops(cfg_t, B, T, k, loss, B * (T - 2) if variant == "naive" else n_scored, online)
        floor_s = flops / (args.peak_tflops * 1e12)
        row = {"variant": variant + ("+ac" if ac else ""), "loss": loss, "k": k, **med}
        if med.get("step_ms"):
            row.update(tok_s=B * T / (med["step_ms"] / 1e3), floor_tok_s=B * T / floor_s,
                       floor_frac=floor_s / (med["step_ms"] / 1e3), steady_tok_s=B * T / (med["steady_step_ms"] / 1e3))
        results.append(row)
        print(fmt_row(row), flush=True)

    print(header())
    cfg_t._experts_implementation = naive_impl
    naive_head = build_head(cfg_t, device)
    use_head_experts(naive_head.layers[0], False)  # naive: transformers' experts in the head too
    check = GradCheck(naive_head)
    if not args.skip_naive:
        for loss in losses:
            for k in ks:
                check.record_naive((loss, k), naive_head, functools.partial(
                    naive_loss, target, naive_head, batch, device, k, loss, Marks(device)))
                opt = torch.optim.AdamW(naive_head.parameters(), lr=1e-4, fused=device.type == "cuda")
                step = functools.partial(naive_step, target, naive_head, opt, batch, device, k, loss)
                med = guarded(run_variant, step, device, args.warmup, args.iters, marks_ref)
                record("naive", loss, k, {**med, "loss_first": check.ref[(loss, k)][0]})
                del opt, step
                check.restore(naive_head)
    cfg_t._experts_implementation = ours_impl  # read at call time by every expert block of the target
    head = naive_head if naive_impl == ours_impl else build_head(cfg_t, device)
    del naive_head
    check.restore(head)

    def ours(variant, tgt, b, loss, k, ac):
        old = variant.endswith("_old")
        if isinstance(tgt, FrozenTarget):
            tgt.use_lean_experts(not old)
            tgt.use_lean_layers(variant.startswith("online_lean"), compile=variant == "online_lean_compiled")
        set_checkpointing(head, ac)
        use_head_experts(head.layers[0], not old)  # ours: grouped GEMMs in bf16 (model/fast_moe.py)
        head.compile_step(variant in ("online_compiled_all", "offline_compiled"))
        cfg = config_from_dict({"head": {"num_steps": k, "loss": loss, "loss_chunk_size": args.chunk_size},
                                "train": {"lr": 1e-4, "warmup_steps": 0, "max_steps": 10**6}})
        impl = "checkpoint" if old else "compiled" if variant in ("online_compiled_all", "offline_compiled") else "fused"
        # the same first step as naive's (and the compile, if any, before the timed steps)
        checked = check.compare((loss, k), head, functools.partial(our_loss, cfg, tgt, head, b, device, impl))
        optimizer, scheduler = build_optimizer(cfg, head, device)
        step = functools.partial(our_step, cfg, tgt, head, optimizer, scheduler, b, device, vocab_impl=impl)
        record(variant, loss, k, {**guarded(run_variant, step, device, args.warmup, args.iters, marks_ref), **checked}, ac)
        if variant in profiles and loss == "ce" and k == 1 and not ac:
            try:  # a profiler failure costs the profile, not the benchmark
                def one():
                    marks_ref[0] = Marks(device)
                    step(marks_ref[0])
                print(f"# profile of one {variant} step")
                print(profile_gpu(one, variant, trace_dir=args.trace_dir), flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"# profile of {variant} failed: {type(exc).__name__}: {exc}")
        del optimizer, scheduler, step
        check.restore(head)
        head.compile_step(False)

    target.hidden = timed_hidden(target, marks_ref)  # instance attribute: loss_for_batch's call is timed
    online_batch = as_prefetched(batch, device)
    online_variants = ["online", "online_lean"] if args.skip_old else ["online_old", "online", "online_lean"]
    for ac in [False, True] if args.activation_checkpointing else [False]:
        for loss in losses:
            for k in ks:
                for variant in online_variants:
                    ours(variant, target, online_batch, loss, k, ac)
    if args.compile_target:  # opt-in and untested off a GPU: a failure is reported, not fatal
        target.use_lean_experts(True)
        t0 = time.perf_counter()
        try:
            target.compile_layers()
            for loss in losses:
                for k in ks:
                    ours("online_compiled", target, online_batch, loss, k, False)
                    if args.compile_head:
                        ours("online_compiled_all", target, online_batch, loss, k, False)
        except Exception as exc:  # noqa: BLE001 - keep the rest of the benchmark
            print(f"# online_compiled failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        finally:
            target.compile_layers(enable=False)
        print(f"# online_compiled: {time.perf_counter() - t0:.0f} s including compilation")
        t0 = time.perf_counter()
        try:  # model/qwen3_forward.py's layer function (the lean layers) compiled
            for loss in losses:
                for k in ks:
                    ours("online_lean_compiled", target, online_batch, loss, k, False)
        except Exception as exc:  # noqa: BLE001
            print(f"# online_lean_compiled failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        print(f"# online_lean_compiled: {time.perf_counter() - t0:.0f} s including compilation")

    # offline: hidden states given; the target's decoder layers are freed first, as an offline run never loads them
    target.use_lean_experts(True)
    target.use_lean_layers(False)
    with torch.no_grad():
        hidden = FrozenTarget.hidden(target, batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu()
    # on the device already, as the trainer's prefetcher (train/loop.py) delivers it: the copy of the
    # next batch overlaps the current step
    offline_batch = as_prefetched({**batch, "hidden": hidden}, device)
    light = SharedTarget(cfg_t, target.embed_tokens, target.lm_head)
    del target
    free(device)
    if device.type == "cuda":
        print(f"# offline: {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB resident after freeing the target's layers")
    offline_variants = ["offline"] if args.skip_old else ["offline_old", "offline"]
    if args.compile_head:
        offline_variants.append("offline_compiled")
    for ac in [False, True] if args.activation_checkpointing else [False]:
        for loss in losses:
            for k in ks:
                for variant in offline_variants:
                    ours(variant, light, offline_batch, loss, k, ac)

    summary = summarize(results)

    def ratio(x):
        return f"{x:.2f}" if x is not None else "-"

    print(f"\n{'loss/k':10s} {'naive tok/s':>12s} {'old online':>11s} {'online tok/s':>13s} {'online lean':>12s} "
          f"{'old offline':>12s} {'offline tok/s':>14s} {'old/naive':>10s} {'online/naive':>13s} {'lean/naive':>11s}")
    for key, s in summary.items():
        print(f"{key:10s} {s.get('naive_tok_s') or 0:12,.0f} {s.get('online_old_tok_s') or 0:11,.0f} "
              f"{s.get('online_tok_s') or 0:13,.0f} {s.get('online_lean_tok_s') or 0:12,.0f} "
              f"{s.get('offline_old_tok_s') or 0:12,.0f} {s.get('offline_tok_s') or 0:14,.0f} "
              f"{ratio(s.get('online_old_over_naive')):>10s} {ratio(s.get('online_over_naive')):>13s} "
              f"{ratio(s.get('online_lean_over_naive')):>11s}")
    wall = time.perf_counter() - t_start
    print(f"total {wall:.0f} s")
    if args.out:
        import transformers

        report = {
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "config": args.config, "layers": cfg_t.num_hidden_layers, "batch": B, "seq": T, "tokens_per_step": B * T, "mask_frac": args.mask_frac,
            "loss_chunk_size": args.chunk_size, "peak_tflops": args.peak_tflops, "warmup": args.warmup, "iters": args.iters,
            "experts_implementation": {"naive": naive_impl, "ours": "fast_moe", "online_old": ours_impl,
                                       "online_lean": "qwen3_forward.py layers + fast_moe"},
            "vocab_loss": {"online": "fused", "offline": "fused", "online_old": "checkpoint", "offline_old": "checkpoint"},
            "precision": "target bf16; head fp32 weights under bf16 autocast; fused AdamW" if device.type == "cuda" else "fp32",
            "wall_s": wall, "results": results, "summary": summary,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


def guarded(fn, step, device, warmup, iters, marks_ref) -> dict:
    """A variant that runs out of GPU memory is reported as such, and the benchmark goes on."""
    try:
        return fn(step, device, warmup, iters, marks_ref)
    except torch.cuda.OutOfMemoryError as exc:
        print(f"# out of memory: {str(exc).splitlines()[0]}")
        return {"oom": True, "peak_gib": peak_gib(device)}
    finally:
        free(device)


def summarize(results: list[dict]) -> dict:
    """{"ce/k=1": {naive_tok_s, online_tok_s, offline_tok_s, peak_gib: {naive, online, offline}}, ...}"""
    out: dict[str, dict] = {}
    for r in results:
        s = out.setdefault(f"{r['loss']}/k={r['k']}", {"peak_gib": {}})
        v = r["variant"].replace("+ac", "_ac")
        s[f"{v}_tok_s"], s[f"{v}_steady_tok_s"] = r.get("tok_s"), r.get("steady_tok_s")
        s["peak_gib"][v] = r.get("peak_gib")
        s.setdefault("grad_rel_err", {})[v] = r.get("grad_rel_err")
        if v == "online":
            s["floor_tok_s"] = r.get("floor_tok_s")
    for s in out.values():
        for v in ("online", "online_old", "online_lean", "online_compiled", "online_lean_compiled",
                  "online_compiled_all", "offline", "offline_compiled"):
            ok = s.get(f"{v}_tok_s") and s.get("naive_tok_s")
            if f"{v}_tok_s" in s:
                s[f"{v}_over_naive"] = s[f"{v}_tok_s"] / s["naive_tok_s"] if ok else None
    return out


def header() -> str:
    return (f"{'variant':16s} {'loss':6s} {'k':>2s} {'step ms':>8s} {'target':>8s} {'head':>8s} {'optim':>7s} "
            f"{'tok/s':>9s} {'b2b tok/s':>9s} {'floor tok/s':>11s} {'of floor':>8s} {'peak GiB':>8s} {'loss diff':>9s} {'grad err':>8s} {'grad cos':>8s}")


def fmt_row(r: dict) -> str:
    if r.get("oom"):
        return f"{r['variant']:16s} {r['loss']:6s} {r['k']:2d}  out of memory"
    peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"

    def opt(key, spec):
        return "-" if r.get(key) is None else format(r[key], spec)

    return (f"{r['variant']:16s} {r['loss']:6s} {r['k']:2d} {r['step_ms']:8.1f} {r['target_ms']:8.1f} {r['head_ms']:8.1f} "
            f"{r['optimizer_ms']:7.1f} {r['tok_s']:9,.0f} {r['steady_tok_s']:9,.0f} {r['floor_tok_s']:11,.0f} {r['floor_frac']:8.1%} {peak:>8s} "
            f"{opt('loss_rel_diff', '9.1e')} {opt('grad_rel_err', '8.1e')} {opt('grad_cosine', '8.5f')}")


if __name__ == "__main__":
    sys.exit(main())
