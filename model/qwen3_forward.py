"""Our single-device Qwen3-MoE decoder-layer forward, over transformers' parameters.

    lw = LayerWeights.of(layer, device, dtype)      # views of one layer's tensors, q/k/v fused
    x_BTH = decoder_layer(x_BTH, lw, Dims.of(config), kv_cache, cos, sin, mask, bidx, pos, "grouped_mm")

Used by the decoding engine (model/engine.py: prefill, verify and draft steps, with a static KV
cache) and by the frozen target's lean training forward (model/target.py, no cache). Tested
against transformers' `Qwen3MoeDecoderLayer`: same router (softmax in fp32, top-k,
renormalised), same norms, same RoPE tables (taken from the model's own rotary module).

Three expert implementations for the torch path (`EXPERT_IMPLS`): "loop" (transformers' eager
order; one host sync), "gather" (bmm over gathered expert weights; a handful of tokens only)
and "grouped_mm" (model/fast_moe.py). `decoder_layer_triton` is the same layer in the Triton
kernels of model/linear_kernels.py, attn_kernels.py and moe_kernels.py, for decode-sized steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from model import attn_kernels, linear_kernels, moe_kernels
from model.fast_moe import experts_grouped

EXPERT_IMPLS = ("loop", "gather", "grouped_mm")  # the torch path's MoE experts

class Dims(NamedTuple):
    """The per-layer numbers our forward needs (constants for torch.compile)."""

    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    top_k: int
    norm_topk: bool

    @classmethod
    def of(cls, config) -> "Dims":
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r}: the decoder supports Qwen3-MoE's silu only")
        if getattr(config, "attention_bias", False):
            raise ValueError("attention_bias=True: the decoder supports Qwen3-MoE's bias-free attention only")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_attention_heads, config.num_key_value_heads, head_dim, config.rms_norm_eps,
                   config.num_experts_per_tok, bool(config.norm_topk_prob))


class LayerWeights(NamedTuple):
    """One decoder layer's tensors (views of the transformers parameters, q/k/v fused).
    A NamedTuple: torch.compile guards on its tensors' shapes, not on the object, so every
    layer runs the same compiled graph."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(n_heads + 2 n_kv) * D, H]
    qk_norm: torch.Tensor  # [n_heads + n_kv, D]: q_norm for each q head, then k_norm for each kv head
    o: torch.Tensor
    post_norm: torch.Tensor
    router: torch.Tensor | None  # [E, H]; None for a dense MLP layer (mlp_only_layers)
    gate_up: torch.Tensor  # experts [E, 2I, H] (gate rows first) or dense [2I, H]
    down: torch.Tensor  # experts [E, H, I] or dense [H, I]

    @classmethod
    def of(cls, layer, device, dtype) -> "LayerWeights":
        def t(p):
            return p.detach().to(device=device, dtype=dtype)

        attn, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([t(attn.q_proj.weight), t(attn.k_proj.weight), t(attn.v_proj.weight)], dim=0)
        n_q = attn.q_proj.weight.shape[0] // attn.head_dim
        n_kv = attn.k_proj.weight.shape[0] // attn.head_dim
        qk_norm = torch.cat([t(attn.q_norm.weight).expand(n_q, -1), t(attn.k_norm.weight).expand(n_kv, -1)])
        if hasattr(mlp, "experts"):
            router, gate_up, down = t(mlp.gate.weight), t(mlp.experts.gate_up_proj), t(mlp.experts.down_proj)
        else:
            router = None
            gate_up = torch.cat([t(mlp.gate_proj.weight), t(mlp.up_proj.weight)], dim=0)
            down = t(mlp.down_proj.weight)
        return cls(t(layer.input_layernorm.weight), qkv, qk_norm, t(attn.o_proj.weight),
                   t(layer.post_attention_layernorm.weight), router, gate_up, down)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3MoeRMSNorm (weight * x_hat, statistics in fp32). torch's fused kernel on CUDA: one
    launch instead of seven; it scales before the cast to bf16, transformers after (rounding)."""
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _experts_loop(x_NH, idx_Nk, w_Nk, gate_up, down):
    """transformers' eager loop (experts in increasing order, index_add); one host sync."""
    out = torch.zeros_like(x_NH)
    for e in idx_Nk.unique().tolist():
        tok, slot = torch.where(idx_Nk == e)
        gate, up = F.linear(x_NH[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * w_Nk[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def _experts_gather(x_NH, idx_Nk, w_Nk, gate_up, down):
    """bmm over the selected experts' weights, gathered per (token, slot): no sync, but copies
    N*k expert matrices; only for a handful of tokens."""
    N, k = idx_Nk.shape
    flat = idx_Nk.reshape(-1)
    x_MH = x_NH[:, None].expand(N, k, x_NH.shape[-1]).reshape(N * k, -1)
    gate, up = torch.bmm(gate_up[flat], x_MH[:, :, None]).squeeze(-1).chunk(2, dim=-1)
    y_MH = torch.bmm(down[flat], (F.silu(gate) * up)[:, :, None]).squeeze(-1)
    return (y_MH.view(N, k, -1) * w_Nk[..., None]).sum(1)


# grouped_mm: model/fast_moe.py, shared with the training-time target forward
_EXPERTS = {"loop": _experts_loop, "gather": _experts_gather, "grouped_mm": experts_grouped}


def mlp(x_BTH, lw: LayerWeights, d: Dims, experts: str):
    B, T, H = x_BTH.shape
    x_NH = x_BTH.reshape(-1, H)
    if lw.router is None:
        gate, up = F.linear(x_NH, lw.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, lw.down).view(B, T, H)
    # transformers' router: softmax in fp32 -> top-k -> renormalise -> model dtype
    logits_NE = F.linear(x_NH, lw.router)
    probs_NE = F.softmax(logits_NE, dim=-1, dtype=torch.float)
    w_Nk, idx_Nk = torch.topk(probs_NE, d.top_k, dim=-1)
    if d.norm_topk:
        w_Nk = w_Nk / w_Nk.sum(-1, keepdim=True)
    out = _EXPERTS[experts](x_NH, idx_Nk, w_Nk.to(x_BTH.dtype), lw.gate_up, lw.down)
    return out.view(B, T, H)


def attention(x_BTH, lw: LayerWeights, d: Dims, kv_cache, cos, sin, mask, bidx, pos):
    """Writes this call's K/V at (row, position) and attends to the row's cache.

    kv_cache [2, B, n_kv, S, D] (k then v: one index_put writes both); cos/sin [B, T, 1, D];
    pos/bidx [B, T].
    mask None = prefill (the cache held nothing: causal attention over the new tokens);
    otherwise an additive mask [B, 1, G*T, S] for the query heads grouped per kv head.
    kv_cache None (with mask None): a prefill that keeps no cache (FrozenTarget's lean forward).
    """
    B, T, _ = x_BTH.shape
    nq, nkv, D = d.n_heads, d.n_kv, d.head_dim
    qk, v = F.linear(x_BTH, lw.qkv).split([(nq + nkv) * D, nkv * D], dim=-1)
    # q_norm / k_norm and RoPE on the q and k heads together (fewer kernels when not compiled);
    # the weight multiplies the bf16 x_hat, as transformers does
    qk = F.rms_norm(qk.view(B, T, nq + nkv, D), (D,), eps=d.eps) * lw.qk_norm
    qk = qk * cos + _rotate_half(qk) * sin
    q, k = qk.split([nq, nkv], dim=2)
    v = v.view(B, T, nkv, D)
    # advanced indices at dims 1 and 3 (split by a slice) go first: the value is [B, T, 2, nkv, D]
    if kv_cache is not None:
        kv_cache[:, bidx, :, pos] = torch.stack([k, v], dim=2)
    if mask is None:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True, scale=D**-0.5)
        o = o.transpose(1, 2)  # [B, T, nq, D]
    else:
        # q head h = kv * G + g reads kv head `kv` (transformers' repeat_kv order): fold the G
        # query heads of a kv head into the query axis instead of repeating K/V.
        G = nq // nkv
        qg = q.view(B, T, nkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, nkv, G * T, D)
        o = F.scaled_dot_product_attention(qg, kv_cache[0], kv_cache[1], attn_mask=mask, scale=D**-0.5)
        o = o.view(B, nkv, G, T, D).permute(0, 3, 1, 2, 4)
    return F.linear(o.reshape(B, T, nq * D), lw.o)


def decoder_layer_triton(x_BTH, lw: LayerWeights, d: Dims, kv_cache, cos_SD, sin_SD, pos_BT):
    """One decoder layer of a decode-sized step in Triton kernels (modules' docstrings): the
    q/k/v and o projections, q/k norm + RoPE + cache write, attention, residual add + norm +
    router, and the experts with the weighted slot sum and residual add. cos/sin are the whole
    [S, D] tables (the kernels read the rows at pos). Not for dense (mlp_only) layers."""
    B, T, H = x_BTH.shape
    qkv = linear_kernels.linear(x_BTH, lw.qkv, norm_w=lw.input_norm, eps=d.eps)  # input RMSNorm inside
    q = attn_kernels.qk_prep(qkv, lw.qk_norm, cos_SD, sin_SD, kv_cache, pos_BT, d.eps, d.n_heads, d.n_kv)
    a = linear_kernels.linear(attn_kernels.decode_attention(q, kv_cache, pos_BT, d.n_kv), lw.o)
    h, hn, ids, wts = moe_kernels.router(x_BTH.reshape(-1, H), a.reshape(-1, H), lw.post_norm, lw.router, d.eps,
                                         d.top_k, d.norm_topk)
    return moe_kernels.experts(hn, ids, wts, h, lw.gate_up, lw.down).view(B, T, H)


def decoder_layer_big_step(x_BTH, lw: LayerWeights, d: Dims, kv_cache, cos_SD, sin_SD, pos_BT, experts: str):
    """One decoder layer of a step too big for the Triton GEMV and expert kernels (regeneration at
    batch 256, say): torch linears and experts, with the Triton q/k prep and attention, which
    read each row's cache only up to its position (SDPA with a mask reads all S slots of every
    row: half of such a step's time on an H200)."""
    qkv = F.linear(rms_norm(x_BTH, lw.input_norm, d.eps), lw.qkv)
    q = attn_kernels.qk_prep(qkv, lw.qk_norm, cos_SD, sin_SD, kv_cache, pos_BT, d.eps, d.n_heads, d.n_kv)
    h = x_BTH + F.linear(attn_kernels.decode_attention(q, kv_cache, pos_BT, d.n_kv), lw.o)
    return h + mlp(rms_norm(h, lw.post_norm, d.eps), lw, d, experts)


def decoder_layer(x_BTH, lw: LayerWeights, d: Dims, kv_cache, cos, sin, mask, bidx, pos, experts: str):
    """One Qwen3-MoE decoder layer (pre-norm attention + pre-norm MoE, residuals)."""
    h = x_BTH + attention(rms_norm(x_BTH, lw.input_norm, d.eps), lw, d, kv_cache, cos, sin, mask, bidx, pos)
    return h + mlp(rms_norm(h, lw.post_norm, d.eps), lw, d, experts)


def step_mask(pos_BT: torch.Tensor, S: int, G: int, dtype) -> torch.Tensor:
    """Additive mask [B, 1, G*T, S]: query (b, t) sees slots 0..pos[b, t]."""
    B, T = pos_BT.shape
    allowed = torch.arange(S, device=pos_BT.device)[None, None, :] <= pos_BT[:, :, None]
    m = torch.zeros(B, T, S, dtype=dtype, device=pos_BT.device).masked_fill_(~allowed, float("-inf"))
    return m[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)


def rope_table(rotary, S: int, device, dtype):
    """cos/sin [S, D] from the model's own rotary module (same numerics, any rope type)."""
    pos = torch.arange(S, device=rotary.inv_freq.device)[None]
    cos, sin = rotary(torch.zeros((), dtype=dtype, device=rotary.inv_freq.device), pos)
    return cos[0].to(device), sin[0].to(device)
