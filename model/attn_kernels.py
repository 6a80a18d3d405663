"""Attention for decode-sized steps in two Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    q_NQD = qk_prep(qkv_N3, qk_norm_w, cos_SD, sin_SD, kv_cache, pos_BT, eps, n_heads, n_kv)
    o_BTQD = decode_attention(q_NQD, kv_cache, pos_BT, n_kv)        # then o_proj

Why: profiled on an H200 (scripts/profile_decode.py, Qwen3-30B-A3B shape, batch 1), the compiled
torch attention of one layer is six kernels: q/k norm + RoPE, the K/V cache scatter, the query
re-layout, two more small fusions and cuDNN's flash attention, which alone takes 8.7 us for a
single query over ~270 cached slots. Here it is two kernels:

  1. qk_prep    grid (tokens, n_heads + 2 n_kv): RMSNorm of each q and k head (q_norm/k_norm),
                RoPE by position from the cos/sin tables, q to a buffer, k and v written into
                the static cache at (row, position).
  2. attention  grid (rows * n_kv, query blocks, splits): the G = n_heads / n_kv query heads of a kv
                head and the T step tokens of a row form the query block (GQA without
                repeating K/V); online softmax over cache slots in blocks of BLOCK_S, slot s
                visible to the query at position p when s <= p. The loop stops at the block's
                last position, so stale slots past a row's length are never read.

Splitting the cache (CONFIG["attention"]["SPLIT_S"] or MTP_ATTN_SPLIT = slots per split; 0, the
default, is off until an H200 has timed it): without it one program per (row, kv head) walks the
whole cache, 4 programs at batch 1 on the 30B-A3B shape, which leaves most SMs idle once the
context is long. With it the grid gains a split axis: a program takes SPLIT_S slots (its BLOCK_S
tiles up to the block's last position) and writes its softmax state (max, sum, weighted values,
fp32); the last program of a query block to finish (an atomic ticket, reset to 0 after use, so it
stays one kernel) combines the splits in split order. Where a block's positions fit one split,
that program writes the result itself, bit for bit the unsplit kernel's. Splits are fixed slot
ranges and splits past a query's position add exact zeros, so decode and verify still agree bit
for bit.

Numerics follow model/qwen3_forward.py's torch path: the norm's x_hat and every RoPE product rounded to
the model dtype as in bf16 torch ops; scores and softmax in fp32, P cast to the value dtype for
the PV product (flash attention's rounding). A query's result does not depend on how many other
tokens the step holds (fixed BLOCK_M / BLOCK_S tiling, fully masked blocks add exact zeros), so
a verify step computes the same numbers as plain decoding of the same tokens.

Requirements: positions of a row's step tokens are consecutive (decode, verify, draft and draft
extend steps are); head_dim a power of two; kv_cache [2, B, n_kv, S, D] contiguous.
"""

from __future__ import annotations

import os

import torch

from model.moe_kernels import pdl_args, pdl_enter, split_tickets, tl, triton

BLOCK_M = 16  # query rows (token, query head) per program: tl.dot's minimum
# cache slots per inner iteration: the fastest of `scripts/profile_decode.py --tune` on an H200
CONFIG = {"attention": {"BLOCK_S": 128, "num_warps": 8, "SPLIT_S": 0}}


