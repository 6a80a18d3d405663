"""Speculative decoding with the MTP head (SGLang NEXTN chain drafting), and plain decoding.

    python scripts/eval_acceptance.py --target DIR --mtp DIR --prompts FILE --steps 3
    report = evaluate(target, head, tokenizer, prompts, steps=3)   # what train/ calls

One verify step for each row, t = the last position in the target's KV cache
(h_t = the target's post-norm hidden state there, x_{t+1} = the token after it, not yet cached):

    draft   d_1 = head(e(x_{t+1}), h_t)        at position t        (logits = target lm_head(h'))
            d_j = head(e(d_{j-1}), h'_{j-1})   at position t+j-1    j = 2..K
    verify  target([x_{t+1}, d_1 .. d_K])      at positions t+1 .. t+K+1, ONE forward
    accept  T=0: longest prefix with d_i == the target's argmax at the previous position;
            T>0: speculative sampling (accept d_i w.p. min(1, p/q), else sample norm(max(0, p-q)))
            then one bonus token: n accepted drafts emit n+1 tokens
    extend  the head's cache slots t+1 .. t+n+1 are recomputed from the TARGET's hidden states of
            the accepted tokens ("draft extend", as SGLang does); its output at slot t+n+1 is the
            next step's d_1. Rejected KV entries (target and head) are rolled back by lengths only.

Invariant: the head's cache slot s holds the layer K/V of input (e(x_{s+1}), h_s), h_s the
target's. That is the training label shift of model/loss.py: position q of step 1 reads
(e(x_{q+1}), h_q) and predicts x_{q+2}.

Engine design (gpt-fast style, style.md §5):
- our own Qwen3-MoE forward over the transformers modules' parameters (`TargetLM`, `MTPHeadLM`),
  tested against `Qwen3MoeForCausalLM` and `MTPHead.forward`;
- static KV caches [layers, B, kv_heads, S, head_dim]; every row has its own positions, new
  tokens are written at their positions and attention masks key slots > the query's position,
  so stale entries past a row's length are never read and rollback is free;
- the whole step (K-1 draft forwards + verify + acceptance + extend + bookkeeping) runs on
  device; on CUDA it is captured as one CUDA graph per engine; exactly one host sync per step
  (`finished.all()`);
- plain greedy decoding with the same engine is the baseline and the lossless reference;
- kernels="triton" (the default on CUDA when Triton is installed): decode-sized steps run each
  layer in nine Triton kernels (model/linear_kernels.py, attn_kernels.py, moe_kernels.py) instead
  of ~20 torch kernels; their tiles do not depend on the step's token count, so a verify step
  computes the same numbers as plain decoding of the same token. kernels="torch" is the torch
  path (SDPA, cuBLAS, `experts` = grouped_mm on CUDA), which prefill always uses.

Footguns: the target's and head's KV writes of finished rows are harmless (lengths frozen);
`Engine`s built on the same `TargetLM` share its cache: the newest one invalidates the others.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from model import attn_kernels, linear_kernels, moe_kernels
from model.fast_moe import experts_grouped
from model.head import MTPHead, head_param_shapes
from model.target import FrozenTarget

IM_END_ID = 151645  # <|im_end|>, the Qwen3 chat end of turn
EXPERT_IMPLS = ("loop", "gather", "grouped_mm")  # the torch path's MoE experts
# "triton": decode-sized steps (<= MAX_STEP_TOKENS tokens) run model/attn_kernels.py,
# model/moe_kernels.py and model/linear_kernels.py; the prefill and bigger steps the torch path
KERNEL_IMPLS = ("torch", "triton")
MAX_STEP_TOKENS = min(moe_kernels.MAX_TOKENS, linear_kernels.MAX_TOKENS)
CACHE_ALIGN = 16  # slots; keeps SDPA's attention-mask rows aligned for the fused kernels


# ============================================================================ model math
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


def _mlp(x_BTH, lw: LayerWeights, d: Dims, experts: str):
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


def _attention(x_BTH, lw: LayerWeights, d: Dims, kv_cache, cos, sin, mask, bidx, pos):
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


def decoder_layer(x_BTH, lw: LayerWeights, d: Dims, kv_cache, cos, sin, mask, bidx, pos, experts: str):
    """One Qwen3-MoE decoder layer (pre-norm attention + pre-norm MoE, residuals)."""
    h = x_BTH + _attention(rms_norm(x_BTH, lw.input_norm, d.eps), lw, d, kv_cache, cos, sin, mask, bidx, pos)
    return h + _mlp(rms_norm(h, lw.post_norm, d.eps), lw, d, experts)


def _step_mask(pos_BT: torch.Tensor, S: int, G: int, dtype) -> torch.Tensor:
    """Additive mask [B, 1, G*T, S]: query (b, t) sees slots 0..pos[b, t]."""
    B, T = pos_BT.shape
    allowed = torch.arange(S, device=pos_BT.device)[None, None, :] <= pos_BT[:, :, None]
    m = torch.zeros(B, T, S, dtype=dtype, device=pos_BT.device).masked_fill_(~allowed, float("-inf"))
    return m[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)


def _rope_table(rotary, S: int, device, dtype):
    """cos/sin [S, D] from the model's own rotary module (same numerics, any rope type)."""
    pos = torch.arange(S, device=rotary.inv_freq.device)[None]
    cos, sin = rotary(torch.zeros((), dtype=dtype, device=rotary.inv_freq.device), pos)
    return cos[0].to(device), sin[0].to(device)


