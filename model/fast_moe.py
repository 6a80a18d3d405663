"""Grouped-GEMM MoE experts for many tokens (the frozen target, decode's prefill, the trainable head on a GPU).

    out_NH = experts_grouped(x_NH, idx_Nk, w_Nk, gate_up_E2IH, down_EHI)
    use_lean_experts(target_model)     # every Qwen3-MoE experts module of a transformers model

Why: the 4 x 2048 target forward of Qwen3-30B-A3B on an H200 took 214 ms of GPU time, of
which only about 51 ms are the expert GEMMs; most of the rest is the glue around them. This path
keeps the glue to the few passes the math needs, for M = N*k (token, slot) pairs:

  sort the flat expert ids (stable)            -> perm_M, sorted ids
  group ends by binary search in the sorted ids -> offs_E (int32; no atomics, no host sync)
  gather the input rows once                   x_MH = x_NH[perm // k]
  grouped GEMM gate_up, silu(gate) * up * w     (routing weight on the [M, I] activation, where
                                                 it costs I columns instead of H)
  grouped GEMM down                            y_MH, still in expert order
  un-permute and sum the k slots of each token: on CUDA one Triton kernel (`slot_sum`) reads
  each token's k rows of y where they lie (inverse perm) and writes the sum; deterministic, no
  index_add atomics, no [M, H] copy in pair order.

The un-permute and sum was a gather of y into pair order and a sum over an [N, k, H] view; even
fused by torch.compile it read y at about 1 TB/s: 319 us a layer of the 4 x 2048 target forward on an
H200, 15 ms of a 180 ms online step (scripts/bench_train.py --profile). MTP_SLOT_SUM=torch keeps
that path (the benchmark's side-by-side switch).

The target's and decode's calls run under no_grad (in place where it saves memory);
`experts_grouped_train` keeps what autograd needs, for the head's experts. Expert weights
are transformers' fused layout: gate_up [E, 2I, H] (gate rows first), down [E, H, I]
(gate rows first). torch's grouped_mm runs on CUDA (bf16) and on CPU (fp32 too, when row strides
are multiples of 16 bytes, which the tiny test config satisfies).
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from model.moe_kernels import available, tl, triton


def grouped_mm(a_MK: torch.Tensor, b_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of a times b[e]; F.grouped_mm from torch 2.10, torch._grouped_mm before."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a_MK, b_EKN, offs=offs_E)


def sort_pairs(idx_Nk: torch.Tensor, num_experts: int):
    """(perm_M, offs_E): the (token, slot) pairs in expert order (pair p = token * k + slot) and
    the int32 end offset of each expert's group."""
    flat_M = idx_Nk.reshape(-1)
    sorted_M, perm_M = torch.sort(flat_M, stable=True)
    experts_E = torch.arange(num_experts, device=flat_M.device, dtype=sorted_M.dtype)
    # number of pairs with expert id <= e, i.e. where group e ends
    offs_E = torch.searchsorted(sorted_M, experts_E, right=True, out_int32=True)
    return perm_M, offs_E


def slot_sum_enabled(y: torch.Tensor) -> bool:
    """Whether `experts_grouped` sums the slots with `slot_sum`'s Triton kernel. MTP_SLOT_SUM: auto
    (the default: on CUDA), torch (never), triton (wherever Triton runs, the CPU interpreter too;
    for tests)."""
    choice = os.environ.get("MTP_SLOT_SUM", "auto").strip().lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"MTP_SLOT_SUM={choice!r}: use auto (the default), torch or triton")
    return choice != "torch" and (y.is_cuda or choice == "triton") and available(y.device)


SLOT_SUM_CONFIG = {"BLOCK_H": 1024, "num_warps": 4}

