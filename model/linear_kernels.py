"""y = x W^T for decode-sized x (a few tokens) in one Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    y_MN = linear(x_MK, w_NK)                  # model dtype, like F.linear
    logits_MN = linear(x_MK, w_NK, fp32=True)  # rounded to the model dtype, stored as fp32
    qkv_MN = linear(x_MK, w_NK, norm_w=input_norm, eps=eps)  # F.linear(F.rms_norm(x, norm_w), w)

Why: at batch 1 cuBLAS streams the q/k/v projection (21 MB) at about 2.7 TB/s and the o projection
(17 MB) at about 1.9 TB/s, the latter as a split-K GEMV plus a reduction kernel (profiled on an
H200, scripts/profile_decode.py). A step is bound by those bytes, so the rate matters; and the
kernels cuBLAS picks change with the number of rows, so a token's result could depend on how many
tokens the step holds.

Here a program owns BLOCK_N output features and BLOCK_M = 16 tokens and walks K in BLOCK_K tiles,
accumulating W_tile x^T with tl.dot in fp32; one rounding at the end, as F.linear. With norm_w
the program first takes the RMS of its tokens' rows, then normalises x tiles as it loads them
(rounded to the model dtype like F.rms_norm's output): the layer's input norm costs no kernel
of its own (at batch 1 torch's RMSNorm kernel took 3.7 us a layer, for 4 KB). Tiles are
fixed, so a token's result is the same in a 1-token decode step and in a (K+1)-token verify step.
Launched with programmatic dependent launch (model/moe_kernels.py's PDL); with PDL["prefetch"] the
first weight tile is loaded before the kernel waits for the one that wrote x (measured slower; off).

SPLIT_K > 1 (a tune option, not timed yet): at batch 1 the q/k/v projection is 80 programs
(BLOCK_N 64) on an H200's 132 SMs, each streaming 256 KB. With SPLIT_K programs per output tile,
each takes its share of K's tiles and writes an fp32 tile; the last of them to finish (an atomic
ticket, moe_kernels.split_tickets) adds the shares in split order and rounds once. The splits
depend only on (N, K) and the config, so decode and verify still agree bit for bit.
`linear` is a torch custom op, opaque to torch.compile.
"""

from __future__ import annotations

import torch

from model.moe_kernels import PDL, pdl_args, pdl_enter, split_tickets, tl, triton

BLOCK_M = 16  # tokens per program (tl.dot's minimum; fixed for batch invariance)
MAX_TOKENS = 64  # model/engine.py: more tokens go to F.linear
# the fastest of `scripts/profile_decode.py --tune` on an H200 at batch 1 (and at batch 8)
# (SPLIT_K: programs per output tile, each over its share of K's tiles; 1 until an H200 has timed more)
CONFIG = {
    "small": {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "SPLIT_K": 1},  # q/k/v (K < 4096)
    "wide": {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 3, "SPLIT_K": 1},  # o, the head's fc
    "large": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": 1},  # the lm_head (N > 16384)
}


def config_for(N: int, K: int) -> str:
    return "large" if N > 16384 else "wide" if K >= 4096 else "small"