class _Stack:
    """Decoder layers + static KV cache + RoPE table: the part the target and the head share."""

    def __init__(self, layers: list[LayerWeights], dims: Dims, rotary, device, dtype, experts: str | None, compile: bool,
                 kernels: str | None = None):
        self.layers, self.dims, self.rotary = layers, dims, rotary
        self.device, self.dtype = torch.device(device), dtype
        cuda = self.device.type == "cuda"
        self.experts_step = experts or ("grouped_mm" if cuda else "loop")
        self.experts_prefill = "grouped_mm" if cuda else "loop"
        if self.experts_step not in EXPERT_IMPLS:
            hint = " (the Triton kernels are kernels='triton')" if self.experts_step == "triton" else ""
            raise ValueError(f"experts={self.experts_step!r}; choose one of {EXPERT_IMPLS}{hint}")
        self.kernels = check_kernels(kernels, self.device, dims)
        self.layer_step = decoder_layer
        self.layer_triton = decoder_layer_triton
        if compile:
            # one compiled graph per (B, T) shape, shared by all layers (weights are arguments)
            dyn = torch._dynamo.config
            limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
            setattr(dyn, limit, max(getattr(dyn, limit), 64))
            self.layer_step = torch.compile(decoder_layer, dynamic=False, fullgraph=True)
            self.layer_triton = torch.compile(decoder_layer_triton, dynamic=False, fullgraph=True)
        self.kv_cache = None  # [layers, 2 (k, v), B, n_kv, S, D]
        self.cache_version = 0

    @property
    def k_cache(self):  # [layers, B, n_kv, S, D] views
        return None if self.kv_cache is None else self.kv_cache[:, 0]

    @property
    def v_cache(self):
        return None if self.kv_cache is None else self.kv_cache[:, 1]

    def allocate(self, batch_size: int, max_len: int) -> None:
        d = self.dims
        shape = (len(self.layers), 2, batch_size, d.n_kv, max_len, d.head_dim)
        self.kv_cache = None  # free the old cache first
        self.kv_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.cos, self.sin = _rope_table(self.rotary, max_len, self.device, self.dtype)
        self.cache_version += 1

    def run(self, x_BTH, pos_BT, prefill: bool):
        if self.kv_cache is None:
            raise RuntimeError("call allocate(batch_size, max_len) before forward")
        B, T = pos_BT.shape
        assert B == self.kv_cache.shape[2], f"batch {B} != cache batch {self.kv_cache.shape[2]}"
        if not prefill and self.kernels == "triton" and B * T <= MAX_STEP_TOKENS:
            for i, lw in enumerate(self.layers):  # (dense mlp_only layers: the torch path)
                if lw.router is None:
                    cos, sin = self.cos[pos_BT].unsqueeze(2), self.sin[pos_BT].unsqueeze(2)
                    bidx = torch.arange(B, device=pos_BT.device)[:, None].expand(B, T)
                    mask = _step_mask(pos_BT, self.kv_cache.shape[4], self.dims.n_heads // self.dims.n_kv, x_BTH.dtype)
                    x_BTH = self.layer_step(x_BTH, lw, self.dims, self.kv_cache[i], cos, sin, mask, bidx, pos_BT,
                                            self.experts_step)
                else:
                    x_BTH = self.layer_triton(x_BTH, lw, self.dims, self.kv_cache[i], self.cos, self.sin, pos_BT)
            return x_BTH
        cos, sin = self.cos[pos_BT].unsqueeze(2), self.sin[pos_BT].unsqueeze(2)
        bidx = torch.arange(B, device=pos_BT.device)[:, None].expand(B, T)
        if prefill:
            mask, layer_fn, experts = None, decoder_layer, self.experts_prefill
        else:
            mask = _step_mask(pos_BT, self.kv_cache.shape[4], self.dims.n_heads // self.dims.n_kv, x_BTH.dtype)
            layer_fn, experts = self.layer_step, self.experts_step
        for i, lw in enumerate(self.layers):
            x_BTH = layer_fn(x_BTH, lw, self.dims, self.kv_cache[i], cos, sin, mask, bidx, pos_BT, experts)
        return x_BTH

    def linear(self, x, w, fp32: bool = False):
        """F.linear, or the Triton GEMV for decode-sized x (kernels="triton"); fp32 = logits."""
        if self.kernels == "triton" and x.numel() // x.shape[-1] <= MAX_STEP_TOKENS:
            return linear_kernels.linear(x, w, fp32)
        y = F.linear(x, w)
        return y.float() if fp32 else y


def default_kernels(device) -> str:
    """"triton" on a CUDA device when Triton is installed, else "torch"."""
    return "triton" if torch.device(device).type == "cuda" and moe_kernels.available(device) else "torch"


def check_kernels(kernels: str | None, device, dims: Dims | None = None) -> str:
    """The kernels setting for `device` (None = default_kernels), or a ValueError saying why not."""
    kernels = kernels or default_kernels(device)
    if kernels not in KERNEL_IMPLS:
        raise ValueError(f"kernels={kernels!r}; choose one of {KERNEL_IMPLS}")
    if kernels == "triton":
        if not moe_kernels.available(device):
            raise ValueError(f"kernels='triton' needs triton and a CUDA device (got {torch.device(device)}; on CPU "
                             "only under TRITON_INTERPRET=1); use kernels='torch'")
        if dims is not None and (dims.head_dim & (dims.head_dim - 1) or dims.head_dim < 16):
            raise ValueError(f"kernels='triton' needs a power-of-two head_dim >= 16, got {dims.head_dim}; "
                             "use kernels='torch'")
    return kernels


def capture_graph(fn, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Capture `fn` (device work on static buffers) as a CUDA graph, after warm-up calls on a
    side stream (they also trigger torch.compile and cuBLAS/attention workspace allocation)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def _unwrap_target(target):
    if isinstance(target, FrozenTarget):
        return target.model
    if hasattr(target, "lm_head") and hasattr(target, "model") and hasattr(target.model, "layers"):
        return target
    raise ValueError(f"expected a FrozenTarget or Qwen3MoeForCausalLM, got {type(target).__name__}")


class TargetLM:
    """Our forward of a Qwen3-MoE target over its transformers parameters, static KV cache.

    The engine's target interface (test stubs implement the same four members):
      allocate(batch_size, max_len); forward(tokens_BT, positions_BT, prefill=False) -> hidden_BTH
      (post-norm; writes the KV cache at the positions); logits(hidden_...H) -> fp32; device.
    `prefill=True` requires positions 0..T-1 in every row (an empty cache).
    """

    def __init__(self, target, experts: str | None = None, compile: bool = False, kernels: str | None = None):
        lm = _unwrap_target(target)
        self.config = lm.config
        w = lm.lm_head.weight
        self.device, self.dtype = w.device, w.dtype
        self.embed_w = lm.model.embed_tokens.weight.detach().to(self.dtype)
        self.lm_head_w = w.detach()
        self.norm_w = lm.model.norm.weight.detach().to(self.dtype)
        self.dims = Dims.of(self.config)
        layers = [LayerWeights.of(layer, self.device, self.dtype) for layer in lm.model.layers]
        self.stack = _Stack(layers, self.dims, lm.model.rotary_emb, self.device, self.dtype, experts, compile, kernels)

    def allocate(self, batch_size: int, max_len: int) -> None:
        self.stack.allocate(batch_size, max_len)

    def embed(self, tokens):
        return F.embedding(tokens, self.embed_w)

    def forward(self, tokens_BT, positions_BT, prefill: bool = False):
        x = self.stack.run(self.embed(tokens_BT), positions_BT, prefill)
        return rms_norm(x, self.norm_w, self.dims.eps)

    def logits(self, hidden):
        return self.stack.linear(hidden, self.lm_head_w, fp32=True)


class MTPHeadLM:
    """Our forward of an `MTPHead` (same math as `MTPHead.forward`) with its own one-layer cache;
    embedding and lm_head are the target's. Interface: allocate; forward(tokens_BT, hidden_BTH,
    positions_BT, prefill=False) -> h'_BTH; logits(h'); device, dtype, hidden_size, vocab_size."""

    def __init__(self, head: MTPHead, target: TargetLM, experts: str | None = None, compile: bool = False,
                 kernels: str | None = None):
        cfg = head.config
        if cfg.hidden_size != target.config.hidden_size:
            raise ValueError(f"head hidden_size {cfg.hidden_size} != target hidden_size {target.config.hidden_size}")
        dev, dt = target.device, target.dtype
        self.target, self.dims = target, Dims.of(cfg)
        self.pre_e = head.pre_fc_norm_embedding.weight.detach().to(dev, dt)
        self.pre_h = head.pre_fc_norm_hidden.weight.detach().to(dev, dt)
        self.fc = head.fc.weight.detach().to(dev, dt)
        self.norm_w = head.norm.weight.detach().to(dev, dt)
        layers = [LayerWeights.of(head.layers[0], dev, dt)]
        self.stack = _Stack(layers, self.dims, head.rotary_emb, dev, dt, experts, compile, kernels)

    def allocate(self, batch_size: int, max_len: int) -> None:
        self.stack.allocate(batch_size, max_len)

    @property
    def device(self):
        return self.target.device

    @property
    def dtype(self):
        return self.target.dtype

    @property
    def hidden_size(self):
        return self.target.config.hidden_size

    @property
    def vocab_size(self):
        return self.target.config.vocab_size

    def forward(self, tokens_BT, hidden_BTH, positions_BT, prefill: bool = False):
        e = self.target.embed(tokens_BT)
        eps = self.dims.eps
        z = self.stack.linear(torch.cat([rms_norm(e, self.pre_e, eps), rms_norm(hidden_BTH.to(e.dtype), self.pre_h, eps)], -1),
                              self.fc)
        return rms_norm(self.stack.run(z, positions_BT, prefill), self.norm_w, eps)

    def logits(self, hidden):
        return self.target.logits(hidden)


# ====================================================================== acceptance core
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


# ============================================================================== drafters
@dataclass
class DecodeState:
    """Static device buffers of one batch (CUDA graphs read and write them in place)."""

    tokens: torch.Tensor  # [B, S] prompt + output tokens
    seq_len: torch.Tensor  # [B] tokens known; the target's cache holds seq_len - 1 of them
    prompt_len: torch.Tensor  # [B]
    num_out: torch.Tensor  # [B] output tokens (EOS included)
    finished: torch.Tensor  # [B] bool; padding rows start finished
    hist: torch.Tensor  # [B, K+1] verify steps that accepted n drafts


class Drafter(Protocol):
    """What the engine asks of a draft source (MTP head, n-gram lookup, test stubs).

    All methods run on device without host syncs (they are captured in the step's CUDA graph).
    """

    def allocate(self, batch_size: int, max_len: int, steps: int, temperature: float) -> None:
        """Build buffers/caches for a batch of `batch_size` rows and `max_len` cache slots."""

    def prefill(self, st: DecodeState, hidden_BTH: torch.Tensor) -> None:
        """After the target's prefill: st.tokens holds prompt + first token, hidden_BTH is the
        target's hidden state at prompt positions 0..T-1 (right-padded to the longest)."""

    def propose(self, st: DecodeState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K draft tokens [B, K] following st.tokens[:, :seq_len], and their draft
        probabilities [B, K, V] at T>0 (None = deterministic draft)."""

    def commit(self, st: DecodeState, hidden_BK1H, emitted_BK1, num_accepted_B, positions_BK1) -> None:
        """After verify (before st advances): the target's hidden states at the K+1 verify
        positions, emitted tokens (accepted drafts + bonus), accepted counts."""


class MTPDrafter:
    """Chain drafting with the MTP head (module docstring). Keeps d_1 (and h'_1, q_1) of the
    next step, produced by the prefill or by the previous step's draft extend."""

    def __init__(self, head_lm):
        self.head = head_lm

    def allocate(self, batch_size, max_len, steps, temperature):
        head = self.head
        head.allocate(batch_size, max_len)
        self.steps, self.temperature = steps, temperature
        self.d1 = torch.zeros(batch_size, dtype=torch.long, device=head.device)
        self.h1 = torch.zeros(batch_size, head.hidden_size, dtype=head.dtype, device=head.device)
        self.q1 = None
        if temperature > 0:
            self.q1 = torch.zeros(batch_size, head.vocab_size, dtype=torch.float, device=head.device)

    def _draft(self, h_BH):
        """The next draft token (and its distribution q at T>0) from the head's output."""
        logits = self.head.logits(h_BH)
        if self.temperature == 0:
            return logits.argmax(-1), None
        q = F.softmax(logits / self.temperature, dim=-1)
        return sample_from(q), q

    def _first(self, h_BH):
        d, q = self._draft(h_BH)
        self.d1.copy_(d)
        self.h1.copy_(h_BH)
        if q is not None:
            self.q1.copy_(q)

    def prefill(self, st, hidden_BTH):
        B, T = hidden_BTH.shape[:2]
        pos = torch.arange(T, device=hidden_BTH.device).expand(B, T)
        out = self.head.forward(st.tokens[:, 1:T + 1], hidden_BTH, pos, prefill=True)
        self._first(out[torch.arange(B, device=out.device), st.prompt_len - 1])

    def propose(self, st):
        tok, h = self.d1, self.h1
        drafts, probs = [tok], [self.q1]
        base = st.seq_len - 1  # the target's cache length = position of x_{t+1}
        for j in range(2, self.steps + 1):
            h = self.head.forward(tok[:, None], h[:, None], (base + j - 2)[:, None])[:, 0]
            tok, q = self._draft(h)
            drafts.append(tok)
            probs.append(q)
        q_BKV = None if self.temperature == 0 else torch.stack(probs, 1)
        return torch.stack(drafts, 1), q_BKV

    def commit(self, st, hidden_BK1H, emitted_BK1, num_accepted_B, positions_BK1):
        # draft extend: slot s gets (e(x_{s+1}), h_s) for the accepted tokens, with the
        # target's h; emitted[j] = x_{s+1} for j <= n. Output n is the next step's h'_1.
        out = self.head.forward(emitted_BK1, hidden_BK1H, positions_BK1)
        B = out.shape[0]
        self._first(out[torch.arange(B, device=out.device), num_accepted_B])


# ================================================================================ engine
@dataclass
class RowOutput:
    output_ids: list[int]
    hist: list[int]  # [K+1]; empty for plain decoding


@dataclass
class BatchOutput:
    rows: list[RowOutput]
    prefill_s: float  # graph capture on first use + prefill
    decode_s: float  # from after the prefill to the last step, synchronised
    steps: int  # engine steps run (verify steps, or plain decode steps)


class Engine:
    """Batched plain / speculative decoding with static buffers, for a fixed batch size.

        engine = Engine(TargetLM(target), MTPDrafter(MTPHeadLM(head, tlm)), batch_size=8,
                        max_len=2048, max_new_tokens=256, steps=3)
        out = engine.generate(list_of_token_id_lists)                 # speculative
        ref = engine.generate(list_of_token_id_lists, speculative=False)

    A batch of fewer prompts is padded with finished rows. Each row stops at one of `eos_ids`
    (kept in the output) or after `max_new_tokens`. max_len >= prompt + max_new_tokens + K + 1.
    """

    def __init__(self, target, drafter: Drafter | None = None, *, batch_size: int, max_len: int,
                 max_new_tokens: int, steps: int = 3, temperature: float = 0.0, eos_ids=(),
                 cuda_graphs: bool | None = None):
        if steps < 1:
            raise ValueError(f"steps (K) must be >= 1, got {steps}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
        self.target, self.drafter = target, drafter
        self.B, self.K, self.temperature, self.max_new = batch_size, steps, float(temperature), max_new_tokens
        self.max_len = max_len
        self.S = math.ceil(max_len / CACHE_ALIGN) * CACHE_ALIGN
        self.device = torch.device(target.device)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        stacks = [getattr(m, "stack", None) for m in (target, getattr(drafter, "head", None))]
        if self.cuda_graphs and any(s is not None and s.experts_step == "loop" for s in stacks):
            raise ValueError("experts='loop' syncs with the host and cannot run in a CUDA graph; "
                             "use experts='grouped_mm' or 'gather' (or cuda_graphs=False)")
        target.allocate(self.B, self.S)
        self._cache_version = getattr(getattr(target, "stack", None), "cache_version", None)
        if drafter is not None:
            drafter.allocate(self.B, self.S, self.K, self.temperature)
        dev, B = self.device, self.B
        self.eos_ids = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long, device=dev)
        self.st = DecodeState(
            tokens=torch.zeros(B, self.S, dtype=torch.long, device=dev),
            seq_len=torch.ones(B, dtype=torch.long, device=dev),
            prompt_len=torch.ones(B, dtype=torch.long, device=dev),
            num_out=torch.zeros(B, dtype=torch.long, device=dev),
            finished=torch.ones(B, dtype=torch.bool, device=dev),
            hist=torch.zeros(B, self.K + 1, dtype=torch.long, device=dev),
        )
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}

    # ------------------------------------------------------------ device-side steps
    def _append(self, emitted_BW, count_B):
        """Append up to count tokens per active row: cut after an EOS and at max_new_tokens."""
        st = self.st
        W = emitted_BW.shape[1]
        j = torch.arange(W, device=self.device)
        is_eos = (emitted_BW[..., None] == self.eos_ids).any(-1) & (j[None] < count_B[:, None])
        has_eos = is_eos.any(-1)
        count_B = torch.where(has_eos, is_eos.int().argmax(-1) + 1, count_B)
        count_B = torch.minimum(count_B, self.max_new - st.num_out).masked_fill(st.finished, 0)
        st.tokens.scatter_(1, st.seq_len[:, None] + j, emitted_BW)  # past the new length: garbage, unread
        st.seq_len.add_(count_B)
        st.num_out.add_(count_B)
        st.finished.logical_or_(has_eos | (st.num_out >= self.max_new))

    def _plain_step(self):
        st = self.st
        pos = (st.seq_len - 1)[:, None]
        hidden = self.target.forward(st.tokens.gather(1, pos), pos)
        nxt = sample(self.target.logits(hidden[:, 0]), self.temperature)
        self._append(nxt[:, None], torch.ones_like(st.seq_len))

    def _spec_step(self):
        st = self.st
        cache_len = st.seq_len - 1
        draft_BK, q_BKV = self.drafter.propose(st)
        verify_BK1 = torch.cat([st.tokens.gather(1, cache_len[:, None]), draft_BK], dim=1)
        pos_BK1 = cache_len[:, None] + torch.arange(self.K + 1, device=self.device)
        hidden = self.target.forward(verify_BK1, pos_BK1)
        n_B, emitted_BK1 = verify_drafts(draft_BK, q_BKV, self.target.logits(hidden), self.temperature)
        st.hist.scatter_add_(1, n_B[:, None], (~st.finished).long()[:, None])
        self.drafter.commit(st, hidden, emitted_BK1, n_B, pos_BK1)
        self._append(emitted_BK1, n_B + 1)

    # ---------------------------------------------------------------- host side
    def _step_fn(self, speculative: bool):
        fn = self._spec_step if speculative else self._plain_step
        if not self.cuda_graphs:
            return fn
        key = "spec" if speculative else "plain"
        if key not in self._graphs:
            st = self.st
            st.finished.fill_(True)  # warm-up steps on a dummy all-finished batch change no length
            st.seq_len.fill_(1)
            st.num_out.zero_()
            self._graphs[key] = capture_graph(fn)
        return self._graphs[key].replay

    @torch.no_grad()
    def start(self, prompts: list[list[int]], speculative: bool = True):
        """Prefill a batch and return its step function (a CUDA graph replay on CUDA), for
        benchmarks that time steps themselves; `generate` is start + step until all finished."""
        if speculative and self.drafter is None:
            raise ValueError("speculative decoding needs a drafter")
        self.check_prompts(prompts)
        version = getattr(getattr(self.target, "stack", None), "cache_version", None)
        if version != self._cache_version:
            raise RuntimeError("another Engine re-allocated this target's KV cache; build a new Engine")
        step = self._step_fn(speculative)  # captured before the prefill: the warm-up clobbers state
        self._prefill(prompts, speculative)
        return step

    def _prefill(self, prompts: list[list[int]], speculative: bool) -> None:
        st, B, dev = self.st, self.B, self.device
        lens = [len(p) for p in prompts] + [1] * (B - len(prompts))
        T = max(lens)
        toks = torch.zeros(B, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        toks = toks.to(dev)
        lens_B = torch.tensor(lens, dtype=torch.long, device=dev)
        st.tokens.zero_()
        st.tokens[:, :T] = toks
        st.prompt_len.copy_(lens_B)
        st.seq_len.copy_(lens_B)
        st.num_out.zero_()
        st.hist.zero_()
        st.finished.copy_(torch.arange(B, device=dev) >= len(prompts))
        hidden_BTH = self.target.forward(toks, torch.arange(T, device=dev).expand(B, T), prefill=True)
        last_BH = hidden_BTH[torch.arange(B, device=dev), lens_B - 1]
        first = sample(self.target.logits(last_BH), self.temperature)
        self._append(first[:, None], torch.ones_like(lens_B))
        if speculative:
            self.drafter.prefill(st, hidden_BTH)

    def check_prompts(self, prompts: list[list[int]]) -> None:
        if not 1 <= len(prompts) <= self.B:
            raise ValueError(f"got {len(prompts)} prompts for an engine of batch size {self.B}")
        room = self.max_new + self.K + 1
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + room > self.max_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens: with max_new_tokens={self.max_new} and "
                                 f"K={self.K} it needs max_len >= {len(p) + room} (got {self.max_len})")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], speculative: bool = True) -> BatchOutput:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        step = self.start(prompts, speculative)
        sync()
        t1 = time.perf_counter()
        steps = 0
        while not bool(self.st.finished.all()):  # the one host sync per step
            assert steps < self.max_new, "a decode step emitted nothing for an active row"
            step()
            steps += 1
        sync()
        t2 = time.perf_counter()
        tokens, plen, nout, hist = (x.cpu() for x in (self.st.tokens, self.st.prompt_len, self.st.num_out, self.st.hist))
        rows = []
        for b in range(len(prompts)):
            s = int(plen[b])
            rows.append(RowOutput(tokens[b, s: s + int(nout[b])].tolist(), hist[b].tolist() if speculative else []))
        return BatchOutput(rows, prefill_s=t1 - t0, decode_s=t2 - t1, steps=steps)


# ============================================================================ evaluation
def eos_token_ids(config, tokenizer=None) -> list[int]:
    """<|im_end|>, the tokenizer's eos and the config's eos ids, those inside the vocabulary."""
    ids = {IM_END_ID}
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg_eos = getattr(config, "eos_token_id", None)
    ids.update([cfg_eos] if isinstance(cfg_eos, int) else (cfg_eos or []))
    return sorted(i for i in ids if 0 <= i < config.vocab_size)


def load_head(path: str | Path, target_config, device, dtype) -> MTPHead:
    """An MTPHead with weights from a training checkpoint dir (`head.safetensors`), `final/`,
    an exported draft dir or a .safetensors file; ValueError if missing or not fitting."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"head weights '{path}' do not exist; pass --mtp a checkpoint-*/ or final/ dir, "
                         "an exported draft dir or a .safetensors file")
    if importlib.util.find_spec("model.export") is not None:
        from model.export import load_mtp_state

        state = load_mtp_state(path, target_config)
    else:  # until model/export.py exists: the training checkpoint layout only
        from safetensors.torch import load_file

        file = path / "head.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no head weights at '{file}'")
        state = load_file(str(file))
        expected = head_param_shapes(target_config)
        bad = [k for k in expected if k not in state or tuple(state[k].shape) != expected[k]]
        if bad or set(state) - set(expected):
            raise ValueError(f"head weights '{path}' do not fit the target config (hidden "
                             f"{target_config.hidden_size}, {target_config.num_experts} experts): "
                             f"mismatched {bad[:5]}, unexpected {sorted(set(state) - set(expected))[:5]}")
    with torch.device(device):
        head = MTPHead(target_config)
    head.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return head.to(dtype).eval()


def _prompt_rows(prompts) -> list[dict]:
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, dict):
            rows.append({"id": p.get("id", i), "category": p.get("category"), "prompt_ids": list(p["prompt_ids"])})
        else:
            rows.append({"id": i, "category": None, "prompt_ids": list(p)})
        if not rows[-1]["prompt_ids"]:
            raise ValueError(f"prompt {rows[-1]['id']} is empty")
    if not rows:
        raise ValueError("no prompts to evaluate")
    return rows


def build_drafter(kind: str, head, target_lm: TargetLM, experts=None, compile=False, kernels=None, **ngram_kwargs):
    if kind == "mtp":
        if head is None:
            raise ValueError("drafter 'mtp' needs a head (--mtp)")
        return MTPDrafter(MTPHeadLM(head, target_lm, experts=experts, compile=compile, kernels=kernels))
    if kind == "ngram":
        from model.ngram import NGramDrafter

        return NGramDrafter(**ngram_kwargs)
    raise ValueError(f"unknown drafter {kind!r}; choose 'mtp' or 'ngram'")


@torch.no_grad()
def evaluate(target, head, tokenizer, prompts, steps: int = 3, temperature: float = 0.0,
             batch_size: int = 8, max_new_tokens: int = 256, seed: int = 0, device=None,
             max_len: int | None = None, eos_ids=None, drafter: str = "mtp", baseline: bool = True,
             cuda_graphs: bool | None = None, experts: str | None = None, compile: bool = False,
             kernels: str | None = None,
             progress: bool = True) -> dict:
    """Speculative decoding of `prompts` with the head, against plain decoding; the report dict.

    target: FrozenTarget / Qwen3MoeForCausalLM (already on its device) or a TargetLM;
    head: MTPHead (None for drafter="ngram"); prompts: chat_prompts() rows or token-id lists.
    Throughputs count tokens made by decode steps (not the prefill's first token) over the
    decode phase only (prefill excluded), both modes timed the same way.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps (K) must be >= 1, got {steps}")
    rows = _prompt_rows(prompts)
    if isinstance(target, TargetLM):
        tlm = target
    else:
        tlm = TargetLM(target, experts=experts, compile=compile, kernels=kernels)
    if device is not None and torch.device(device).type != tlm.device.type:
        raise ValueError(f"the target is on {tlm.device} but device={device}; load it there first")
    room = max_new_tokens + steps + 1
    longest = max(len(r["prompt_ids"]) for r in rows)
    if max_len is None:
        max_len = longest + room
    for r in rows:
        if len(r["prompt_ids"]) + room > max_len:
            raise ValueError(f"prompt {r['id']!r} has {len(r['prompt_ids'])} tokens; with max_new_tokens="
                             f"{max_new_tokens} and K={steps} it needs --max-len >= {len(r['prompt_ids']) + room} "
                             f"(got {max_len}); raise --max-len or drop the prompt")
    eos = eos_token_ids(tlm.config, tokenizer) if eos_ids is None else list(eos_ids)
    draft = build_drafter(drafter, head, tlm, experts=experts, compile=compile, kernels=kernels)
    batch_size = min(batch_size, len(rows))
    engine = Engine(tlm, draft, batch_size=batch_size, max_len=max_len, max_new_tokens=max_new_tokens,
                    steps=steps, temperature=temperature, eos_ids=eos, cuda_graphs=cuda_graphs)
    torch.manual_seed(seed)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["prompt_ids"]))  # less padding
    spec_out, base_out = [None] * len(rows), [None] * len(rows)
    spec_s = base_s = 0.0
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=f"{drafter} K={steps}", unit="batch", disable=not progress):
        batch = [rows[i]["prompt_ids"] for i in idx]
        out = engine.generate(batch, speculative=True)
        spec_s += out.decode_s
        for i, r in zip(idx, out.rows):
            spec_out[i] = r
        if baseline:
            ref = engine.generate(batch, speculative=False)
            base_s += ref.decode_s
            for i, r in zip(idx, ref.rows):
                base_out[i] = r
    return build_report(rows, spec_out, base_out if baseline else None, spec_s, base_s, steps=steps,
                        temperature=temperature, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        drafter=drafter, device=str(tlm.device), eos_ids=eos,
                        kernels=getattr(getattr(tlm, "stack", None), "kernels", None))


