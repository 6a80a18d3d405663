"""The cross-entropy pass of the vocabulary loss in one Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    terms_C, hits, g_CV = ce_chunk_pass(z_CV, labels_C)      # g_CV is z_CV's buffer, overwritten

Between the two matmuls of a loss chunk (model/loss.py, "compiled") the [C, V] logits are read
to get, per row, the log-sum-exp, the label's logit and the argmax, then read again to write the
gradient p - onehot(label). torch.compile's fusion of those steps took 1.81 ms a 4,096 x 151,936
bf16 chunk on an H200; this kernel 1.18 ms (both profiled in scripts/bench_train.py --profile).
Here one program owns a row:

  pass 1  blocks of BLOCK_V logits: block max (first index on ties, as torch.argmax), an online
          sum of exp against the running max, and the running argmax;
  pass 2  p = exp(z - lse), minus 1 at the label, in fp32, rounded once to z's dtype and
          written over z.

So the logits are read twice and written once, and no new [C, V] buffer is allocated (the
gradient takes the logits' place; each element is read by its own program before it is
overwritten). Rows with label < 0 score 0 and get zero gradient, as in model/loss.py.
"""

from __future__ import annotations

import os

import torch

from model.moe_kernels import available, tl, triton

CONFIG = {"BLOCK_V": 2048, "num_warps": 8}


def enabled(z: torch.Tensor) -> bool:
    """The kernel runs for z's device: Triton there and MTP_LOSS_KERNEL not set to "inductor"
    (the switch the benchmark uses to time torch.compile's fusion against it)."""
    choice = os.environ.get("MTP_LOSS_KERNEL", "triton").strip().lower()
    if choice not in ("triton", "inductor"):
        raise ValueError(f"MTP_LOSS_KERNEL={choice!r}: use triton (the default) or inductor")
    return choice == "triton" and available(z.device)


if triton is not None:

    @triton.jit
    def _ce_rows(z_ptr, y_ptr, terms_ptr, hits_ptr, V, stride, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        y = tl.load(y_ptr + row)
        m = tl.full([], float("-inf"), tl.float32)  # running max of the row
        s = tl.zeros([], tl.float32)  # sum of exp(z - m)
        best = tl.full([], float("-inf"), tl.float32)
        best_i = tl.zeros([], tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            bmax, bidx = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            best_i = tl.where(bmax > best, start + bidx, best_i)  # strict: an earlier block keeps a tie
            best = tl.maximum(best, bmax)
            m_new = tl.maximum(m, bmax)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        valid = y >= 0
        y_safe = tl.maximum(y, 0)
        z_y = tl.load(base + y_safe).to(tl.float32)
        tl.store(terms_ptr + row, tl.where(valid, lse - z_y, 0.0))
        tl.atomic_add(hits_ptr, ((best_i == y) & valid).to(tl.int32))
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(offs == y, p - 1.0, p) * keep  # in fp32, rounded once on the store
            tl.store(base + offs, g.to(z_ptr.dtype.element_ty), mask=offs < V)


def ce_chunk_pass(z_CV: torch.Tensor, labels_C: torch.Tensor):
    """(loss terms per row [C] fp32, hits (int32 scalar), d terms / d z [C, V]) of one chunk of
    logits z with labels; the gradient is written into z's buffer, which the caller gives up."""
    if z_CV.dim() != 2 or z_CV.stride(1) != 1:
        raise ValueError(f"ce_chunk_pass needs row-major [C, V] logits, got shape {tuple(z_CV.shape)} "
                         f"strides {z_CV.stride()}")
    C, V = z_CV.shape
    terms_C = torch.empty(C, dtype=torch.float32, device=z_CV.device)
    hits = torch.zeros((), dtype=torch.int32, device=z_CV.device)
    if C:
        _ce_rows[(C,)](z_CV, labels_C.contiguous(), terms_C, hits, V, z_CV.stride(0), **CONFIG)
    return terms_C, hits, z_CV
