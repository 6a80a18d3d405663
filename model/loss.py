"""MTP training objective: next-next-token prediction over k recursive steps (docs/training.md).

Label shift, written once here and nowhere else. Sequences are aligned on q = 0 .. T-2:

    step 1 at q:  head(embed(x_{q+1}), h_q)              -> predicts x_{q+2}
    step j at q:  head(embed(x_{q+1}), out_{j-1}[q-1])   -> predicts x_{q+2}

Step j reuses the head on its own output one position back, exactly as chain drafting does at
decode time (the token drafted at step j-1 is x_{q+1} under teacher forcing). Embeddings and labels
are therefore the same for every step; only the hidden input shifts. Step j is scored where
q >= j-1 and the label x_{q+2} is an assistant token (loss_mask[q+2] == 1).

Soft labels: the target's own distribution for x_{q+2} is softmax(lm_head(h_{q+1})), so it costs
one more chunked lm_head matmul and no extra target forward.

The vocabulary projection is done in token chunks, so full fp32 logits for every token never exist
at once (151,936 columns make them the largest tensor). Two implementations (`VOCAB_IMPLS`):

  "fused"       (default) the lm_head is frozen, so the only gradient the loss needs is d loss / d h.
                `_FusedVocabLoss` computes it in the forward, chunk by chunk, from the softmax it has
                in hand: d/d logits = (b + c) p - b onehot(label) - c p_target (b = 1 with ce,
                c = kl_weight with kl), then grad_h = (d/d logits) @ W. It keeps only grad_h
                [N, H]; backward scales it by the incoming scalar. Two [C, H] x [H, V]-sized
                matmuls per chunk, and no [C, V] tensor survives its chunk.
  "checkpoint"  each chunk under activation checkpointing: autograd recomputes the logits matmul in
                backward (three matmuls per chunk). Kept as the reference and for the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("ce", "kl", "ce+kl")
VOCAB_IMPLS = ("fused", "checkpoint")
IGNORE_INDEX = -100  # fused path: a label < 0 scores nothing and gets zero gradient


def step_weights(num_steps: int, decay: float) -> list[float]:
    """FastMTP's beta^(j-1), normalised to sum to 1."""
    raw = [decay**j for j in range(num_steps)]
    total = sum(raw)
    return [w / total for w in raw]


def simulated_acceptance_length(acc: list[float]) -> float:
    """1 + sum_k prod_{j<=k} acc_j: expected tokens per verify step of chain drafting,
    the bonus token included (SGLang's avg_spec_accept_length)."""
    total, prod = 1.0, 1.0
    for a in acc:
        prod *= a
        total += prod
    return total


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, weighted over steps, differentiable
    step_loss: torch.Tensor  # [K] detached, mean per step
    correct: torch.Tensor  # [K] top-1 hits (sum), detached
    count: torch.Tensor  # [K] scored positions per step, detached


def _chunk_terms(h_NH, w_VH, labels_N, soft_NH, loss_type: str):
    """Sum of CE and KL over a chunk, plus top-1 hits. Logits in fp32, freed after use."""
    # cast to the head weight's dtype: under autocast the head hands back fp32 (bf16 lm_head)
    logits_NV = F.linear(h_NH.to(w_VH.dtype), w_VH).float()
    ce = torch.zeros((), device=h_NH.device, dtype=torch.float32)
    kl = torch.zeros((), device=h_NH.device, dtype=torch.float32)
    if loss_type == "ce":
        # logsumexp - logit[label]: no [N, V] log-prob tensor is written (it would double memory)
        lse_N = torch.logsumexp(logits_NV, dim=-1)
        ce = (lse_N - logits_NV.gather(1, labels_N[:, None]).squeeze(1)).sum()
    else:
        logp_NV = F.log_softmax(logits_NV, dim=-1)
        if loss_type == "ce+kl":
            ce = F.nll_loss(logp_NV, labels_N, reduction="sum")
        with torch.no_grad():
            logp_t_NV = F.log_softmax(F.linear(soft_NH.to(w_VH.dtype), w_VH).float(), dim=-1)
        kl = (logp_t_NV.exp() * (logp_t_NV - logp_NV)).sum()
    hits = (logits_NV.argmax(dim=-1) == labels_N).sum().detach()
    return ce, kl, hits