def build_report(rows, spec_out, base_out, spec_s, base_s, *, steps, temperature, **settings) -> dict:
    """The report (scripts/eval_acceptance.py documents its fields)."""
    K = steps
    total_hist = [0] * (K + 1)
    per_prompt, by_cat = [], {}
    for r, s, b in zip(rows, spec_out, base_out or [None] * len(rows)):
        st = acceptance_stats(s.hist)
        total_hist = [a + c for a, c in zip(total_hist, s.hist)]
        row = {
            "id": r["id"], "category": r["category"], "num_prompt_tokens": len(r["prompt_ids"]),
            "num_output_tokens": len(s.output_ids), "output_token_ids": s.output_ids,
            "verify_steps": st["verify_steps"], "acceptance_length": st["acceptance_length"],
            "accept_histogram": s.hist,
        }
        if b is not None and temperature == 0:
            row["matches_baseline"] = s.output_ids == b.output_ids
        per_prompt.append(row)
        if r["category"] is not None:
            cat = by_cat.setdefault(r["category"], {"hist": [0] * (K + 1), "n": 0, "tokens": 0})
            cat["hist"] = [a + c for a, c in zip(cat["hist"], s.hist)]
            cat["n"] += 1
            cat["tokens"] += len(s.output_ids)
    stats = acceptance_stats(total_hist)
    gen = sum(len(s.output_ids) for s in spec_out)
    spec_tps = sum(len(s.output_ids) - 1 for s in spec_out) / spec_s if spec_s > 0 else None
    base_tps = None
    if base_out is not None and base_s > 0:
        base_tps = sum(len(b.output_ids) - 1 for b in base_out) / base_s
    lossless = mismatches = None
    if base_out is not None and temperature == 0:
        mismatches = sum(s.output_ids != b.output_ids for s, b in zip(spec_out, base_out))
        lossless = mismatches == 0
    per_category = {}
    for name, c in sorted(by_cat.items()):
        cs = acceptance_stats(c["hist"])
        per_category[name] = {"num_prompts": c["n"], "generated_tokens": c["tokens"], "verify_steps": cs["verify_steps"],
                              "acceptance_length": cs["acceptance_length"],
                              "per_position_acceptance": cs["per_position_acceptance"]}
    return {
        "acceptance_length": stats["acceptance_length"],
        "per_position_acceptance": stats["per_position_acceptance"],
        "per_position_acceptance_unconditional": stats["per_position_acceptance_unconditional"],
        "accept_histogram": total_hist,
        "num_prompts": len(rows),
        "generated_tokens": gen,
        "verify_steps": stats["verify_steps"],
        "spec_tokens_per_s": spec_tps,
        "baseline_tokens_per_s": base_tps,
        "speedup": spec_tps / base_tps if spec_tps and base_tps else None,
        "lossless": lossless,
        "lossless_mismatches": mismatches,
        "steps": K,
        "temperature": temperature,
        **settings,
        "per_category": per_category,
        "per_prompt": per_prompt,
        "definitions": {
            "acceptance_length": "tokens accepted per verify step incl. the bonus token (SGLang avg_spec_accept_length), "
                                 "counted before EOS/max_new_tokens truncation",
            "per_position_acceptance": "P(draft i accepted | drafts 1..i-1 accepted)",
            "per_position_acceptance_unconditional": "steps accepting draft i / all verify steps",
            "accept_histogram": "index n: verify steps that emitted n+1 tokens (n drafts accepted)",
            "tokens_per_s": "decode-step tokens over decode time (prefill and its first token excluded)",
            "lossless": "T=0: every prompt's speculative output equals plain greedy decoding (null at T>0)",
        },
    }


