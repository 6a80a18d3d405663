"""Fused MoE experts for decode-sized token counts (Triton; CUDA, or CPU under TRITON_INTERPRET=1).

    y_NkH = expert_pairs(x_NH, idx_Nk, top_logits_Nk, gate_up_E2IH, down_EHI, norm_topk=True)
    out_NH = y_NkH.sum(1).to(x_NH.dtype)      # == fast_moe.experts_grouped(...) up to rounding

Why: at decode (N*k <= ~128 (token, slot) pairs) the grouped-GEMM path is a dozen small
kernels per layer (sort, bincount, cumsum, gather, 2 grouped GEMMs, act, un-permute, weighted
sum) and a step is bound by their launch/tail latency, not by bytes. Here it is two kernels,
reading each pair's expert weights in place by index (no gather copy, no sort, no offsets):

  1. gate_up_act  grid (N*k, I / BLOCK_I), pair axis fastest so that pairs routed to the same
                  expert load the same weight tile at about the same time (L2 hits):
                  act[p] = silu(x[p // k] W_gate[e_p]^T) * (x[p // k] W_up[e_p]^T)   (bf16)
  2. down         grid (N*k, H / BLOCK_H): y[p] = w_p * (act[p] W_down[e_p]^T)       (fp32)
                  split over pairs, not looping over a token's k slots: at N=1 a per-token
                  grid has only H / BLOCK_H CTAs, too few loads in flight to reach HBM speed.
The routing weights come from the top-k router logits inside kernel 2 (softmax over the k
top logits = softmax over all E, top-k, renormalised; `norm_topk=False` passes the full
log-sum-exp), so the router's softmax and renormalisation kernels disappear too.
The k-slot sum is left to torch: under torch.compile it fuses with the residual add.

Both are GEMVs (tl.sum over a [BLOCK_OUT, BLOCK_IN] tile), memory bound; fp32 accumulation.
H and I are compile-time constants (one specialisation per model shape; static loop bounds).
Weights are read once per pair, not once per expert: with random routing at B=8 that is 64
pair reads for ~52 distinct experts (L2 absorbs part of it); above MAX_PAIRS the caller uses
grouped GEMMs. CUDA-graph safe: no host syncs, output shapes depend on input shapes only.
`expert_pairs` is a torch custom op, opaque to torch.compile (fullgraph works).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decode.py keeps its torch paths
    triton = None

MAX_PAIRS = 128  # decode.py: N*k above this goes to grouped GEMMs (weights re-read per pair)
BLOCK_I = 16  # kernel 1 output rows (of gate and of up) per CTA: I=768 -> 48 CTAs per pair
BLOCK_H = 16  # kernel 2 output rows per CTA: H=2048 -> 128 CTAs per pair
BLOCK_IN = 256  # reduction tile (bf16: 512 B per weight row per load)


def available(device) -> bool:
    """Triton importable and able to run on `device` (CUDA, or the CPU interpreter)."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _gate_up_act_kernel(x_ptr, idx_ptr, w_ptr, act_ptr, stride_we, stride_wr,
                            H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_IN: tl.constexpr):
        pair = tl.program_id(0)
        blk = tl.program_id(1)
        tok = pair // TOP_K
        e = tl.load(idx_ptr + pair).to(tl.int64)
        rows = blk * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I] rows of gate (and of up at +I)
        row_ok = rows < I
        cols = tl.arange(0, BLOCK_IN)
        gate_ptrs = w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wr
        up_ptrs = gate_ptrs + I * stride_wr
        acc_g = tl.zeros([BLOCK_I, BLOCK_IN], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_I, BLOCK_IN], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_IN):
            c = h0 + cols
            c_ok = c < H
            x = tl.load(x_ptr + tok * H + c, mask=c_ok, other=0.0).to(tl.float32)
            m = row_ok[:, None] & c_ok[None, :]
            g = tl.load(gate_ptrs + c[None, :], mask=m, other=0.0).to(tl.float32)
            u = tl.load(up_ptrs + c[None, :], mask=m, other=0.0).to(tl.float32)
            acc_g += g * x[None, :]
            acc_u += u * x[None, :]
        gate = tl.sum(acc_g, axis=1)
        up = tl.sum(acc_u, axis=1)
        act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up
        tl.store(act_ptr + pair * I + rows, act.to(act_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _down_kernel(act_ptr, idx_ptr, top_ptr, lse_ptr, w_ptr, y_ptr, stride_we, stride_wr,
                     H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, K_POW2: tl.constexpr, NORM_TOPK: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_IN: tl.constexpr):
        pair = tl.program_id(0)
        blk = tl.program_id(1)
        tok = pair // TOP_K
        slot = pair % TOP_K
        e = tl.load(idx_ptr + pair).to(tl.int64)
        # routing weight of this slot from the token's top-k router logits (fp32)
        ks = tl.arange(0, K_POW2)
        top = tl.load(top_ptr + tok * TOP_K + ks, mask=ks < TOP_K, other=float("-inf")).to(tl.float32)
        mine = tl.sum(tl.where(ks == slot, top, 0.0), axis=0)
        if NORM_TOPK:  # softmax over the k selected logits
            mx = tl.max(top, axis=0)
            weight = tl.exp(mine - mx) / tl.sum(tl.exp(top - mx), axis=0)
        else:  # the full softmax's probability: exp(l - logsumexp over all experts)
            weight = tl.exp(mine - tl.load(lse_ptr + tok))
        rows = blk * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] output features
        row_ok = rows < H
        cols = tl.arange(0, BLOCK_IN)
        w_ptrs = w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wr
        acc = tl.zeros([BLOCK_H, BLOCK_IN], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_IN):
            c = i0 + cols
            c_ok = c < I
            a = tl.load(act_ptr + pair * I + c, mask=c_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc += w * a[None, :]
        y = tl.sum(acc, axis=1) * weight
        tl.store(y_ptr + pair * H + rows, y, mask=row_ok)


@torch.library.custom_op("mtp_decode::expert_pairs", mutates_args=())
def expert_pairs(x_NH: torch.Tensor, idx_Nk: torch.Tensor, top_logits_Nk: torch.Tensor,
                 lse_N: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, norm_topk: bool) -> torch.Tensor:
    """y [N, k, H] fp32: the routing-weighted output of each (token, slot) pair's expert.
    gate_up [E, 2I, H] (gate rows first), down [E, H, I]; idx/top_logits from topk over the
    router logits; lse_N = logsumexp of all router logits (read only if not norm_topk)."""
    N, H = x_NH.shape
    k = idx_Nk.shape[1]
    I = down.shape[2]
    assert gate_up.stride(2) == 1 and down.stride(2) == 1, "expert weights must be row-major"
    x_NH, idx_Nk, top_logits_Nk = x_NH.contiguous(), idx_Nk.contiguous(), top_logits_Nk.contiguous()
    act_PI = torch.empty(N * k, I, dtype=x_NH.dtype, device=x_NH.device)
    y_NkH = torch.empty(N, k, H, dtype=torch.float32, device=x_NH.device)
    _gate_up_act_kernel[(N * k, triton.cdiv(I, BLOCK_I))](
        x_NH, idx_Nk, gate_up, act_PI, gate_up.stride(0), gate_up.stride(1), H=H, I=I,
        TOP_K=k, BLOCK_I=BLOCK_I, BLOCK_IN=BLOCK_IN, num_warps=4)
    _down_kernel[(N * k, triton.cdiv(H, BLOCK_H))](
        act_PI, idx_Nk, top_logits_Nk, lse_N, down, y_NkH, down.stride(0), down.stride(1), H=H, I=I,
        TOP_K=k, K_POW2=triton.next_power_of_2(k), NORM_TOPK=norm_topk, BLOCK_H=BLOCK_H,
        BLOCK_IN=BLOCK_IN, num_warps=4)
    return y_NkH


@expert_pairs.register_fake
def _(x_NH, idx_Nk, top_logits_Nk, lse_N, gate_up, down, norm_topk):
    N, H = x_NH.shape
    return x_NH.new_empty(N, idx_Nk.shape[1], H, dtype=torch.float32)


def expert_pairs_reference(x_NH, idx_Nk, top_logits_Nk, lse_N, gate_up, down, norm_topk: bool):
    """What `expert_pairs` computes, in torch (gathers expert weights; for tests)."""
    N, k = idx_Nk.shape
    I = down.shape[2]
    top = top_logits_Nk.float()
    weight_Nk = top.softmax(-1) if norm_topk else (top - lse_N.float()[:, None]).exp()
    x_PH = x_NH.float().repeat_interleave(k, 0)
    flat = idx_Nk.reshape(-1)
    gu_P2I = torch.bmm(gate_up[flat].float(), x_PH[:, :, None]).squeeze(-1)
    act_PI = (torch.nn.functional.silu(gu_P2I[:, :I]) * gu_P2I[:, I:]).to(x_NH.dtype).float()
    y_PH = torch.bmm(down[flat].float(), act_PI[:, :, None]).squeeze(-1)
    return y_PH.view(N, k, -1) * weight_Nk[..., None]
