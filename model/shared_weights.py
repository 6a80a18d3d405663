"""The few target tensors that offline training needs, read without loading the target.

With stored hidden states (data/hidden_states.py, `data.hidden_states=DIR`) the head never runs
the target: it only needs the target's frozen `embed_tokens` and `lm_head` (and, for
`head.init=last_layer`, the target's last decoder layer). For Qwen3-30B-A3B that is 1.2 GB of
the 61 GB checkpoint; `safe_open` reads just those tensors from the safetensors files.

    target = load_shared_weights("Qwen3-30B-A3B", device="cuda", last_layer=True)
    target.embed_tokens, target.lm_head     # frozen nn.Embedding / nn.Linear, like FrozenTarget's
    target.last_layer                       # Qwen3MoeDecoderLayer (only when last_layer=True)
    target.hidden(ids)                      # ValueError: offline mode has no target forward

Footgun: experts on disk are per-expert 2-D tensors (`mlp.experts.{e}.gate_proj.weight`, what
`save_pretrained` of transformers 5 writes and what the published Qwen3 checkpoints hold), while
transformers' in-memory layer fuses them (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows
first; `mlp.experts.down_proj` [E, H, I]). `_fuse_experts` does that conversion; a checkpoint
that already stores the fused names is taken as is.

Block-FP8 targets (model/fp8.py): a tensor stored as float8_e4m3fn is read with its
`weight_scale_inv` and dequantized to the compute dtype, exactly as `FrozenTarget.load` does (in
the Qwen3 FP8 releases that is the last layer's attention and experts; embed_tokens and lm_head
are bf16 there).

Plain single-device code: no accelerate, no DeepSpeed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

from model.fp8 import FP8_DTYPE, SCALE_SUFFIX, TargetQuantization, dequantize_tensors, quantization_of, scale_name
from model.safetensors_io import local_model_dir, read_tensors, weight_map
from model.target import default_dtype, load_target_config, set_experts_implementation

EMBED_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"
FINAL_NORM_NAME = "model.norm.weight"


def _fuse_experts(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` -> transformers' fused
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and `mlp.experts.down_proj` [E, H, I].
    Keys are relative to the layer; a state that is already fused passes through."""
    if "mlp.experts.gate_up_proj" in state:
        return state
    out = {k: v for k, v in state.items() if not k.startswith("mlp.experts.")}
    try:
        out["mlp.experts.gate_up_proj"] = torch.stack([
            torch.cat([state[f"mlp.experts.{e}.gate_proj.weight"], state[f"mlp.experts.{e}.up_proj.weight"]], dim=0)
            for e in range(num_experts)
        ])
        out["mlp.experts.down_proj"] = torch.stack([state[f"mlp.experts.{e}.down_proj.weight"] for e in range(num_experts)])
    except KeyError as exc:
        raise ValueError(f"the target's last layer lacks expert tensor {exc}; is its last layer dense (mlp_only_layers)?") from None
    return out


def _read(files: dict[str, Path], names: list[str], device, dtype: torch.dtype,
          quant: TargetQuantization | None) -> dict[str, torch.Tensor]:
    """Tensors `names` in `dtype`; an fp8 one is read with its scale and dequantized (module doc)."""
    if quant is None:
        tensors = read_tensors(files, names, device)
        fp8 = sorted(n for n, t in tensors.items() if t.dtype == FP8_DTYPE)
        if fp8:
            raise ValueError(f"{fp8[0]} is float8_e4m3fn but the target's config.json has no quantization_config; "
                             "the checkpoint is incomplete (a block-FP8 config says quant_method fp8 and weight_block_size)")
        return {n: t.to(dtype) for n, t in tensors.items()}
    scales = [scale_name(n) for n in names if n.endswith(".weight") and scale_name(n) in files]
    tensors = dequantize_tensors(read_tensors(files, names + scales, device), quant.block, dtype)
    return {n: t.to(dtype) for n, t in tensors.items()}


