"""Sampling and the acceptance rule of speculative decoding, as SGLang runs them (sglang 0.5.23).

    sp = SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
    token_B = sample(logits_BV, sp)                                  # plain decoding, first token
    n_B, emitted_BK1 = verify_drafts(draft_BK, q_BKV, logits_BK1V, sp, VerifyRule())
    stats = acceptance_stats(hist)                                   # acceptance length, per position

Greedy (temperature 0): a draft is accepted while it equals the target's argmax at the previous
position; the token after the last accepted draft is the target's argmax (the bonus).

Sampling, SGLang's default for EAGLE/NEXTN chain drafting ("target only", kernel
`TreeSpeculativeSamplingTargetOnly`): drafts are the head's top-1 tokens at every temperature.
The target's distribution at each verify position is p = softmax(logits / T), then top-k
renormalised, then top-p renormalised on that (min_p is not applied in verification). Draft d_i
is accepted when p_i(d_i) > 0 and (u_i < p_i(d_i) / threshold_acc or p_i(d_i) >= threshold_single),
one uniform u_i per position; both thresholds default to 1.0, i.e. accept with probability
p_i(d_i). At the first rejection the next token is drawn from p_i with the rejected token
removed (renormalised); after K acceptances the bonus is drawn from p_{K+1}. With one
deterministic draft per position this is exact: emitted tokens follow p.

`VerifyRule(kind="rejection")` is SGLang's `--speculative-use-rejection-sampling`: drafts are
sampled from the head's softmax(logits / T) and verified with classic speculative sampling
(accept with probability min(1, p/q), residual max(0, p - q)). Neither rule always accepts
more: when target and head are both uncertain, p/q accepts far more; when the target is sure
and the head is not, target-only can accept more. Compare drafters under the same rule.

Plain decoding and the first token of a request use SGLang's sampler: with min_p = 0, top-k and
top-p are applied jointly to softmax(logits / T) (a token is kept when it is among the top k and
inside the top-p nucleus of the unfiltered distribution); with min_p > 0, top-k renormalise,
top-p renormalise, then drop tokens below min_p times the largest probability.

No host syncs: the engine captures these functions in its CUDA graph (model/engine.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

VERIFY_RULES = ("target_only", "rejection")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. top_k <= 0 means all tokens (SGLang's -1)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k == 0:
            raise ValueError("top_k must be >= 1, or -1 for all tokens (0 is ambiguous)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)


def generation_config_sampling(model_dir: str | Path) -> dict:
    """The sampling keys (temperature, top_p, top_k, min_p) that a model's
    `generation_config.json` sets, as SGLang's `--sampling-defaults model` reads them; {} when the
    file is absent. ValueError when it is not JSON."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"cannot read '{path}': {exc}") from exc
    penalty = cfg.get("repetition_penalty")
    if penalty is not None and float(penalty) != 1.0:
        # SGLang's --sampling-defaults model reads it too and applies it to the target's logits in
        # plain decoding and in verification; this evaluator does not apply penalties
        log.warning("%s sets repetition_penalty=%s: SGLang applies it when a request does not set its own, this "
                    "evaluator does not, so acceptance can differ; serve with requests that set repetition_penalty "
                    "1.0 to compare like with like", path, penalty)
    return {k: cfg[k] for k in SAMPLING_KEYS if cfg.get(k) is not None}


def resolve_sampling(explicit: dict, model_dir: str | Path | None = None, source: str = "explicit") -> tuple[SamplingParams, dict]:
    """SamplingParams from explicit values (None = not given) and, with source="model", the
    target's generation_config.json for the keys not given; otherwise SGLang's request defaults
    (here: greedy). Returns (params, where each key came from)."""
    if source not in ("explicit", "model"):
        raise ValueError(f"sampling source {source!r}; choose 'explicit' or 'model'")
    model = generation_config_sampling(model_dir) if source == "model" and model_dir is not None else {}
    values, origin = {}, {}
    for key in SAMPLING_KEYS:
        if explicit.get(key) is not None:
            values[key], origin[key] = explicit[key], "explicit"
        elif key in model:
            values[key], origin[key] = model[key], "generation_config.json"
        else:
            origin[key] = "default"
    if "top_k" in values:
        values["top_k"] = int(values["top_k"])
    return SamplingParams(**values), origin