if triton is not None:

    @triton.jit
    def _slot_sum_kernel(y_ptr, inv_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[n, cols] = sum over slots j (in order, fp32) of y[inv[n * TOP_K + j], cols], one rounding."""
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = cols < H
        acc = tl.zeros([BLOCK_H], tl.float32)
        for j in tl.static_range(TOP_K):
            row = tl.load(inv_ptr + n * TOP_K + j).to(tl.int64)
            acc += tl.load(y_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * H + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("mtp_train::slot_sum", mutates_args=())
def slot_sum(y_MH: torch.Tensor, inv_M: torch.Tensor, tok_M: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, H]: token n's sum of its top_k rows y[inv[n*k : n*k+k]] (fp32, rounded once to y's dtype).
    tok_M (= perm // k, the token of each row of y) is for the backward, a gather."""
    M, H = y_MH.shape
    y_MH = y_MH.contiguous()
    out = torch.empty(M // top_k, H, dtype=y_MH.dtype, device=y_MH.device)
    if out.numel():
        c = SLOT_SUM_CONFIG
        _slot_sum_kernel[(M // top_k, triton.cdiv(H, c["BLOCK_H"]))](
            y_MH, inv_M.contiguous(), out, H, TOP_K=top_k, BLOCK_H=c["BLOCK_H"], num_warps=c["num_warps"])
    return out


@slot_sum.register_fake
def _(y_MH, inv_M, tok_M, top_k):
    return y_MH.new_empty(y_MH.shape[0] // top_k, y_MH.shape[1])


def _slot_sum_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _slot_sum_backward(ctx, grad_NH):
    (tok_M,) = ctx.saved_tensors
    return grad_NH.index_select(0, tok_M), None, None, None  # row m of y feeds token tok[m] only


slot_sum.register_autograd(_slot_sum_backward, setup_context=_slot_sum_setup)


class _GatherRows(torch.autograd.Function):
    """rows = x[index] whose backward is a gather as well, by `back` (no index_add atomics): each
    row of x is read by `group` consecutive entries of back, whose gradients are summed."""

    @staticmethod
    def forward(ctx, x, index, back, group: int):
        ctx.save_for_backward(back)
        ctx.group, ctx.rows = group, x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        g = grad.index_select(0, back)
        if ctx.group > 1:
            g = g.view(ctx.rows, ctx.group, -1).sum(1)
        return g, None, None, None


def experts_grouped(x_NH, idx_Nk, w_Nk, gate_up_E2IH, down_EHI, inplace: bool = True):
    """sum_j w[n, j] * expert_{idx[n, j]}(x[n]) for every token n, [N, H] in x's dtype.

    inplace=True reuses the activation buffer (inference: the frozen target, decoding);
    inplace=False keeps every intermediate autograd needs (`experts_grouped_train`)."""
    N, k = idx_Nk.shape
    E, two_I, _ = gate_up_E2IH.shape
    perm_M, offs_E = sort_pairs(idx_Nk, E)
    # inverse permutation: sorted row of pair p
    inv_M = torch.empty_like(perm_M)
    inv_M[perm_M] = torch.arange(perm_M.numel(), device=perm_M.device)
    tok_M = perm_M // k  # the token of each sorted row
    if inplace:
        x_MH = x_NH.index_select(0, tok_M)
    else:  # training: token n's k sorted rows are inv[n*k : n*k+k], so backward gathers and sums them
        x_MH = _GatherRows.apply(x_NH, tok_M, inv_M, k)
    w_M1 = w_Nk.reshape(-1).index_select(0, perm_M).to(x_NH.dtype)[:, None]
    h_M2I = grouped_mm(x_MH, gate_up_E2IH.transpose(1, 2), offs_E)
    gate_MI, up_MI = h_M2I.split(two_I // 2, dim=-1)
    if inplace:
        act_MI = F.silu(gate_MI).mul_(up_MI).mul_(w_M1)
    else:
        act_MI = F.silu(gate_MI) * up_MI * w_M1
    y_MH = grouped_mm(act_MI, down_EHI.transpose(1, 2), offs_E)
    if slot_sum_enabled(y_MH):
        return slot_sum(y_MH, inv_M, tok_M, k)
    y_PH = y_MH.index_select(0, inv_M) if inplace else _GatherRows.apply(y_MH, inv_M, perm_M, 1)  # pair order
    return y_PH.view(N, k, -1).sum(1)


def _is_fused_experts(module: nn.Module) -> bool:
    """transformers 5.x MoE experts: 3-D gate_up_proj / down_proj in the [E, 2I, H] / [E, H, I] layout."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    E, two_I, H = gate_up.shape
    if getattr(module, "is_transposed", False) or down.shape != (E, H, two_I // 2):
        raise ValueError(
            f"{type(module).__name__}: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I], got "
            f"{tuple(gate_up.shape)} and {tuple(down.shape)}; the lean experts path reads transformers' "
            "untransposed fused layout only"
        )
    return True


def _lean_experts_forward(module: nn.Module, hidden_states, top_k_index, top_k_weights):
    """Drop-in for a transformers experts module's forward(hidden_NH, top_k_index, top_k_weights)."""
    with torch.no_grad():
        return experts_grouped(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj)


def use_lean_experts(model: nn.Module, enable: bool = True) -> int:
    """Route every fused experts module of `model` through `experts_grouped` (or back to
    transformers' own forward with enable=False). Returns the number of modules switched.

    Only for a frozen model: the lean forward builds no autograd graph. The router (softmax,
    top-k, renormalisation) stays transformers' own, so routing is identical by construction.
    """
    count = 0
    for module in model.modules():
        if not _is_fused_experts(module):
            continue
        if enable and "forward" not in module.__dict__:
            # an instance attribute shadows the class's forward; nn.Module.__call__ looks it up.
            # Set once: a compiled caller guards on this object.
            module.forward = types.MethodType(_lean_experts_forward, module)
        elif not enable and "forward" in module.__dict__:
            del module.forward
        count += 1
    return count


def experts_grouped_train(x_NH, idx_Nk, w_Nk, gate_up_E2IH, down_EHI):
    """`experts_grouped` with autograd (no in-place ops): gradients reach x, the routing weights
    and both expert weights. The trainable head's experts on a GPU."""
    return experts_grouped(x_NH, idx_Nk, w_Nk, gate_up_E2IH, down_EHI, inplace=False)


def _head_experts_forward(module: nn.Module, hidden_states, top_k_index, top_k_weights):
    """The head's experts: on a GPU, grouped GEMMs in the autocast dtype. torch's grouped_mm is
    not autocast-aware, so transformers' path runs fp32 weights (a head trained without DeepSpeed's
    bf16 mode, under autocast) as fp32 GEMMs; here the weights are cast like a Linear's under
    autocast (a differentiable cast: the fp32 weights get the gradients). On a CPU, or with
    `module.lean = False`, transformers' own forward."""
    if not (getattr(module, "lean", True) and hidden_states.is_cuda):
        return type(module).forward(module, hidden_states, top_k_index, top_k_weights)
    dt = hidden_states.dtype
    if torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
    out = experts_grouped_train(hidden_states.to(dt), top_k_index, top_k_weights,
                                module.gate_up_proj.to(dt), module.down_proj.to(dt))
    return out.to(hidden_states.dtype)


def use_head_experts(layer: nn.Module, enable: bool = True) -> None:
    """Route a trainable decoder layer's fused experts through `_head_experts_forward` (GPU only;
    `enable=False` keeps transformers' path everywhere, e.g. for a benchmark's baseline)."""
    for module in layer.modules():
        if _is_fused_experts(module):
            module.forward = types.MethodType(_head_experts_forward, module)
            module.lean = enable
