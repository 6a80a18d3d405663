"""The acceptance rule of speculative decoding, as pure functions on device tensors.

    n_B, emitted_BK1 = verify_drafts(draft_BK, draft_probs_BKV, logits_BK1V, temperature)
    stats = acceptance_stats(hist)           # acceptance length, per-position rates

No host syncs: the engine captures these in its CUDA graph (model/engine.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

def sample_from(weights: torch.Tensor) -> torch.Tensor:
    """One draw per row from unnormalised non-negative weights [..., V] (exponential race:
    argmax w_i / E_i, E_i ~ Exp(1)); no host sync, CUDA-graph safe."""
    e = torch.empty_like(weights, dtype=torch.float).exponential_(1).clamp_min_(1e-20)
    return (weights.float() / e).argmax(-1)


def sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """argmax at temperature 0, else a draw from softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(-1)
    return sample_from(F.softmax(logits.float() / temperature, dim=-1))


def verify_drafts(draft_BK, draft_probs_BKV, logits_BK1V, temperature: float):
    """The acceptance rule, a pure function. Returns (num_accepted_B, emitted_BK1):
    emitted[b, :n] are the accepted drafts, emitted[b, n] the bonus token; entries past n are
    meaningless. `logits_BK1V[:, i]` is the target at the position of verify token i
    (x_{t+1}, d_1, ..., d_K), i.e. it scores d_{i+1}; the last one gives the bonus after d_K.

    T == 0: accept while d_i == argmax of the target at the previous position.
    T > 0 (speculative sampling; emitted tokens are distributed as the target's samples):
      accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample
      the bonus from norm(max(0, p_i - q_i)); after K acceptances sample it from p_{K+1}.
      `draft_probs_BKV` = the draft's q_i (None = a deterministic draft, q one-hot).
    """
    B, K = draft_BK.shape
    if temperature == 0:
        choice_BK1 = logits_BK1V.argmax(-1)
        n_B = (draft_BK == choice_BK1[:, :K]).int().cumprod(-1).sum(-1)
        return n_B, choice_BK1
    p_BK1V = F.softmax(logits_BK1V.float() / temperature, dim=-1)
    V = p_BK1V.shape[-1]
    p_d = p_BK1V[:, :K].gather(-1, draft_BK[..., None]).squeeze(-1)
    if draft_probs_BKV is None:  # (not F.one_hot: it may sync to check the ids on CUDA)
        q_BKV = torch.zeros_like(p_BK1V[:, :K]).scatter_(-1, draft_BK[..., None], 1.0)
    else:
        q_BKV = draft_probs_BKV.float()
    q_d = q_BKV.gather(-1, draft_BK[..., None]).squeeze(-1)
    accept_BK = torch.rand(B, K, device=p_d.device) * q_d < p_d  # u < p/q without dividing by q
    n_B = accept_BK.int().cumprod(-1).sum(-1)
    dist_BK1V = torch.cat([(p_BK1V[:, :K] - q_BKV).clamp_min(0), p_BK1V[:, K:]], dim=1)
    at_n = n_B[:, None, None].expand(B, 1, V)
    pick_BV = dist_BK1V.gather(1, at_n).squeeze(1)
    # p == q leaves no residual mass; a rejection is then (up to rounding) impossible, use p
    pick_BV = torch.where(pick_BV.sum(-1, keepdim=True) > 0, pick_BV, p_BK1V.gather(1, at_n).squeeze(1))
    emitted_BK1 = torch.cat([draft_BK, draft_BK[:, :1]], dim=1).scatter(1, n_B[:, None], sample_from(pick_BV)[:, None])
    return n_B, emitted_BK1


def acceptance_stats(hist: list[int]) -> dict:
    """Acceptance numbers from a histogram: hist[n] = verify steps that accepted n drafts
    (emitted n+1 tokens, the bonus included). Per-position rates:
      conditional   accepted at position i / steps that reached position i (drafts 1..i-1 accepted)
      unconditional accepted at position i / all verify steps (SGLang-style)."""
    K = len(hist) - 1
    steps = sum(hist)
    accepted_at = [sum(hist[i + 1:]) for i in range(K)]  # steps with >= i+1 accepted drafts
    reached = [steps] + accepted_at[:-1]
    return {
        "verify_steps": steps,
        "acceptance_length": (sum((n + 1) * c for n, c in enumerate(hist)) / steps) if steps else None,
        "per_position_acceptance": [a / r if r else None for a, r in zip(accepted_at, reached)],
        "per_position_acceptance_unconditional": [a / steps if steps else None for a in accepted_at],
        "accept_histogram": list(hist),
    }