@dataclass(frozen=True)
class VerifyRule:
    """How drafts are verified at temperature > 0 (module docstring)."""

    kind: str = "target_only"  # target_only (SGLang's default) | rejection (p/q, sampled drafts)
    threshold_single: float = 1.0  # SGLang --speculative-accept-threshold-single
    threshold_acc: float = 1.0  # SGLang --speculative-accept-threshold-acc

    def __post_init__(self):
        if self.kind not in VERIFY_RULES:
            raise ValueError(f"verify rule {self.kind!r}; choose one of {VERIFY_RULES}")
        if not (0 < self.threshold_acc and 0 < self.threshold_single):
            raise ValueError("accept thresholds must be > 0")
        if self.kind == "rejection" and (self.threshold_acc, self.threshold_single) != (1.0, 1.0):
            raise ValueError("the accept thresholds apply to the target-only rule, not to rejection sampling")

    def as_dict(self) -> dict:
        return asdict(self)

    def draft_temperature(self, sp: SamplingParams) -> float:
        """The temperature a drafter samples at: 0 (its top-1 token) unless p/q rejection
        sampling at T > 0 needs sampled drafts and their distribution."""
        return sp.temperature if self.kind == "rejection" else 0.0


# ------------------------------------------------------------------------------ filters
def _sorted_top(probs_NV: torch.Tensor, top_k: int):
    """(values, ids) of the top_k tokens (all tokens when top_k <= 0), largest first."""
    V = probs_NV.shape[-1]
    if 0 < top_k < V:
        return probs_NV.topk(top_k, dim=-1)
    return probs_NV.sort(dim=-1, descending=True)


def _nucleus(vals_NK: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the (descending) values lie in the top-p nucleus: the exclusive cumulative sum
    is below top_p (the token that crosses top_p is kept)."""
    before = vals_NK.cumsum(-1) - vals_NK
    return before < top_p


def filtered_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Verification's target distribution [..., V] (fp32): softmax(logits / T), top-k
    renormalised, then top-p renormalised on that. No min_p (SGLang does not apply it here)."""
    probs = F.softmax(logits.float() / sp.temperature, dim=-1)
    if sp.top_k <= 0 and sp.top_p >= 1:
        return probs
    shape = probs.shape
    probs = probs.reshape(-1, shape[-1])
    vals, ids = _sorted_top(probs, sp.top_k)
    vals = vals / vals.sum(-1, keepdim=True)
    if sp.top_p < 1:
        vals = vals * _nucleus(vals, sp.top_p)
        vals = vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, ids, vals).reshape(shape)


def sampler_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The distribution SGLang's sampler draws plain-decoding tokens from [..., V] (fp32, not
    renormalised; module docstring)."""
    probs = F.softmax(logits.float() / sp.temperature, dim=-1)
    if sp.min_p > 0:
        probs = filtered_probs(logits, SamplingParams(sp.temperature, sp.top_p, sp.top_k))
        return probs * (probs >= sp.min_p * probs.amax(-1, keepdim=True))
    if sp.top_k <= 0 and sp.top_p >= 1:
        return probs
    shape = probs.shape
    probs = probs.reshape(-1, shape[-1])
    vals, ids = _sorted_top(probs, sp.top_k)
    if sp.top_p < 1:  # joint: the nucleus of the unfiltered distribution
        vals = vals * _nucleus(vals, sp.top_p)
    return torch.zeros_like(probs).scatter_(-1, ids, vals).reshape(shape)


def sample_from(weights: torch.Tensor) -> torch.Tensor:
    """One draw per row from unnormalised non-negative weights [..., V] (exponential race:
    argmax w_i / E_i, E_i ~ Exp(1)); no host sync, CUDA-graph safe."""
    e = torch.empty_like(weights, dtype=torch.float).exponential_(1).clamp_min_(1e-20)
    return (weights.float() / e).argmax(-1)


def sample(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """argmax at temperature 0, else a draw from `sampler_probs`."""
    if sp.greedy:
        return logits.argmax(-1)
    return sample_from(sampler_probs(logits, sp))


# ------------------------------------------------------------------------------ verification
def mode_acceptance(p_BKV: torch.Tensor, rule: VerifyRule) -> torch.Tensor:
    """[B, K]: the probability that the target-only rule accepts the target's own most likely
    token at each position, given the filtered target probabilities there. No deterministic
    draft can be accepted more often on the same context, so this is the ceiling of any top-1
    drafter (MTP head, n-gram) at T > 0; with the default thresholds it is the mode's probability."""
    p_mode = p_BKV.amax(-1)
    return torch.where(p_mode >= rule.threshold_single, 1.0, (p_mode / rule.threshold_acc).clamp(max=1.0))