if triton is not None:

    @triton.jit
    def _qk_prep_kernel(qkv_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, cache_ptr,
                        stride_kv, stride_b, stride_h, stride_s, T, eps,
                        NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_enter(USE_PDL)
        n = tl.program_id(0)  # token = b * T + t
        h = tl.program_id(1)  # q heads, then k heads, then v heads
        b = n // T
        HALF: tl.constexpr = D // 2
        dt = qkv_ptr.dtype.element_ty
        d = tl.arange(0, HALF)
        row = qkv_ptr + n.to(tl.int64) * ((NQ + 2 * NKV) * D) + h * D
        x1 = tl.load(row + d).to(tl.float32)
        x2 = tl.load(row + HALF + d).to(tl.float32)
        pos = tl.load(pos_ptr + n).to(tl.int64)
        if h < NQ + NKV:
            r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
            w1 = tl.load(w_ptr + h * D + d).to(tl.float32)
            w2 = tl.load(w_ptr + h * D + HALF + d).to(tl.float32)
            y1 = ((x1 * r).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
            y2 = ((x2 * r).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
            c1 = tl.load(cos_ptr + pos * D + d).to(tl.float32)
            c2 = tl.load(cos_ptr + pos * D + HALF + d).to(tl.float32)
            s1 = tl.load(sin_ptr + pos * D + d).to(tl.float32)
            s2 = tl.load(sin_ptr + pos * D + HALF + d).to(tl.float32)
            # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product rounded
            o1 = ((y1 * c1).to(dt).to(tl.float32) + (-y2 * s1).to(dt).to(tl.float32)).to(dt)
            o2 = ((y2 * c2).to(dt).to(tl.float32) + (y1 * s2).to(dt).to(tl.float32)).to(dt)
            if h < NQ:
                dst = q_ptr + (n.to(tl.int64) * NQ + h) * D
            else:
                dst = cache_ptr + b.to(tl.int64) * stride_b + (h - NQ) * stride_h + pos * stride_s
            tl.store(dst + d, o1)
            tl.store(dst + HALF + d, o2)
        else:
            dst = cache_ptr + stride_kv + b.to(tl.int64) * stride_b + (h - NQ - NKV) * stride_h + pos * stride_s
            tl.store(dst + d, x1.to(dt))
            tl.store(dst + HALF + d, x2.to(dt))

    @triton.jit
    def _tile(acc, m_i, l_i, q, k_base, v_base, pos, s0, end, stride_s, qk_scale, d, BLOCK_S: tl.constexpr):
        """One BLOCK_S tile of cache slots from s0 into the online softmax; slots >= end are not
        read, and slots past a query's position are masked (a fully masked tile adds exact zeros)."""
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        k = tl.load(k_base + s[:, None].to(tl.int64) * stride_s + d[None, :], mask=s_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(s[None, :] <= pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + s[:, None].to(tl.int64) * stride_s + d[None, :], mask=s_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _finish(o_rows, acc, l_i, row_ok):
        """The softmax-weighted values over their sum, rounded to the output's dtype and stored."""
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_rows, out.to(o_rows.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _attention_kernel(q_ptr, cache_ptr, pos_ptr, o_ptr, part_ptr, ml_ptr, ticket_ptr,
                          stride_kv, stride_b, stride_h, stride_s, T, scale,
                          NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_S: tl.constexpr, SPLIT_S: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_enter(USE_PDL)
        bh = tl.program_id(0)
        mb = tl.program_id(1)
        sp = tl.program_id(2)  # the cache split (always 0 when SPLIT_S == 0)
        b = bh // NKV
        kvh = bh % NKV
        G: tl.constexpr = NQ // NKV
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # r = t * G + g
        row_ok = rows < T * G
        t = rows // G
        head = kvh * G + rows % G
        n = (b * T + t).to(tl.int64)
        d = tl.arange(0, D)
        # positions rise with t: the block's last token holds its largest position
        t_last = tl.minimum((mb * BLOCK_M + BLOCK_M - 1) // G, T - 1)
        end = tl.load(pos_ptr + b * T + t_last) + 1
        lo = sp * SPLIT_S
        if lo < end:  # a split past the block's last position has nothing to do
            q = tl.load(q_ptr + (n * NQ + head)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
            pos = tl.load(pos_ptr + n, mask=row_ok, other=-1)
            k_base = cache_ptr + b.to(tl.int64) * stride_b + kvh * stride_h
            v_base = k_base + stride_kv
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
            o_rows = o_ptr + (n * NQ + head)[:, None] * D + d[None, :]
            # slots [lo, hi): the whole cache, or this split's part of it, tile by tile
            hi = end if SPLIT_S == 0 else tl.minimum(end, lo + SPLIT_S)
            s0 = lo
            while s0 < hi:  # (a while loop: the CPU interpreter cannot range() to a loaded bound)
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, pos, s0, end, stride_s, qk_scale, d, BLOCK_S)
                s0 += BLOCK_S
            if SPLIT_S == 0:  # (a constexpr test: the split code below is not even compiled)
                _finish(o_rows, acc, l_i, row_ok)
            elif (end + SPLIT_S - 1) // SPLIT_S == 1:  # the block fits one split: the unsplit kernel's bits
                _finish(o_rows, acc, l_i, row_ok)
            else:  # write this split's (m, l, acc); the last split to finish combines them in split order
                n_split = (end + SPLIT_S - 1) // SPLIT_S
                blk = bh * tl.num_programs(1) + mb
                slot = blk.to(tl.int64) * tl.num_programs(2) + sp
                r = tl.arange(0, BLOCK_M)
                tl.store(part_ptr + (slot * BLOCK_M + r)[:, None] * D + d[None, :], acc)
                tl.store(ml_ptr + slot * 2 * BLOCK_M + r, m_i)
                tl.store(ml_ptr + slot * 2 * BLOCK_M + BLOCK_M + r, l_i)
                tl.debug_barrier()  # every thread's stores done before the ticket releases them
                done = tl.atomic_add(ticket_ptr + blk, 1, sem="acq_rel")
                if done == n_split - 1:  # the last: the others' partials are in L2 (.cg skips L1)
                    first = blk.to(tl.int64) * tl.num_programs(2)
                    m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
                    j = 0
                    while j < n_split:
                        m_all = tl.maximum(m_all, tl.load(ml_ptr + (first + j) * 2 * BLOCK_M + r, cache_modifier=".cg"))
                        j += 1
                    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
                    acc = tl.zeros([BLOCK_M, D], tl.float32)
                    l_i = tl.zeros([BLOCK_M], tl.float32)
                    j = 0
                    while j < n_split:  # splits past a query's position add exact zeros
                        base = (first + j) * 2 * BLOCK_M
                        w = tl.exp2(tl.load(ml_ptr + base + r, cache_modifier=".cg") - m_all)
                        l_i += w * tl.load(ml_ptr + base + BLOCK_M + r, cache_modifier=".cg")
                        part = tl.load(part_ptr + ((first + j) * BLOCK_M + r)[:, None] * D + d[None, :],
                                       cache_modifier=".cg")
                        acc += w[:, None] * part
                        j += 1
                    _finish(o_rows, acc, l_i, row_ok)
                    tl.atomic_xchg(ticket_ptr + blk, 0)  # ready for the next call


@torch.library.custom_op("mtp_decode::qk_prep", mutates_args=("kv_cache",))
def qk_prep(qkv: torch.Tensor, qk_norm_w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            kv_cache: torch.Tensor, pos_BT: torch.Tensor, eps: float, n_heads: int, n_kv: int) -> torch.Tensor:
    """q [B*T, n_heads, D] (normed, rotated); writes k and v into kv_cache [2, B, n_kv, S, D] at
    (row, pos). qkv [B, T, (n_heads + 2 n_kv) * D]; qk_norm_w [n_heads + n_kv, D]; cos/sin [S, D]."""
    B, T = pos_BT.shape
    D = kv_cache.shape[-1]
    qkv, pos_BT = qkv.contiguous(), pos_BT.contiguous()
    assert kv_cache.stride(-1) == 1 and qk_norm_w.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    q = torch.empty(B * T, n_heads, D, dtype=qkv.dtype, device=qkv.device)
    _qk_prep_kernel[(B * T, n_heads + 2 * n_kv)](
        qkv, qk_norm_w, cos, sin, pos_BT, q, kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), T, eps, NQ=n_heads, NKV=n_kv, D=D, num_warps=1, **pdl_args(qkv))
    return q


@qk_prep.register_fake
def _(qkv, qk_norm_w, cos, sin, kv_cache, pos_BT, eps, n_heads, n_kv):
    B, T = pos_BT.shape
    return qkv.new_empty(B * T, n_heads, kv_cache.shape[-1])


def split_slots() -> int:
    """Cache slots per attention split: CONFIG, or MTP_ATTN_SPLIT when set (0: no split)."""
    env = os.environ.get("MTP_ATTN_SPLIT")
    value = CONFIG["attention"]["SPLIT_S"] if env is None or not env.strip() else env.strip()
    bs = CONFIG["attention"]["BLOCK_S"]
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0 or n % bs:
        raise ValueError(f"MTP_ATTN_SPLIT={value!r}: use 0 (one program walks a row's whole cache) or a multiple "
                         f"of BLOCK_S={bs} (cache slots per split)")
    return n


@torch.library.custom_op("mtp_decode::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, pos_BT: torch.Tensor, n_kv: int) -> torch.Tensor:
    """o [B, T, n_heads * D]: each query attends to its row's cache slots 0..pos."""
    B, T = pos_BT.shape
    _, n_heads, D = q.shape
    G = n_heads // n_kv
    q = q.contiguous()
    assert kv_cache.stride(-1) == 1
    o = torch.empty(B, T, n_heads * D, dtype=q.dtype, device=q.device)
    cfg = CONFIG["attention"]
    split = split_slots()
    n_split = triton.cdiv(kv_cache.shape[3], split) if split else 1
    blocks = B * n_kv * triton.cdiv(T * G, BLOCK_M)
    if n_split > 1:
        part = torch.empty(blocks * n_split * BLOCK_M, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(blocks * n_split * 2 * BLOCK_M, dtype=torch.float32, device=q.device)
        tickets = split_tickets(blocks, q.device)
    else:  # never written: a row's cache fits one split
        part = ml = tickets = o
        split = 0
    grid = (B * n_kv, triton.cdiv(T * G, BLOCK_M), n_split)
    _attention_kernel[grid](q, kv_cache, pos_BT.contiguous(), o, part, ml, tickets, kv_cache.stride(0),
                            kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), T, D ** -0.5, NQ=n_heads,
                            NKV=n_kv, D=D, BLOCK_M=BLOCK_M, BLOCK_S=cfg["BLOCK_S"], SPLIT_S=split,
                            num_warps=cfg["num_warps"], **pdl_args(q))
    return o


@decode_attention.register_fake
def _(q, kv_cache, pos_BT, n_kv):
    B, T = pos_BT.shape
    return q.new_empty(B, T, q.shape[1] * q.shape[2])