def _rowdot(a_CV: torch.Tensor, b_CV: torch.Tensor) -> torch.Tensor:
    """sum_v a[c, v] * b[c, v] as a batched GEMV: no [C, V] product tensor is written."""
    return torch.bmm(a_CV.unsqueeze(1), b_CV.unsqueeze(2)).view(-1)


def _fused_chunk(h_CH, w_VH, labels_C, soft_CH, loss_type: str, kl_weight: float, want_grad: bool):
    """(loss terms summed over the chunk, hits, grad_h [C, H] or None) for one token chunk.

    With logits z, log p = log_softmax(z), q = softmax(target logits), y = label:
      ce = -log p_y                              d ce / d z = p - onehot(y)
      kl = sum q log q - sum q log p             d kl / d z = p - q          (sum q = 1)
    Every [C, V] pass costs about as much as the matmul here, so there are few: log_softmax
    (fp32), exp, one write of the low-precision gradient that the second matmul reads.
    """
    with torch.autocast(h_CH.device.type, enabled=False):  # dtypes below are chosen on purpose
        return _fused_chunk_math(h_CH, w_VH, labels_C, soft_CH, loss_type, kl_weight, want_grad)


def _fused_chunk_math(h_CH, w_VH, labels_C, soft_CH, loss_type: str, kl_weight: float, want_grad: bool):
    use_ce, use_kl = loss_type in ("ce", "ce+kl"), loss_type in ("kl", "ce+kl")
    valid_C = labels_C >= 0
    safe_labels_C = labels_C.clamp_min(0)[:, None]  # [C, 1]
    terms_C = h_CH.new_zeros(h_CH.shape[0], dtype=torch.float32)
    q_CV = None
    if use_kl:  # the target's distribution first, so its log is freed before the head's exists
        logq_CV = F.log_softmax(F.linear(soft_CH.to(w_VH.dtype), w_VH), dim=-1, dtype=torch.float32)
        q_CV = logq_CV.exp()
        terms_C += kl_weight * _rowdot(q_CV, logq_CV)
        del logq_CV
    z_CV = F.linear(h_CH.to(w_VH.dtype), w_VH)  # [C, V] in the weight's dtype (bf16 on GPU)
    # the argmax of the bf16 logits is the argmax of their exact fp32 upcast
    hits = ((z_CV.argmax(dim=-1) == labels_C) & valid_C).sum()
    logp_CV = F.log_softmax(z_CV, dim=-1, dtype=torch.float32)
    del z_CV
    logp_y_C = logp_CV.gather(1, safe_labels_C).squeeze(1)
    if use_ce:
        terms_C -= logp_y_C
    if use_kl:
        terms_C -= kl_weight * _rowdot(q_CV, logp_CV)
    terms = torch.where(valid_C, terms_C, 0.0).sum()
    if not want_grad:
        return terms, hits, None
    c = kl_weight if use_kl else 0.0
    if not use_ce and c == 0.0:  # kl alone with kl_weight 0: nothing to learn from
        return terms, hits, torch.zeros_like(h_CH)
    # gradient buffer in the weight's dtype, each entry computed in fp32 and rounded once:
    #   ce     p                                  (label column: p_y - 1)
    #   kl     p - q, scaled by c on grad_h        (no label column)
    #   ce+kl  (1 + c) p - c q = lerp(p, q, -c)   (label column: (1 + c) p_y - 1 - c q_y)
    g_CV = torch.empty(logp_CV.shape, dtype=w_VH.dtype, device=logp_CV.device)
    if use_kl and use_ce:
        torch.lerp(logp_CV.exp_(), q_CV, -c, out=g_CV)
    elif use_kl:
        torch.sub(logp_CV.exp_(), q_CV, out=g_CV)
    else:
        torch.exp(logp_CV, out=g_CV)
    g_y_C = None
    if use_ce:
        g_y_C = (1.0 + c) * logp_y_C.exp() - 1.0
        if use_kl:
            g_y_C -= c * q_CV.gather(1, safe_labels_C).squeeze(1)
    del logp_CV, q_CV
    if g_y_C is not None:
        g_CV.scatter_(1, safe_labels_C, g_y_C[:, None].to(g_CV.dtype))
    grad_CH = torch.mm(g_CV, w_VH)  # the second (and last) big matmul
    row_scale_C = torch.where(valid_C, 1.0 if use_ce else c, 0.0)  # ignored labels: no gradient
    grad_CH.mul_(row_scale_C[:, None])
    return terms, hits, grad_CH.to(h_CH.dtype)