def verify_drafts(draft_BK, draft_probs_BKV, logits_BK1V, sp: SamplingParams, rule: VerifyRule = VerifyRule(),
                  mode_accept_out: torch.Tensor | None = None):
    """The acceptance rule, a pure function. Returns (num_accepted_B, emitted_BK1):
    emitted[b, :n] are the accepted drafts, emitted[b, n] the bonus token; entries past n are
    meaningless. `logits_BK1V[:, i]` is the target at the position of verify token i
    (x_{t+1}, d_1, ..., d_K), i.e. it scores d_{i+1}; the last one gives the bonus after d_K.
    `draft_probs_BKV`: the drafts' distribution q for rule "rejection" (None = deterministic
    drafts, q one-hot); ignored by the target-only rule. `mode_accept_out` [B, K] (target-only
    rule at T > 0): filled with `mode_acceptance` of the verify positions that score drafts."""
    B, K = draft_BK.shape
    if sp.greedy:
        choice_BK1 = logits_BK1V.argmax(-1)
        n_B = (draft_BK == choice_BK1[:, :K]).int().cumprod(-1).sum(-1)
        return n_B, choice_BK1
    p_BK1V = filtered_probs(logits_BK1V, sp)
    V = p_BK1V.shape[-1]
    p_d = p_BK1V[:, :K].gather(-1, draft_BK[..., None]).squeeze(-1)  # [B, K]
    u_BK = torch.rand(B, K, device=p_d.device)
    at_n = None
    if rule.kind == "target_only":
        if mode_accept_out is not None:
            mode_accept_out.copy_(mode_acceptance(p_BK1V[:, :K], rule))
        accept_BK = (p_d > 0) & ((u_BK < p_d / rule.threshold_acc) | (p_d >= rule.threshold_single))
        n_B = accept_BK.int().cumprod(-1).sum(-1)
        at_n = n_B[:, None, None].expand(B, 1, V)
        p_n_BV = p_BK1V.gather(1, at_n).squeeze(1)
        # the rejected draft (when n < K) leaves the distribution; after K acceptances, p_{K+1}
        rejected_B = draft_BK.gather(1, n_B.clamp(max=K - 1)[:, None]).squeeze(1)
        keep_B1 = (n_B == K)[:, None].to(p_n_BV.dtype)
        pick_BV = p_n_BV.scatter(1, rejected_B[:, None], p_n_BV.gather(1, rejected_B[:, None]) * keep_B1)
    else:
        if draft_probs_BKV is None:  # (not F.one_hot: it may sync to check the ids on CUDA)
            q_BKV = torch.zeros_like(p_BK1V[:, :K]).scatter_(-1, draft_BK[..., None], 1.0)
        else:
            q_BKV = draft_probs_BKV.float()
        q_d = q_BKV.gather(-1, draft_BK[..., None]).squeeze(-1)
        accept_BK = u_BK * q_d < p_d  # u < p/q without dividing by q
        n_B = accept_BK.int().cumprod(-1).sum(-1)
        dist_BK1V = torch.cat([(p_BK1V[:, :K] - q_BKV).clamp_min(0), p_BK1V[:, K:]], dim=1)
        at_n = n_B[:, None, None].expand(B, 1, V)
        pick_BV = dist_BK1V.gather(1, at_n).squeeze(1)
    # no mass left (p == q, or a threshold rejected a certain token): fall back to p itself
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
