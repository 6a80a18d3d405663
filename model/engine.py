"""The decoding engine: plain and speculative (SGLang NEXTN chain drafting) decoding on device.

    engine = Engine(TargetLM(target), MTPDrafter(MTPHeadLM(head, tlm)), batch_size=8,
                    max_len=2048, max_new_tokens=256, steps=3)
    out = engine.generate(prompts)                        # speculative
    ref = engine.generate(prompts, speculative=False)     # plain: the baseline and the reference

One verify step for each row, t = the last position in the target's KV cache
(h_t = the target's post-norm hidden state there, x_{t+1} = the token after it, not yet cached):

    draft   d_1 = head(e(x_{t+1}), h_t)        at position t        (logits = target lm_head(h'))
            d_j = head(e(d_{j-1}), h'_{j-1})   at position t+j-1    j = 2..K
    verify  target([x_{t+1}, d_1 .. d_K])      at positions t+1 .. t+K+1, ONE forward
    accept  model/acceptance.py (SGLang's rule): n accepted drafts, then one bonus token
    extend  the head's cache slots t+1 .. t+n+1 are recomputed from the TARGET's hidden states of
            the accepted tokens ("draft extend", as SGLang does); its output at slot t+n+1 is the
            next step's d_1. Rejected KV entries (target and head) are rolled back by lengths only.

Invariant: the head's cache slot s holds the layer K/V of input (e(x_{s+1}), h_s), h_s the
target's. That is the training label shift of model/loss.py: position q of step 1 reads
(e(x_{q+1}), h_q) and predicts x_{q+2}.

Design (gpt-fast style):
- our own Qwen3-MoE forward (model/qwen3_forward.py) over the transformers modules' parameters
  (`TargetLM`, `MTPHeadLM`), tested against `Qwen3MoeForCausalLM` and `MTPHead.forward`;
- static KV caches [layers, 2, B, kv_heads, S, head_dim]; every row has its own positions, new
  tokens are written at their positions and attention masks key slots > the query's position,
  so stale entries past a row's length are never read and rollback is free;
- the whole step (K-1 draft forwards + verify + acceptance + extend + bookkeeping) runs on
  device; on CUDA it is captured as one CUDA graph per engine; exactly one host sync per step
  (`finished.all()`);
- kernels="triton" (the default on CUDA when Triton is installed): decode-sized steps run each
  layer in nine Triton kernels (model/linear_kernels.py, attn_kernels.py, moe_kernels.py) instead
  of ~20 torch kernels; their tiles do not depend on the step's token count, so a verify step
  computes the same numbers as plain decoding of the same token. On Hopper they are launched
  with programmatic dependent launch (moe_kernels.PDL). Bigger decode and verify steps (data
  regeneration at batch 256) keep the Triton attention, which reads a row's cache only up to its
  length, around torch linears and experts. kernels="torch" is the torch path (SDPA, cuBLAS,
  `experts` = grouped_mm on CUDA), which prefill always uses.
- drafters (model/drafters.py) plug in through the `Drafter` protocol below.

Footguns: the target's and head's KV writes of finished rows are harmless (lengths frozen);
`Engine`s built on the same `TargetLM` share its cache: the newest one invalidates the others.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from model import linear_kernels, moe_kernels
from model.acceptance import SamplingParams, VerifyRule, sample, verify_drafts
from model.head import MTPHead
from model.qwen3_forward import (
    EXPERT_IMPLS, Dims, LayerWeights, decoder_layer, decoder_layer_big_step, decoder_layer_triton, rms_norm, rope_table,
    step_mask,
)
from model.target import FrozenTarget

# "triton": decode-sized steps (<= MAX_STEP_TOKENS tokens) run model/attn_kernels.py,
# model/moe_kernels.py and model/linear_kernels.py; bigger decode/verify steps the torch path with
# the Triton attention (decoder_layer_big_step); the prefill the torch path
KERNEL_IMPLS = ("torch", "triton")
MAX_STEP_TOKENS = min(moe_kernels.MAX_TOKENS, linear_kernels.MAX_TOKENS)
CACHE_ALIGN = 16  # slots; keeps SDPA's attention-mask rows aligned for the fused kernels


# ====================================================================== layers + KV cache
class LayerStack:
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
        self.cos, self.sin = rope_table(self.rotary, max_len, self.device, self.dtype)
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
                    mask = step_mask(pos_BT, self.kv_cache.shape[4], self.dims.n_heads // self.dims.n_kv, x_BTH.dtype)
                    x_BTH = self.layer_step(x_BTH, lw, self.dims, self.kv_cache[i], cos, sin, mask, bidx, pos_BT,
                                            self.experts_step)
                else:
                    x_BTH = self.layer_triton(x_BTH, lw, self.dims, self.kv_cache[i], self.cos, self.sin, pos_BT)
            return x_BTH
        if not prefill and self.kernels == "triton":  # a big step: Triton attention only
            for i, lw in enumerate(self.layers):
                x_BTH = decoder_layer_big_step(x_BTH, lw, self.dims, self.kv_cache[i], self.cos, self.sin, pos_BT,
                                               self.experts_step)
            return x_BTH
        cos, sin = self.cos[pos_BT].unsqueeze(2), self.sin[pos_BT].unsqueeze(2)
        bidx = torch.arange(B, device=pos_BT.device)[:, None].expand(B, T)
        if prefill:
            mask, layer_fn, experts = None, decoder_layer, self.experts_prefill
        else:
            mask = step_mask(pos_BT, self.kv_cache.shape[4], self.dims.n_heads // self.dims.n_kv, x_BTH.dtype)
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


class DecodeTarget(Protocol):
    """What the engine asks of a target (`TargetLM`; test stubs implement the same members)."""

    device: torch.device

    def allocate(self, batch_size: int, max_len: int) -> None:
        """A static KV cache for `batch_size` rows of `max_len` slots (drops the old one)."""

    def forward(self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """Post-norm hidden states [B, T, H]; writes the KV cache at the positions.
        `prefill=True` requires positions 0..T-1 in every row (an empty cache)."""

    def logits(self, hidden_H: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states [..., H]."""


