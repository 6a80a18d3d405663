"""The MoE block of a decode-sized step in Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    h, hn, ids, wts = router(x_NH, attn_NH, post_norm_w, router_EH, eps, top_k, norm_topk)
        # h = x + attn, hn = norm(h), the top-k expert ids [N, k] and routing weights [N, k]
    out_NH = experts(hn, ids, wts, h, gate_up_E2IH, down_EHI)      # h + MoE(hn)

Why: profiled on an H200 (scripts/profile_decode.py, Qwen3-30B-A3B shape), the compiled torch MoE
block of one decode layer is six kernels at batch 1: residual add + RMSNorm, the router GEMV
(5 us for 0.5 MB: two CTAs stream it), torch.topk's two kernels (9 us), and the experts with the
weighted sum of the k slots and the residual add; the grouped-GEMM path adds a sort, offsets,
gathers and an un-permute around its two GEMMs. Here:

  router   grid (N, E / BLOCK_E): h = x + attn (rounded like torch's bf16 add), hn = RMSNorm(h)
           (fp32 statistics, scaled before the cast, as F.rms_norm) and BLOCK_E router logits
           (rounded like F.linear). Every program computes h and hn; the first of a token
           writes them.
  route    grid (N): the token's top-k experts (k rounds of max over E, ties to the lower id)
           and routing weights (softmax over the k logits, or exp(l - logsumexp over all E)
           without norm_topk), fp32. (Routing inside the router kernel, by the last of a
           token's programs to finish, measured 2 us a layer slower than this launch.)
  gate_up  work items (u, block of BLOCK_I rows of I): the u-th smallest expert id that any
           (token, slot) pair uses (a histogram of the ids, no sort); the item finds the tokens
           routed to it and computes act = silu(hn W_gate^T) * (hn W_up^T) for them with
           tl.dot over BLOCK_N = 64 tokens at a time. Each used expert's weights are read once
           per step, however many tokens chose it (at batch 8 ~52 distinct experts serve 64
           pairs). A persistent grid (CONFIG per_sm programs an SM) walks the items of the
           step's distinct experts; per_sm = 0 gives an item its own program.
  down     the same over blocks of H: y[pair] = w_pair * (act W_down^T), fp32.
  combine  grid (N, H / BLOCK): out = h + sum of the k slots' y (fixed slot order), rounded.
Memory bound; fp32 accumulation; no atomics, no host syncs, shapes fixed by the inputs:
CUDA-graph safe and deterministic. Tiles do not depend on N, so a token's result depends on its
own inputs only: a verify step computes the same numbers as plain decoding of the same token.
MAX_TOKENS bounds the tokens of a step (the engine uses grouped GEMMs above it). All are torch
custom ops, opaque to torch.compile (fullgraph works).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine keeps its torch paths
    triton = tl = None
pdl_enter = None  # a Triton function where triton is installed (below)

MAX_TOKENS = 64  # model/engine.py: steps of more tokens use grouped GEMMs
# tokens per tl.dot in the expert kernels, fixed so that results do not depend on N. At 16, a
# 64-token verify step (batch 16, K = 3) streamed each expert 4 times: 37 ms against 16 ms at 64
# (H200); a batch-1 decode step costs 3% more at 64 (docs/BENCHMARKS.md)
BLOCK_N = 64
# tile sizes: the fastest at batch 1 of `scripts/profile_decode.py --tune` on an H200 (Qwen3-30B-A3B
# shape); at batch 8 they are within 2% of that batch's fastest. per_sm (`programs`): the expert
# kernels' persistent grid, best over batch 1, 8 and 16 (`--tune-pick sum`): the MoE op 1.4% / 2.6%
# faster at batch 8 / 16 than with one program an item, the same at batch 1 (docs/BENCHMARKS.md)
CONFIG = {
    "router": {"BLOCK_E": 2, "BLOCK_IN": 1024, "num_warps": 4},  # with route: 2 us + 3 us a layer
    "gate_up": {"BLOCK_I": 64, "BLOCK_IN": 128, "num_warps": 4, "num_stages": 4, "per_sm": 2},
    "down": {"BLOCK_H": 64, "BLOCK_IN": 128, "num_warps": 4, "num_stages": 3, "per_sm": 2},
    "combine": {"BLOCK": 256, "num_warps": 4},
}


# Programmatic dependent launch (Hopper and newer): every decode kernel here and in
# model/attn_kernels.py and model/linear_kernels.py is launched so that the GPU may schedule it
# while the kernel before it finishes. Each one first waits for the previous kernel's writes
# (gdc_wait; it reads and writes nothing an earlier kernel wrote before that, so a later kernel can
# never overtake an earlier one), then lets the next one be scheduled. On an H200 (Qwen3-30B-A3B
# shape) a batch-1 decode step went from 3.07 to 2.82 ms (docs/BENCHMARKS.md). "prefetch" also
# loads the linear kernel's first weight tile before its wait (weights are never written); it
# measured slower (2.88 ms) and stays off. Off: MTP_DECODE_PDL=0, or PDL["enabled"] = False
# (scripts/profile_decode.py --pdl off|noprefetch|on|all).
def _pdl_from_env(value: str | None) -> bool:
    """MTP_DECODE_PDL: unset, 1/on/true (the default) or 0/off/false."""
    v = (value or "1").strip().lower()
    if v not in ("0", "1", "on", "off", "true", "false"):
        raise ValueError(f"MTP_DECODE_PDL={value!r}: use 1 (programmatic dependent launch, the default) or 0 (off)")
    return v in ("1", "on", "true")


PDL = {"enabled": _pdl_from_env(os.environ.get("MTP_DECODE_PDL")), "prefetch": False}


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    """A GPU with PDL (compute capability 9+) and a Triton that can ask for it (3.3 and newer)."""
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(cuda, "gdc_wait")


def pdl_args(t: torch.Tensor) -> dict:
    """Launch arguments of a decode kernel for tensors on t's device: PDL where the GPU has it."""
    on = PDL["enabled"] and t.is_cuda and _pdl_capable(t.device.index if t.device.index is not None
                                                          else torch.cuda.current_device())
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