def format_report(report: dict) -> str:
    """Console summary: totals, per-position rates, histogram, per-category lines."""
    def f(x, spec="{:.3f}"):
        return "-" if x is None else spec.format(x)

    K = report["steps"]
    lines = [
        f"drafter {report.get('drafter', 'mtp')}  K={K}  T={report['temperature']}  prompts {report['num_prompts']}  "
        f"tokens {report['generated_tokens']}  verify steps {report['verify_steps']}",
        f"acceptance length   {f(report['acceptance_length'])}",
        f"per position (cond) {'  '.join(f(x) for x in report['per_position_acceptance'])}",
        f"per position (all)  {'  '.join(f(x) for x in report['per_position_acceptance_unconditional'])}",
        f"histogram (1..{K + 1} tokens) {report['accept_histogram']}",
        f"spec tok/s {f(report['spec_tokens_per_s'], '{:.1f}')}   baseline tok/s "
        f"{f(report['baseline_tokens_per_s'], '{:.1f}')}   speedup {f(report['speedup'], '{:.2f}x')}",
        f"lossless {report['lossless']} (mismatching prompts: {report['lossless_mismatches']})",
    ]
    if report["per_category"]:
        lines.append(f"{'category':<16}{'prompts':>8}{'accept len':>12}")
        for name, c in report["per_category"].items():
            lines.append(f"{name:<16}{c['num_prompts']:>8}{f(c['acceptance_length']):>12}")
    return "\n".join(lines)