class TargetLM:
    """Our forward of a Qwen3-MoE target over its transformers parameters, static KV cache;
    a `DecodeTarget`."""

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
        self.stack = LayerStack(layers, self.dims, lm.model.rotary_emb, self.device, self.dtype, experts, compile, kernels)

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
    positions_BT, prefill=False) -> h'_BTH; logits(h') over the draft vocabulary (all tokens, or
    `token_map`'s ids in its order); device, dtype, hidden_size, vocab_size."""

    def __init__(self, head: MTPHead, target: TargetLM, experts: str | None = None, compile: bool = False,
                 kernels: str | None = None, token_map: torch.Tensor | None = None):
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
        self.stack = LayerStack(layers, self.dims, head.rotary_emb, dev, dt, experts, compile, kernels)
        # a draft vocabulary (model/token_map.py): the lm_head rows of its ids, as SGLang slices them
        self.token_map = self.map_w = None
        if token_map is not None:
            self.token_map = token_map.to(dev, torch.long)
            self.map_w = target.lm_head_w.index_select(0, self.token_map).contiguous()

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
        """fp32 logits over the draft vocabulary: every token, or the token map's (in its order)."""
        if self.map_w is None:
            return self.target.logits(hidden)
        return self.stack.linear(hidden, self.map_w, fp32=True)


# ====================================================================== the drafter interface
@dataclass
class DecodeState:
    """Static device buffers of one batch (CUDA graphs read and write them in place)."""

    tokens: torch.Tensor  # [B, S] prompt + output tokens
    seq_len: torch.Tensor  # [B] tokens known; the target's cache holds seq_len - 1 of them
    prompt_len: torch.Tensor  # [B]
    num_out: torch.Tensor  # [B] output tokens (EOS included)
    finished: torch.Tensor  # [B] bool; padding rows start finished
    hist: torch.Tensor  # [B, K+1] verify steps that accepted n drafts
    # [B, K] sum over the verify steps that reached draft position i of the probability that the
    # rule accepts the target's own top token there (target-only rule at T > 0; else unused)
    mode_accept: torch.Tensor


class Drafter(Protocol):
    """What the engine asks of a draft source (MTP head, n-gram lookup, test stubs).

    All methods run on device without host syncs (they are captured in the step's CUDA graph).
    """

    def allocate(self, batch_size: int, max_len: int, steps: int, temperature: float) -> None:
        """Build buffers/caches for a batch of `batch_size` rows and `max_len` cache slots.
        `temperature` is the drafts' own: 0 = top-1 drafts (every rule but p/q rejection
        sampling), > 0 = sample them from softmax(logits / temperature) and return q."""

    def prefill(self, st: DecodeState, hidden_BTH: torch.Tensor) -> None:
        """After the target's prefill: st.tokens holds prompt + first token, hidden_BTH is the
        target's hidden state at prompt positions 0..T-1 (right-padded to the longest)."""

    def propose(self, st: DecodeState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K draft tokens [B, K] following st.tokens[:, :seq_len], and their draft
        probabilities [B, K, V] at T>0 (None = deterministic draft)."""

    def commit(self, st: DecodeState, hidden_BK1H, emitted_BK1, num_accepted_B, positions_BK1) -> None:
        """After verify (before st advances): the target's hidden states at the K+1 verify
        positions, emitted tokens (accepted drafts + bonus), accepted counts."""


# ================================================================================ engine
@dataclass
class RowOutput:
    output_ids: list[int]
    hist: list[int]  # [K+1]; empty for plain decoding
    mode_accept: list[float] = field(default_factory=list)  # [K] sums (DecodeState.mode_accept); empty if not tracked


@dataclass
class BatchOutput:
    rows: list[RowOutput]
    prefill_s: float  # graph capture on first use + prefill
    decode_s: float  # from after the prefill to the last step, synchronised
    steps: int  # engine steps run (verify steps, or plain decode steps)


class Engine:
    """Batched plain / speculative decoding with static buffers, for a fixed batch size.

        engine = Engine(TargetLM(target), MTPDrafter(MTPHeadLM(head, tlm)), batch_size=8,
                        max_len=2048, max_new_tokens=256, steps=3,
                        sampling=SamplingParams(temperature=0.6, top_p=0.95, top_k=20))
        out = engine.generate(list_of_token_id_lists)                 # speculative
        ref = engine.generate(list_of_token_id_lists, speculative=False)

    A batch of fewer prompts is padded with finished rows. Each row stops at one of `eos_ids`
    (kept in the output) or after `max_new_tokens`. max_len >= prompt + max_new_tokens + K + 1.
    `sampling` applies to every row (greedy by default); `rule` is how drafts are verified at
    temperature > 0 (model/acceptance.py).
    """

    def __init__(self, target: DecodeTarget, drafter: Drafter | None = None, *, batch_size: int, max_len: int,
                 max_new_tokens: int, steps: int = 3, sampling: SamplingParams = SamplingParams(),
                 rule: VerifyRule = VerifyRule(), eos_ids=(), cuda_graphs: bool | None = None):
        if steps < 1:
            raise ValueError(f"steps (K) must be >= 1, got {steps}")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
        self.target, self.drafter = target, drafter
        self.B, self.K, self.max_new = batch_size, steps, max_new_tokens
        self.sampling, self.rule = sampling, rule
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
            drafter.allocate(self.B, self.S, self.K, rule.draft_temperature(sampling))
        dev, B = self.device, self.B
        self.eos_ids = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long, device=dev)
        self.st = DecodeState(
            tokens=torch.zeros(B, self.S, dtype=torch.long, device=dev),
            seq_len=torch.ones(B, dtype=torch.long, device=dev),
            prompt_len=torch.ones(B, dtype=torch.long, device=dev),
            num_out=torch.zeros(B, dtype=torch.long, device=dev),
            finished=torch.ones(B, dtype=torch.bool, device=dev),
            hist=torch.zeros(B, self.K + 1, dtype=torch.long, device=dev),
            mode_accept=torch.zeros(B, self.K, dtype=torch.float32, device=dev),
        )
        self.track_mode = rule.kind == "target_only" and not sampling.greedy
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
        nxt = sample(self.target.logits(hidden[:, 0]), self.sampling)
        self._append(nxt[:, None], torch.ones_like(st.seq_len))

    def _spec_step(self):
        st = self.st
        cache_len = st.seq_len - 1
        draft_BK, q_BKV = self.drafter.propose(st)
        verify_BK1 = torch.cat([st.tokens.gather(1, cache_len[:, None]), draft_BK], dim=1)
        pos_BK1 = cache_len[:, None] + torch.arange(self.K + 1, device=self.device)
        hidden = self.target.forward(verify_BK1, pos_BK1)
        mode_BK = torch.empty(self.B, self.K, device=self.device) if self.track_mode else None
        n_B, emitted_BK1 = verify_drafts(draft_BK, q_BKV, self.target.logits(hidden), self.sampling, self.rule,
                                         mode_accept_out=mode_BK)
        st.hist.scatter_add_(1, n_B[:, None], (~st.finished).long()[:, None])
        if mode_BK is not None:  # positions this step reached: drafts before them accepted
            reached_BK = (n_B[:, None] >= torch.arange(self.K, device=self.device)) & ~st.finished[:, None]
            st.mode_accept.add_(mode_BK * reached_BK)
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
        st.mode_accept.zero_()
        st.finished.copy_(torch.arange(B, device=dev) >= len(prompts))
        hidden_BTH = self.target.forward(toks, torch.arange(T, device=dev).expand(B, T), prefill=True)
        last_BH = hidden_BTH[torch.arange(B, device=dev), lens_B - 1]
        first = sample(self.target.logits(last_BH), self.sampling)
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
        tokens, plen, nout, hist, mode = (x.cpu() for x in (self.st.tokens, self.st.prompt_len, self.st.num_out,
                                                             self.st.hist, self.st.mode_accept))
        rows = []
        for b in range(len(prompts)):
            s = int(plen[b])
            rows.append(RowOutput(tokens[b, s: s + int(nout[b])].tolist(), hist[b].tolist() if speculative else [],
                                  mode[b].tolist() if speculative and self.track_mode else []))
        return BatchOutput(rows, prefill_s=t1 - t0, decode_s=t2 - t1, steps=steps)