_TICKETS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # smaller counter buffers: graphs captured with them still use them


def split_tickets(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters for kernels whose last program of a group combines the group's
    partial results (model/attn_kernels.py's cache splits, model/linear_kernels.py's K splits):
    one per group, kept between calls, every kernel leaves its counters at zero, so the kernels
    share them. Grown before a CUDA graph is captured (capture follows warm-up calls of the same
    shapes); an outgrown buffer is kept alive for the graphs that hold its address."""
    t = _TICKETS.get(device)
    if t is None or t.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split counters first needed inside a CUDA graph capture; run the step once "
                               "before capturing it")
        if t is not None:
            _OUTGROWN.append(t)
        t = _TICKETS[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return t


def available(device) -> bool:
    """Triton importable and able to run on `device` (CUDA, or the CPU interpreter)."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def pdl_enter(USE_PDL: tl.constexpr):
        """Wait for the kernel before this one (its writes visible), then let the next be scheduled."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _route(logit_ptr, E: tl.constexpr, E_POW2: tl.constexpr, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
               NORM_TOPK: tl.constexpr):
        """(expert ids [K_POW2], routing weights [K_POW2] fp32) of one token, slot order =
        descending logit, ties to the lower id; entries past TOP_K are padding."""
        es = tl.arange(0, E_POW2)
        logits = tl.load(logit_ptr + es, mask=es < E, other=float("-inf")).to(tl.float32)
        ks = tl.arange(0, K_POW2)
        ids = tl.zeros([K_POW2], tl.int32)
        tops = tl.full([K_POW2], float("-inf"), tl.float32)
        work = logits
        for j in tl.static_range(TOP_K):
            m = tl.max(work, axis=0)
            i = tl.minimum(tl.min(tl.where(work == m, es, E_POW2), axis=0), E - 1)
            ids = tl.where(ks == j, i, ids)
            tops = tl.where(ks == j, m, tops)
            work = tl.where(es == i, float("-inf"), work)
        top_max = tl.max(tops, axis=0)
        if NORM_TOPK:  # softmax over the k selected logits
            ex = tl.exp(tops - top_max)
            weights = ex / tl.sum(ex, axis=0)
        else:  # the full softmax's probabilities
            lse = tl.log(tl.sum(tl.exp(logits - top_max), axis=0)) + top_max
            weights = tl.exp(tops - lse)
        return ids, weights

    @triton.jit
    def _router_kernel(x_ptr, a_ptr, nw_ptr, rw_ptr, h_ptr, hn_ptr, logit_ptr, eps,
                       H: tl.constexpr, E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_IN: tl.constexpr,
                       USE_PDL: tl.constexpr):
        pdl_enter(USE_PDL)
        n = tl.program_id(0).to(tl.int64)
        eb = tl.program_id(1)
        dt = x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_IN)
        ss = tl.zeros([BLOCK_IN], tl.float32)
        for c0 in range(0, H, BLOCK_IN):
            c = c0 + cols
            h = (tl.load(x_ptr + n * H + c, mask=c < H, other=0.0).to(tl.float32)
                 + tl.load(a_ptr + n * H + c, mask=c < H, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
            ss += h * h
        r = tl.rsqrt(tl.sum(ss, axis=0) / H + eps)
        rows = eb * BLOCK_E + tl.arange(0, BLOCK_E)
        row_ok = rows < E
        acc = tl.zeros([BLOCK_E, BLOCK_IN], tl.float32)
        for c0 in range(0, H, BLOCK_IN):
            c = c0 + cols
            c_ok = c < H
            h = (tl.load(x_ptr + n * H + c, mask=c_ok, other=0.0).to(tl.float32)
                 + tl.load(a_ptr + n * H + c, mask=c_ok, other=0.0).to(tl.float32)).to(dt)
            hn = (h.to(tl.float32) * r * tl.load(nw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)).to(dt)
            if eb == 0:
                tl.store(h_ptr + n * H + c, h, mask=c_ok)
                tl.store(hn_ptr + n * H + c, hn, mask=c_ok)
            w = tl.load(rw_ptr + rows[:, None].to(tl.int64) * H + c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
            acc += w * hn.to(tl.float32)[None, :]
        tl.store(logit_ptr + n * E + rows, tl.sum(acc, axis=1).to(logit_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _route_kernel(logit_ptr, ids_ptr, wts_ptr, E: tl.constexpr, E_POW2: tl.constexpr, TOP_K: tl.constexpr,
                      K_POW2: tl.constexpr, NORM_TOPK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_enter(USE_PDL)
        n = tl.program_id(0)
        ids, weights = _route(logit_ptr + n * E, E, E_POW2, TOP_K, K_POW2, NORM_TOPK)
        ks = tl.arange(0, K_POW2)
        tl.store(ids_ptr + n * TOP_K + ks, ids, mask=ks < TOP_K)
        tl.store(wts_ptr + n * TOP_K + ks, weights, mask=ks < TOP_K)

    @triton.jit
    def _experts_used(ids_ptr, P, E_POW2: tl.constexpr, P_POW2: tl.constexpr):
        """Which expert ids the P routed pairs use (a histogram, no sort), each used id's rank
        among them (1-based), and how many distinct ids there are."""
        ps = tl.arange(0, P_POW2)
        ids = tl.load(ids_ptr + ps, mask=ps < P, other=0)
        used = tl.histogram(ids, E_POW2, mask=ps < P) > 0
        return used, tl.cumsum(used.to(tl.int32), axis=0), tl.sum(used.to(tl.int32), axis=0)

    @triton.jit
    def _nth_expert(used, rank, u, E_POW2: tl.constexpr):
        """The u-th smallest used expert id (u from 0)."""
        return tl.sum(tl.where(used & (rank == u + 1), tl.arange(0, E_POW2), 0), axis=0).to(tl.int64)

    @triton.jit
    def _tokens_of(ids_ptr, e, g0, N, TOP_K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_N: tl.constexpr):
        """Tokens g0 .. g0+BLOCK_N-1: routed to expert e or not, and their pair index (token, slot)."""
        ns = g0 + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, K_POW2)
        ids = tl.load(ids_ptr + ns[:, None] * TOP_K + ks[None, :], mask=(ns < N)[:, None] & (ks < TOP_K)[None, :],
                      other=-1)
        hit = ids == e
        active = tl.max(hit.to(tl.int32), axis=1) > 0
        slot = tl.sum(tl.where(hit, ks[None, :], 0), axis=1)
        return active, ns * TOP_K + slot

    @triton.jit
    def _gate_up_kernel(x_ptr, ids_ptr, w_ptr, act_ptr, stride_we, stride_wr, N,
                        H: tl.constexpr, I: tl.constexpr, E_POW2: tl.constexpr, P_POW2: tl.constexpr,
                        TOP_K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_IN: tl.constexpr, NB: tl.constexpr, FLATTEN: tl.constexpr,
                        USE_PDL: tl.constexpr):
        pdl_enter(USE_PDL)
        used, rank, count = _experts_used(ids_ptr, N * TOP_K, E_POW2, P_POW2)
        cols = tl.arange(0, BLOCK_IN)
        # work items (u-th used expert, block of BLOCK_I rows), u-major; a program takes every
        # num_programs-th, so a persistent grid streams several back to back
        for item in tl.range(tl.program_id(0), count * NB, tl.num_programs(0), flatten=FLATTEN):
            e = _nth_expert(used, rank, item // NB, E_POW2)
            rows = (item % NB) * BLOCK_I + tl.arange(0, BLOCK_I)  # rows of gate (and of up at +I)
            row_ok = rows < I
            gate_ptrs = w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wr
            up_ptrs = gate_ptrs + I * stride_wr
            for gi in tl.static_range(GROUPS):  # tokens in groups of BLOCK_N
                g0 = gi * BLOCK_N
                active, pair = _tokens_of(ids_ptr, e, g0, N, TOP_K, K_POW2, BLOCK_N)
                tok = g0 + tl.arange(0, BLOCK_N)
                acc_g = tl.zeros([BLOCK_I, BLOCK_N], dtype=tl.float32)
                acc_u = tl.zeros([BLOCK_I, BLOCK_N], dtype=tl.float32)
                for h0 in range(0, H, BLOCK_IN):
                    c = h0 + cols
                    c_ok = c < H
                    xt = tl.load(x_ptr + tok[None, :] * H + c[:, None], mask=active[None, :] & c_ok[:, None], other=0.0)
                    m = row_ok[:, None] & c_ok[None, :]
                    acc_g = tl.dot(tl.load(gate_ptrs + c[None, :], mask=m, other=0.0), xt, acc_g)
                    acc_u = tl.dot(tl.load(up_ptrs + c[None, :], mask=m, other=0.0), xt, acc_u)
                act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
                tl.store(act_ptr + pair[None, :] * I + rows[:, None], act.to(act_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & active[None, :])

    @triton.jit
    def _down_kernel(act_ptr, ids_ptr, wts_ptr, w_ptr, y_ptr, stride_we, stride_wr, N,
                     H: tl.constexpr, I: tl.constexpr, E_POW2: tl.constexpr, P_POW2: tl.constexpr,
                     TOP_K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_IN: tl.constexpr, NB: tl.constexpr, FLATTEN: tl.constexpr,
                     USE_PDL: tl.constexpr):
        pdl_enter(USE_PDL)
        used, rank, count = _experts_used(ids_ptr, N * TOP_K, E_POW2, P_POW2)
        cols = tl.arange(0, BLOCK_IN)
        for item in tl.range(tl.program_id(0), count * NB, tl.num_programs(0), flatten=FLATTEN):
            e = _nth_expert(used, rank, item // NB, E_POW2)
            rows = (item % NB) * BLOCK_H + tl.arange(0, BLOCK_H)  # output features
            row_ok = rows < H
            w_ptrs = w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wr
            for gi in tl.static_range(GROUPS):  # tokens in groups of BLOCK_N
                g0 = gi * BLOCK_N
                active, pair = _tokens_of(ids_ptr, e, g0, N, TOP_K, K_POW2, BLOCK_N)
                acc = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
                for i0 in range(0, I, BLOCK_IN):
                    c = i0 + cols
                    c_ok = c < I
                    at = tl.load(act_ptr + pair[None, :] * I + c[:, None], mask=active[None, :] & c_ok[:, None], other=0.0)
                    w = tl.load(w_ptrs + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                    acc = tl.dot(w, at, acc)
                wt = tl.load(wts_ptr + pair, mask=active, other=0.0)
                tl.store(y_ptr + pair[None, :] * H + rows[:, None], acc * wt[None, :], mask=row_ok[:, None] & active[None, :])

    @triton.jit
    def _combine_kernel(y_ptr, res_ptr, out_ptr, H: tl.constexpr, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                        USE_PDL: tl.constexpr):
        pdl_enter(USE_PDL)
        n = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        c_ok = c < H
        s = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(TOP_K):  # slots in a fixed order
            s += tl.load(y_ptr + (n * TOP_K + j) * H + c, mask=c_ok, other=0.0)
        dt = out_ptr.dtype.element_ty
        res = tl.load(res_ptr + n * H + c, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * H + c, (res + s.to(dt).to(tl.float32)).to(dt), mask=c_ok)


@torch.library.custom_op("mtp_decode::moe_router", mutates_args=())
def router(x_NH: torch.Tensor, attn_NH: torch.Tensor, norm_w: torch.Tensor, router_w: torch.Tensor,
           eps: float, top_k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, hn, ids, weights): h = x + attn, hn = RMSNorm(h) * norm_w, and the top-k experts
    [N, k] int32 and routing weights [N, k] fp32 of the router logits hn router_w^T."""
    N, H = x_NH.shape
    E = router_w.shape[0]
    x_NH, attn_NH = x_NH.contiguous(), attn_NH.contiguous()
    assert router_w.is_contiguous() and norm_w.is_contiguous()
    dev = x_NH.device
    h, hn = torch.empty_like(x_NH), torch.empty_like(x_NH)
    logits = torch.empty(N, E, dtype=x_NH.dtype, device=dev)
    ids = torch.empty(N, top_k, dtype=torch.int32, device=dev)
    wts = torch.empty(N, top_k, dtype=torch.float32, device=dev)
    cfg, pdl = CONFIG["router"], pdl_args(x_NH)
    _router_kernel[(N, triton.cdiv(E, cfg["BLOCK_E"]))](
        x_NH, attn_NH, norm_w, router_w, h, hn, logits, eps, H=H, E=E, BLOCK_E=cfg["BLOCK_E"],
        BLOCK_IN=cfg["BLOCK_IN"], num_warps=cfg["num_warps"], **pdl)
    _route_kernel[(N,)](logits, ids, wts, E=E, E_POW2=triton.next_power_of_2(E), TOP_K=top_k,
                        K_POW2=triton.next_power_of_2(top_k), NORM_TOPK=norm_topk, num_warps=1, **pdl)
    return h, hn, ids, wts


@router.register_fake
def _(x_NH, attn_NH, norm_w, router_w, eps, top_k, norm_topk):
    N = x_NH.shape[0]
    return (torch.empty_like(x_NH), torch.empty_like(x_NH), x_NH.new_empty(N, top_k, dtype=torch.int32),
            x_NH.new_empty(N, top_k, dtype=torch.float32))


CPU_SMS = 4  # "SMs" of the CPU interpreter, so that the tests run persistent programs over several items


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def programs(items: int, cfg: dict, device: torch.device) -> int:
    """Grid of an expert kernel with at most `items` work items: one program an item, or with
    cfg["per_sm"] = p > 0 a persistent grid of p programs an SM (each streams several items
    back to back, and no program is spent on an item past the step's distinct experts)."""
    per_sm = cfg.get("per_sm", 0)
    return items if per_sm <= 0 else min(items, per_sm * _sm_count(device))


@torch.library.custom_op("mtp_decode::moe_experts", mutates_args=())
def experts(hn_NH: torch.Tensor, ids_Nk: torch.Tensor, wts_Nk: torch.Tensor, res_NH: torch.Tensor,
            gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """res + sum_j w_j expert_{e_j}(hn) [N, H] for the `router`'s (e_j, w_j).
    gate_up [E, 2I, H] (gate rows first), down [E, H, I]: transformers' fused layout."""
    N, H = hn_NH.shape
    top_k = ids_Nk.shape[1]
    E, I = down.shape[0], down.shape[2]
    assert gate_up.stride(2) == 1 and down.stride(2) == 1, "expert weights must be row-major"
    hn_NH, ids, wts, res_NH = hn_NH.contiguous(), ids_Nk.contiguous(), wts_Nk.contiguous(), res_NH.contiguous()
    dev, P = hn_NH.device, N * top_k
    E_POW2, K_POW2, P_POW2 = triton.next_power_of_2(E), triton.next_power_of_2(top_k), triton.next_power_of_2(P)
    act = torch.empty(P, I, dtype=hn_NH.dtype, device=dev)
    y = torch.empty(P, H, dtype=torch.float32, device=dev)
    out = torch.empty_like(res_NH)
    g, d, c = CONFIG["gate_up"], CONFIG["down"], CONFIG["combine"]
    used = min(P, E)  # at most this many distinct experts
    pdl = pdl_args(hn_NH)
    common = dict(E_POW2=E_POW2, P_POW2=P_POW2, TOP_K=top_k, K_POW2=K_POW2, BLOCK_N=BLOCK_N,
                  GROUPS=triton.cdiv(N, BLOCK_N), **pdl)
    nb_g, nb_d = triton.cdiv(I, g["BLOCK_I"]), triton.cdiv(H, d["BLOCK_H"])
    _gate_up_kernel[(programs(used * nb_g, g, dev),)](
        hn_NH, ids, gate_up, act, gate_up.stride(0), gate_up.stride(1), N, H=H, I=I, **common,
        BLOCK_I=g["BLOCK_I"], BLOCK_IN=g["BLOCK_IN"], NB=nb_g, FLATTEN=g.get("flatten", False),
        num_warps=g["num_warps"], num_stages=g["num_stages"])
    _down_kernel[(programs(used * nb_d, d, dev),)](
        act, ids, wts, down, y, down.stride(0), down.stride(1), N, H=H, I=I, **common,
        BLOCK_H=d["BLOCK_H"], BLOCK_IN=d["BLOCK_IN"], NB=nb_d, FLATTEN=d.get("flatten", False),
        num_warps=d["num_warps"], num_stages=d["num_stages"])
    _combine_kernel[(N, triton.cdiv(H, c["BLOCK"]))](y, res_NH, out, H=H, TOP_K=top_k, BLOCK=c["BLOCK"],
                                                      num_warps=c["num_warps"], **pdl)
    return out


@experts.register_fake
def _(hn_NH, ids_Nk, wts_Nk, res_NH, gate_up, down):
    return torch.empty_like(res_NH)


# ------------------------------------------------------------------ torch references (tests)
def route_reference(logits_NE: torch.Tensor, top_k: int, norm_topk: bool):
    """(ids [N, k], weights [N, k] fp32) as the kernels pick them: descending logit, ties to the
    lower id (a stable sort), softmax over the k or over all E."""
    lf = logits_NE.float()
    top, ids = torch.sort(lf, dim=-1, descending=True, stable=True)
    top, ids = top[:, :top_k], ids[:, :top_k]
    weights = top.softmax(-1) if norm_topk else (top - torch.logsumexp(lf, -1, keepdim=True)).exp()
    return ids, weights


def router_reference(x_NH, attn_NH, norm_w, router_w, eps: float, top_k: int, norm_topk: bool):
    """What `router` computes, in torch."""
    h = x_NH + attn_NH
    hn = torch.nn.functional.rms_norm(h, (h.shape[-1],), norm_w, eps)
    ids, w = route_reference(torch.nn.functional.linear(hn, router_w), top_k, norm_topk)
    return h, hn, ids.int(), w


def experts_reference(hn_NH, ids, w, res_NH, gate_up, down):
    """What `experts` computes, in torch (gathers the experts' weights)."""
    N, H = hn_NH.shape
    I, top_k = down.shape[2], ids.shape[1]
    flat = ids.reshape(-1).long()
    x_PH = hn_NH.float().repeat_interleave(top_k, 0)
    gu = torch.bmm(gate_up[flat].float(), x_PH[:, :, None]).squeeze(-1)
    act = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]).to(hn_NH.dtype).float()
    y = torch.bmm(down[flat].float(), act[:, :, None]).squeeze(-1).view(N, top_k, H)
    y = (y * w[..., None]).sum(1)
    return (res_NH.float() + y.to(res_NH.dtype).float()).to(res_NH.dtype)