class _FusedVocabLoss(torch.autograd.Function):
    """Chunked vocabulary loss whose input gradient is computed in the forward (frozen lm_head)."""

    @staticmethod
    def forward(ctx, h_NH, w_VH, labels_N, soft_NH, loss_type, chunk, kl_weight):
        n = h_NH.shape[0]
        grad_NH = torch.empty_like(h_NH)
        terms = h_NH.new_zeros((), dtype=torch.float32)
        hits = torch.zeros((), dtype=torch.long, device=h_NH.device)
        for s in range(0, n, chunk):
            t, hit, grad_CH = _fused_chunk(
                h_NH[s : s + chunk], w_VH, labels_N[s : s + chunk],
                None if soft_NH is None else soft_NH[s : s + chunk], loss_type, kl_weight, want_grad=True,
            )
            grad_NH[s : s + chunk] = grad_CH
            terms += t
            hits += hit
        ctx.save_for_backward(grad_NH)
        ctx.mark_non_differentiable(hits)
        return terms, hits

    @staticmethod
    def backward(ctx, grad_terms, _grad_hits):
        (grad_NH,) = ctx.saved_tensors
        return grad_NH * grad_terms.to(grad_NH.dtype), None, None, None, None, None, None


def vocab_loss(
    h_NH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    labels_N: torch.Tensor,
    soft_hidden_NH: torch.Tensor | None,
    loss_type: str,
    chunk_size: int,
    kl_weight: float = 1.0,
    impl: str = "fused",
):
    """(sum of loss terms, hits) over N scored positions, chunked over tokens.

    The lm_head weight gets no gradient (it is the frozen target's). `impl` picks how the
    gradient w.r.t. h_NH is obtained when one is needed (module docstring); without grad both
    run the same forward.
    """
    if impl not in VOCAB_IMPLS:
        raise ValueError(f"vocab loss impl must be one of {VOCAB_IMPLS}, got {impl!r}")
    n = h_NH.shape[0]
    chunk = n if chunk_size <= 0 else chunk_size
    need_grad = torch.is_grad_enabled() and h_NH.requires_grad
    if need_grad and impl == "fused":
        if lm_head_weight_VH.requires_grad:
            raise ValueError("the fused vocabulary loss gives the lm_head no gradient; freeze it "
                             "(it is the target's) or use impl='checkpoint'")
        soft = None if soft_hidden_NH is None else soft_hidden_NH.detach()
        return _FusedVocabLoss.apply(h_NH, lm_head_weight_VH.detach(), labels_N, soft, loss_type, chunk, kl_weight)
    if not need_grad and impl == "fused":  # evaluation: values only, same arithmetic as training
        terms = h_NH.new_zeros((), dtype=torch.float32)
        hits = torch.zeros((), dtype=torch.long, device=h_NH.device)
        for s in range(0, n, chunk):
            t, hit, _ = _fused_chunk(
                h_NH[s : s + chunk], lm_head_weight_VH, labels_N[s : s + chunk],
                None if soft_hidden_NH is None else soft_hidden_NH[s : s + chunk],
                loss_type, kl_weight, want_grad=False,
            )
            terms, hits = terms + t, hits + hit
        return terms, hits
    ce_sum = h_NH.new_zeros((), dtype=torch.float32)
    kl_sum = h_NH.new_zeros((), dtype=torch.float32)
    hits = torch.zeros((), dtype=torch.long, device=h_NH.device)
    for s in range(0, n, chunk):
        args = (
            h_NH[s : s + chunk],
            lm_head_weight_VH,
            labels_N[s : s + chunk],
            None if soft_hidden_NH is None else soft_hidden_NH[s : s + chunk],
            loss_type,
        )
        if need_grad and chunk < n:
            ce, kl, hit = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            ce, kl, hit = _chunk_terms(*args)
        ce_sum = ce_sum + ce
        kl_sum = kl_sum + kl
        hits = hits + hit
    return ce_sum + kl_weight * kl_sum, hits


