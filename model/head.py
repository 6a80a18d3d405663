"""The one-layer MTP draft head for a frozen Qwen3-MoE target (docs/architecture.md).

    z     = fc(cat[pre_fc_norm_embedding(embed(x_{t+1})), pre_fc_norm_hidden(h_t)])  # embedding FIRST
    y     = layers[0](z)            # one Qwen3-MoE decoder layer: own attention, full MoE MLP
    h'    = norm(y)                 # plain RMSNorm (weight * x_hat), like the target's
    logit = lm_head(h')             # predicts x_{t+2}; embed and lm_head are the TARGET's, frozen

Module names are chosen so that `state_dict()` keys map 1:1 onto SGLang's `mtp.*` names
(`fc.weight` -> `mtp.fc.weight`, `layers.0.self_attn.q_proj.weight` ->
`mtp.layers.0.self_attn.q_proj.weight`, ...). The only transformation left to the exporter is
splitting transformers' fused expert tensors into per-expert 2-D ones (model/export.py).

Footguns:
- The embedding and lm_head are NOT submodules: they are passed in at call time. Registering them
  here would make ZeRO-3 partition (and the optimizer track) the target's weights.
- The decoder layer is transformers' own `Qwen3MoeDecoderLayer`, so the head computes exactly what
  SGLang's Qwen3-MoE layer computes, and grouped_mm experts apply when the config asks for them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
    Qwen3MoeSparseMoeBlock,
)

from model.fast_moe import use_head_experts


def head_config(target_config: Qwen3MoeConfig) -> Qwen3MoeConfig:
    """A copy of the target's config for the head's single layer.

    The layer must be sparse (MoE) whatever `mlp_only_layers` / `decoder_sparse_step` say about
    the target's layer 0, because SGLang builds the MTP layer as a Qwen3-MoE sparse layer.
    """
    cfg = copy.deepcopy(target_config)
    cfg.mlp_only_layers = []
    cfg.decoder_sparse_step = 1
    cfg.num_hidden_layers = 1
    # Training calls the layer with attention_mask=None and relies on sdpa's is_causal; eager
    # attention with no mask would attend to future tokens. Keep flash/flex if the user chose them.
    if getattr(cfg, "_attn_implementation", None) in (None, "eager"):
        cfg._attn_implementation = "sdpa"
    if getattr(cfg, "_experts_implementation", None) is None:
        cfg._experts_implementation = "eager"  # the target's choice (grouped_mm on GPU) is kept
    return cfg


class MTPHead(nn.Module):
    """Trainable MTP head; see the module docstring for the math and the naming contract."""

    def __init__(self, target_config: Qwen3MoeConfig):
        super().__init__()
        cfg = head_config(target_config)
        self.config = cfg
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_fc_norm_embedding = Qwen3MoeRMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = Qwen3MoeRMSNorm(hidden, eps=eps)
        # columns [0:H] act on the embedding half, [H:2H] on the hidden half
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([Qwen3MoeDecoderLayer(cfg, layer_idx=0)])
        assert isinstance(self.layers[0].mlp, Qwen3MoeSparseMoeBlock)
        # on a GPU the experts run as grouped GEMMs in the autocast dtype (model/fast_moe.py)
        use_head_experts(self.layers[0])
        self.norm = Qwen3MoeRMSNorm(hidden, eps=eps)
        # RoPE tables are buffers (non-persistent), never exported
        self.rotary_emb = Qwen3MoeRotaryEmbedding(cfg)
        self.activation_checkpointing = False  # set by train/ (head.activation_checkpointing)
        self._compiled_body = None  # compile_step(): torch.compile of _body for training steps

    def compile_step(self, enable: bool = True, **compile_kwargs) -> None:
        """Opt-in (`head.compile`): run the training step's body (fuse, decoder layer, norm) through
        torch.compile, so its elementwise glue (norms, RoPE, routing, the expert activation) fuses
        in forward and backward. Decoding with a cache keeps the eager path. `dynamic` defaults to
        None (automatic dynamic shapes: a second sequence length recompiles once, then no more)."""
        if not enable:
            self._compiled_body = None
            return
        compile_kwargs.setdefault("dynamic", None)
        self._compiled_body = torch.compile(self._body, **compile_kwargs)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_random(self, seed: int | None = None, std: float | None = None) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms (transformers' own init)."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)

    @torch.no_grad()
    def init_from_target_layer(self, layer: nn.Module, seed: int | None = None) -> None:
        """`last_layer` init: copy a target decoder layer; fc starts as [0 | I] (pass-through of
        the hidden half) plus small noise, so step 1 of training starts near the target's own
        last layer applied to its final hidden state."""
        self.init_random(seed)
        src = {k: v for k, v in layer.state_dict().items()}
        dst = self.layers[0].state_dict()
        missing = sorted(set(dst) - set(src))
        if missing:
            raise ValueError(
                f"head.init=last_layer: the target layer lacks {missing[:5]}; its last layer is "
                "probably dense (mlp_only_layers); use head.init=random"
            )
        for k, v in dst.items():
            if src[k].shape != v.shape:
                raise ValueError(f"head.init=last_layer: shape of {k} differs: {tuple(src[k].shape)} vs {tuple(v.shape)}")
            v.copy_(src[k].to(v.dtype))
        hidden = self.config.hidden_size
        self.fc.weight[:, hidden:].copy_(torch.eye(hidden, dtype=self.fc.weight.dtype))

    # --------------------------------------------------------------- forward
    def fuse(self, embeds_BTH: torch.Tensor, hidden_BTH: torch.Tensor) -> torch.Tensor:
        """z = fc([norm_e(e); norm_h(h)]): the input of the decoder layer. [B, T, H]"""
        e = self.pre_fc_norm_embedding(embeds_BTH)
        h = self.pre_fc_norm_hidden(hidden_BTH.to(embeds_BTH.dtype))
        return self.fc(torch.cat([e, h], dim=-1))

    def forward(
        self,
        embeds_BTH: torch.Tensor,
        hidden_BTH: torch.Tensor,
        position_ids_BT: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        num_steps: int | None = None,
    ):
        """h' = norm(layer(fc(...))), the lm_head input, [B, T, H].

        With `attention_mask=None` the layer is causal over T (sdpa's is_causal; head_config
        never leaves eager attention in place), which is what training uses: right padding never
        leaks into real tokens. `cache` is a transformers `Cache` or None (training).

        `num_steps=k` runs the k-step training recursion in ONE call and returns a list of k
        outputs: step j+1 at position q reads step j's output at q-1 (q = 0 keeps the target
        state), the chain-drafting recursion of model/loss.py. One call per training step matters
        under ZeRO-3, whose parameter hooks expect a module to be entered once per forward.
        """
        if num_steps is None:
            return self._step(embeds_BTH, hidden_BTH, position_ids_BT, attention_mask, cache)
        outs, inp_BTH = [], hidden_BTH
        for j in range(num_steps):
            out_BTH = self._step(embeds_BTH, inp_BTH, position_ids_BT, attention_mask, None)
            outs.append(out_BTH)
            if j + 1 < num_steps:
                inp_BTH = torch.cat([hidden_BTH[:, :1].to(out_BTH.dtype), out_BTH[:, :-1]], dim=1)
        return outs

    def _step(self, embeds_BTH, hidden_BTH, position_ids_BT, attention_mask, cache) -> torch.Tensor:
        if self._compiled_body is not None and cache is None and attention_mask is None:
            return self._compiled_body(embeds_BTH, hidden_BTH, position_ids_BT)
        return self._body(embeds_BTH, hidden_BTH, position_ids_BT, attention_mask, cache)

    def _body(self, embeds_BTH, hidden_BTH, position_ids_BT, attention_mask=None, cache=None) -> torch.Tensor:
        z = self.fuse(embeds_BTH, hidden_BTH)
        pos_emb = self.rotary_emb(z, position_ids_BT)
        kwargs = {}
        if cache is not None:
            kwargs["past_key_values"] = cache
            kwargs["use_cache"] = True
        layer = self.layers[0]
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # recompute the MoE layer in backward: its expert activations are the bulk of memory
            y = checkpoint(
                lambda z_, c_, s_: layer(z_, attention_mask=attention_mask, position_ids=position_ids_BT,
                                         position_embeddings=(c_, s_)),
                z, pos_emb[0], pos_emb[1], use_reentrant=False,
            )
        else:
            y = layer(z, attention_mask=attention_mask, position_ids=position_ids_BT, position_embeddings=pos_emb, **kwargs)
        if isinstance(y, tuple):  # older transformers return (hidden,)
            y = y[0]
        return self.norm(y)


def head_param_shapes(target_config: Qwen3MoeConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of `MTPHead(target_config)` without allocating weights."""
    with torch.device("meta"):
        head = MTPHead(target_config)
    return {k: tuple(v.shape) for k, v in head.state_dict().items()}
