"""MTP training objective: next-next-token prediction over k recursive steps (design.md §3).

Label shift, written once here and nowhere else. Sequences are aligned on q = 0 .. T-2:

    step 1 at q:  head(embed(x_{q+1}), h_q)              -> predicts x_{q+2}
    step j at q:  head(embed(x_{q+1}), out_{j-1}[q-1])   -> predicts x_{q+2}

Step j reuses the head on its own output one position back, exactly as chain drafting does at
decode time (the token drafted at step j-1 is x_{q+1} under teacher forcing). Embeddings and labels
are therefore the same for every step; only the hidden input shifts. Step j is scored where
q >= j-1 and the label x_{q+2} is an assistant token (loss_mask[q+2] == 1).

Soft labels: the target's own distribution for x_{q+2} is softmax(lm_head(h_{q+1})), so it costs
one more chunked lm_head matmul and no extra target forward.

The vocabulary projection is done in token chunks under activation checkpointing, so full fp32
logits for every token never exist at once (151,936 columns make them the largest tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("ce", "kl", "ce+kl")


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


def vocab_loss(
    h_NH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    labels_N: torch.Tensor,
    soft_hidden_NH: torch.Tensor | None,
    loss_type: str,
    chunk_size: int,
    kl_weight: float = 1.0,
):
    """(sum of loss terms, hits) over N scored positions, chunked over tokens."""
    ce_sum = h_NH.new_zeros((), dtype=torch.float32)
    kl_sum = h_NH.new_zeros((), dtype=torch.float32)
    hits = torch.zeros((), dtype=torch.long, device=h_NH.device)
    n = h_NH.shape[0]
    chunk = n if chunk_size <= 0 else chunk_size
    for s in range(0, n, chunk):
        args = (
            h_NH[s : s + chunk],
            lm_head_weight_VH,
            labels_N[s : s + chunk],
            None if soft_hidden_NH is None else soft_hidden_NH[s : s + chunk],
            loss_type,
        )
        if torch.is_grad_enabled() and h_NH.requires_grad and chunk < n:
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
) -> LossOutput:
    """The k-step MTP loss for one batch. `hidden_BTH` is the target's post-norm hidden state."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
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
                loss_type, chunk_size, kl_weight,
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