if triton is not None:

    @triton.jit
    def _x_tile(x_ptr, nw_ptr, r, rm, m_ok, c, K: tl.constexpr, MODEL_DT: tl.constexpr, NORM: tl.constexpr):
        """Columns c of the tokens' rows, transposed [BLOCK_K, BLOCK_M]; with NORM, RMS-normed and
        scaled by the norm weight, rounded to the model dtype (as F.rms_norm's output)."""
        c_ok = c < K
        xt = tl.load(x_ptr + rm[None, :] * K + c[:, None], mask=m_ok[None, :] & c_ok[:, None], other=0.0)
        if NORM:
            nw = tl.load(nw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            xt = (xt.to(tl.float32) * r[None, :] * nw[:, None]).to(MODEL_DT)
        return xt

    @triton.jit
    def _accumulate(acc, x_ptr, nw_ptr, r, rm, m_ok, w_rows, n_ok, cols, k_from: tl.constexpr, K: tl.constexpr,
                    BLOCK_K: tl.constexpr, MODEL_DT: tl.constexpr, NORM: tl.constexpr):
        """acc + W[:, k_from:K] x[:, k_from:K]^T, tile by tile in order."""
        for k0 in range(k_from, K, BLOCK_K):
            c = k0 + cols
            w = tl.load(w_rows + c[None, :], mask=n_ok[:, None] & (c < K)[None, :], other=0.0)
            acc = tl.dot(w, _x_tile(x_ptr, nw_ptr, r, rm, m_ok, c, K, MODEL_DT, NORM), acc)
        return acc

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, y_ptr, nw_ptr, part_ptr, ticket_ptr, M, N, eps, K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODEL_DT: tl.constexpr,
                       NORM: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, SPLIT_K: tl.constexpr,
                       K_TILES: tl.constexpr):
        pn = tl.program_id(0)
        pm = tl.program_id(1)
        sk = tl.program_id(2)  # the K split (always 0 when SPLIT_K == 1)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rn[:, None].to(tl.int64) * K
        if PREFETCH:  # the first weight tile, before waiting for the kernel that wrote x (weights are never written)
            w0 = tl.load(w_rows + cols[None, :], mask=n_ok[:, None] & (cols < K)[None, :], other=0.0)
        pdl_enter(USE_PDL)
        if NORM:  # 1 / RMS of each token's row, as F.rms_norm computes it (fp32)
            ss = tl.zeros([BLOCK_K, BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                c = k0 + cols
                xt = tl.load(x_ptr + rm[None, :] * K + c[:, None], mask=m_ok[None, :] & (c < K)[:, None],
                             other=0.0).to(tl.float32)
                ss += xt * xt
            r = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        else:
            r = tl.zeros([BLOCK_M], tl.float32)  # unused
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        y_out = y_ptr + rm[None, :].to(tl.int64) * N + rn[:, None]
        if SPLIT_K == 1:
            if PREFETCH:  # tile 0, then the rest: the same order as without
                acc = tl.dot(w0, _x_tile(x_ptr, nw_ptr, r, rm, m_ok, cols, K, MODEL_DT, NORM), acc)
                acc = _accumulate(acc, x_ptr, nw_ptr, r, rm, m_ok, w_rows, n_ok, cols, BLOCK_K, K, BLOCK_K, MODEL_DT,
                                  NORM)
            else:
                acc = _accumulate(acc, x_ptr, nw_ptr, r, rm, m_ok, w_rows, n_ok, cols, 0, K, BLOCK_K, MODEL_DT, NORM)
            y = acc.to(MODEL_DT).to(y_ptr.dtype.element_ty)  # one rounding to the model dtype
            tl.store(y_out, y, mask=n_ok[:, None] & m_ok[None, :])
        else:  # columns [sk * K_TILES * BLOCK_K, ...): K_TILES tiles (tiles past K are masked: exact zeros)
            for i in range(K_TILES):
                c = (sk * K_TILES + i) * BLOCK_K + cols
                w = tl.load(w_rows + c[None, :], mask=n_ok[:, None] & (c < K)[None, :], other=0.0)
                acc = tl.dot(w, _x_tile(x_ptr, nw_ptr, r, rm, m_ok, c, K, MODEL_DT, NORM), acc)
            # this split's fp32 tile; the group's last program to finish adds the splits in order
            grp = pn * tl.num_programs(1) + pm
            tile = (tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :])
            part = part_ptr + (grp.to(tl.int64) * SPLIT_K) * (BLOCK_N * BLOCK_M) + tile
            tl.store(part + sk * (BLOCK_N * BLOCK_M), acc, mask=m_ok[None, :])
            tl.debug_barrier()  # every thread's stores done before the ticket releases them
            done = tl.atomic_add(ticket_ptr + grp, 1, sem="acq_rel")
            if done == SPLIT_K - 1:  # the last: the others' tiles are in L2 (.cg skips L1)
                tot = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                for j in tl.static_range(SPLIT_K):
                    tot += tl.load(part + j * (BLOCK_N * BLOCK_M), mask=m_ok[None, :], other=0.0, cache_modifier=".cg")
                tl.store(y_out, tot.to(MODEL_DT).to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
                tl.atomic_xchg(ticket_ptr + grp, 0)  # ready for the next call


_TL_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@torch.library.custom_op("mtp_decode::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor, fp32: bool = False, norm_w: torch.Tensor | None = None,
           eps: float = 1e-6) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T -> [..., N] in x's dtype (fp32=True: the same values stored as fp32);
    with norm_w, RMSNorm(x) * norm_w (eps) takes x's place."""
    K = x.shape[-1]
    N = w.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    assert w.shape[1] == K, f"weight {tuple(w.shape)} does not take inputs of {K} features"
    w = w.contiguous()  # (a no-op for the engine's weights, which are contiguous)
    y = torch.empty(M, N, dtype=torch.float32 if fp32 else x.dtype, device=x.device)
    cfg, pdl = CONFIG[config_for(N, K)], pdl_args(x2)
    model_dt = getattr(tl, _TL_DTYPE[x.dtype])
    norm = norm_w is not None
    assert not norm or (norm_w.is_contiguous() and norm_w.shape == (K,))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, BLOCK_M))
    split = min(cfg.get("SPLIT_K", 1), triton.cdiv(K, cfg["BLOCK_K"]))  # splits of whole tiles, fixed by (N, K)
    if split > 1:
        part = torch.empty(grid[0] * grid[1] * split * cfg["BLOCK_N"] * BLOCK_M, dtype=torch.float32, device=x.device)
        tickets = split_tickets(grid[0] * grid[1], x.device)
    else:
        part = tickets = y  # never written
    _linear_kernel[grid + (split,)](
        x2, w, y, norm_w if norm else w, part, tickets, M, N, eps, K=K, BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], MODEL_DT=model_dt, NORM=norm, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        PREFETCH=split == 1 and PDL["enabled"] and PDL["prefetch"], SPLIT_K=split,
        K_TILES=triton.cdiv(triton.cdiv(K, cfg["BLOCK_K"]), split), **pdl)
    return y.view(*x.shape[:-1], N)


@linear.register_fake
def _(x, w, fp32=False, norm_w=None, eps=1e-6):
    return x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32 if fp32 else x.dtype)