def mtp_loss(
    head,
    embed_tokens,
    lm_head,
    input_ids_BT: torch.Tensor,
    hidden_BTH: torch.Tensor,
    loss_mask_BT: torch.Tensor,
    *,
    num_steps: int = 1,
    step_decay: float = 0.6,
    loss_type: str = "ce",
    kl_weight: float = 1.0,
    chunk_size: int = 4096,
    vocab_impl: str = "fused",
) -> LossOutput:
    """The k-step MTP loss for one batch. `hidden_BTH` is the target's post-norm hidden state.
    `vocab_impl`: "fused" (training) or "checkpoint" (the reference; module docstring)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if vocab_impl not in VOCAB_IMPLS:
        raise ValueError(f"vocab loss impl must be one of {VOCAB_IMPLS}, got {vocab_impl!r}")
    B, T = input_ids_BT.shape
    if T < 3:
        raise ValueError(f"sequences of length {T} hold no next-next-token label; need >= 3 tokens")
    L = T - 1  # aligned positions q = 0..T-2
    weights = step_weights(num_steps, step_decay)
    param = next(head.parameters())
    with torch.no_grad():
        embeds_BLH = embed_tokens(input_ids_BT[:, 1:]).to(param.dtype)  # e(x_{q+1})
    hidden_BLH = hidden_BTH[:, :L].to(param.dtype)  # h_q
    # labels x_{q+2} for q = 0..T-3; the last aligned position has no label
    labels_BL = torch.zeros(B, L, dtype=torch.long, device=input_ids_BT.device)
    labels_BL[:, : L - 1] = input_ids_BT[:, 2:]
    label_mask_BL = torch.zeros(B, L, dtype=torch.bool, device=input_ids_BT.device)
    label_mask_BL[:, : L - 1] = loss_mask_BT[:, 2:].bool()
    position_ids_BL = torch.arange(L, device=input_ids_BT.device).unsqueeze(0).expand(B, L)
    soft_BLH = hidden_BTH[:, 1:].to(param.dtype) if loss_type != "ce" else None  # h_{q+1}
    w_VH = lm_head.weight

    total = hidden_BLH.new_zeros((), dtype=torch.float32)
    step_loss, correct, count = [], [], []
    # all k steps in one head call (the recursion is in MTPHead.forward; ZeRO-3 needs one entry)
    outs = head(embeds_BLH, hidden_BLH, position_ids_BL, num_steps=num_steps)
    for j, out_BLH in enumerate(outs):
        mask_BL = label_mask_BL.clone()
        mask_BL[:, :j] = False  # step j+1 needs an output of step j at q-1
        n = int(mask_BL.sum())
        if n > 0:
            terms, hits = vocab_loss(
                out_BLH[mask_BL], w_VH, labels_BL[mask_BL],
                None if soft_BLH is None else soft_BLH[mask_BL],
                loss_type, chunk_size, kl_weight, vocab_impl,
            )
            mean = terms / n
            total = total + weights[j] * mean
        else:  # keep the graph connected so every rank runs the same backward
            mean = out_BLH.sum() * 0.0
            total = total + mean
            hits = torch.zeros((), dtype=torch.long, device=out_BLH.device)
        step_loss.append(mean.detach().float())
        correct.append(hits)
        count.append(torch.tensor(n, device=out_BLH.device))
    return LossOutput(
        loss=total,
        step_loss=torch.stack(step_loss),
        correct=torch.stack(correct).float(),
        count=torch.stack(count).float(),
    )