# ------------------------------------------------------------------------------ the light target
class SharedTarget(nn.Module):
    """What the trainer uses of a `FrozenTarget` when hidden states come from disk: `config`,
    `embed_tokens`, `lm_head`, `device` and, when loaded, `last_layer`. All frozen."""

    def __init__(self, config: Qwen3MoeConfig, embed_tokens: nn.Embedding, lm_head: nn.Linear,
                 last_layer: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self._last_layer = last_layer
        self.eval()
        self.requires_grad_(False)

    @property
    def last_layer(self) -> nn.Module:
        if self._last_layer is None:
            raise ValueError("the target's last layer was not loaded; call load_shared_weights(..., last_layer=True)")
        return self._last_layer

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def hidden(self, *args, **kwargs):
        raise ValueError(
            "this target holds only embed_tokens and lm_head (offline hidden states, data.hidden_states); "
            "batches must carry 'hidden' from the dump. Unset data.hidden_states to run the target forward"
        )


def load_shared_weights(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    last_layer: bool = False,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> SharedTarget:
    """Read the target's config, `model.embed_tokens.weight`, `lm_head.weight` (the embedding when
    the config ties them) and, with `last_layer=True`, every `model.layers.{L-1}.*` tensor."""
    model_dir = local_model_dir(path)
    config = load_target_config(str(model_dir), trust_remote_code)
    # the same implementation choices FrozenTarget.load makes, so MTPHead(config) is the same head
    set_experts_implementation(config, device)
    config._attn_implementation = attn_implementation
    dtype = dtype or default_dtype(device)
    quant = quantization_of(config)
    if quant is not None:  # the weights held here are dequantized; the config says so, as FrozenTarget's does
        del config.quantization_config
    files = weight_map(model_dir)
    tied = LM_HEAD_NAME not in files and getattr(config, "tie_word_embeddings", False)
    tensors = _read(files, [EMBED_NAME] + ([] if tied else [LM_HEAD_NAME]), device, dtype, quant)
    embed_w = tensors[EMBED_NAME]
    head_w = embed_w if tied else tensors[LM_HEAD_NAME]
    vocab, hidden = config.vocab_size, config.hidden_size
    for name, w in ((EMBED_NAME, embed_w), (LM_HEAD_NAME, head_w)):
        if tuple(w.shape) != (vocab, hidden):
            raise ValueError(f"{name} in '{model_dir}' has shape {tuple(w.shape)}, the config says {(vocab, hidden)}")
    with torch.device("meta"):
        embed = nn.Embedding(vocab, hidden, padding_idx=getattr(config, "pad_token_id", None))
        lm_head = nn.Linear(hidden, vocab, bias=False)
    embed.weight = nn.Parameter(embed_w, requires_grad=False)
    lm_head.weight = nn.Parameter(head_w, requires_grad=False)
    layer = _load_last_layer(config, files, device, dtype, quant) if last_layer else None
    return SharedTarget(config, embed, lm_head, layer)


def _load_last_layer(config: Qwen3MoeConfig, files: dict[str, Path], device, dtype,
                     quant: TargetQuantization | None) -> Qwen3MoeDecoderLayer:
    idx = config.num_hidden_layers - 1
    prefix = f"model.layers.{idx}."
    names = [n for n in files if n.startswith(prefix) and not n.endswith(SCALE_SUFFIX)]
    if not names:
        raise ValueError(f"the target checkpoint has no {prefix}* tensors")
    raw = _read(files, names, device, dtype, quant)
    state = _fuse_experts({n[len(prefix):]: t for n, t in raw.items()}, config.num_experts)
    with torch.device("meta"):
        layer = Qwen3MoeDecoderLayer(config, layer_idx=idx)
    expected = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or sorted(k for k in expected if expected[k] != got[k])
        raise ValueError(f"the target's layer {idx} does not match a Qwen3-MoE decoder layer of this config; differs at {diff[:5]}")
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval().requires_grad_(False)
