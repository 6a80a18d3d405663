"""The frozen Qwen3-MoE target: loading, hidden states, shared embedding and lm_head.

The target never trains. It gives the head three things:
- `hidden(input_ids)`: the post-final-norm hidden states h_t (the lm_head input), [B, T, H];
- `embed_tokens`: its input embedding, shared by the head (frozen);
- `lm_head`: its output projection, shared by the head (frozen).

Plain single-device code: no accelerate, no DeepSpeed. Partitioning a target larger than one GPU
is done by `train/`, which may hand in any module with the same attributes.

Speed (the target forward is the largest part of an online step): on CUDA the experts of every
layer run model/fast_moe.py's lean grouped-GEMM forward instead of transformers' (same router,
same math, less glue); `lean_experts=False` keeps transformers' path. Two opt-ins:
- `use_lean_layers()`: `hidden` runs model/qwen3_forward.py's layer forward (fused q/k/v GEMM and
  RMSNorm kernels, q/k norm and RoPE on the q and k heads together, lean experts) with no KV
  cache; costs a copy of the q/k/v weights (about 1 GB for Qwen3-30B-A3B in bf16). It ignores
  the attention mask: with right padding and causal attention, real positions are unaffected.
- `compile_layers()`: torch.compile of transformers' decoder layers (one graph shared by all
  layers; compiling takes a while, so it is worth it only for long runs).

Block-FP8 targets (Qwen/Qwen3-*-FP8, recognised from config.json's `quantization_config`,
model/fp8.py) are dequantized to the compute dtype on load, on CPU and GPU alike
(`fp8_load_kwargs`: transformers' loader with `FineGrainedFP8Config(dequantize=True)`, after our
own header checks). Everything downstream (training, evaluation, regeneration, the decode engine
and its Triton kernels) reads plain bf16/fp32 layer weights, so it runs an FP8 target exactly as
a bf16 target whose weights are the FP8 values: same step times, the FP8 release's numbers.
`FrozenTarget.quantization` records what was dequantized.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

from model import fast_moe
from model.fp8 import TargetQuantization, check_checkpoint, quantization_of
from model.qwen3_forward import Dims, LayerWeights, decoder_layer, rms_norm, rope_table

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)


@runtime_checkable
class Target(Protocol):
    """What training asks of a frozen target. Three classes provide it: `FrozenTarget` (the whole
    model on this device), model/shared_weights.py's `SharedTarget` (offline hidden states:
    embedding and lm_head only) and train/partition.py's `PartitionedTarget` (decoder layers
    split across ranks by ZeRO-3). The embedding and lm_head are shared with the head by
    reference, never registered in it."""

    config: Qwen3MoeConfig

    @property
    def embed_tokens(self) -> nn.Embedding: ...

    @property
    def lm_head(self) -> nn.Linear: ...

    @property
    def last_layer(self) -> nn.Module:
        """The last decoder layer, for `head.init=last_layer`."""

    @property
    def device(self) -> torch.device: ...

    def hidden(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Post-final-norm hidden states h_t [B, T, H] (the lm_head input), no grad."""


def avoid_cudnn_attention() -> bool:
    """For training and the hidden-state dump, which meet a new sequence length at nearly every
    batch (length buckets). On Hopper, PyTorch's SDPA prefers cuDNN attention, which builds an
    execution plan on the CPU for each new shape: measured on an H200 (8-layer Qwen3-30B-A3B shape,
    ZeRO-2), about 110 ms of CPU a step in forward and 75 ms in backward, with the GPU idle 80% of
    the step. Flash attention needs no per-shape plan. No effect without a GPU. Returns whether
    cuDNN attention was enabled before (`torch.backends.cuda.enable_cudnn_sdp` restores it)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
    return before


def set_experts_implementation(config, device: torch.device | str) -> None:
    """grouped_mm experts on GPU (4.6x faster than the per-expert loop on an H200);
    the eager loop on CPU, where grouped_mm has no fast kernel."""
    impl = "grouped_mm" if torch.device(device).type == "cuda" else "eager"
    config._experts_implementation = impl


def load_target_config(path_or_id: str, trust_remote_code: bool = False) -> Qwen3MoeConfig:
    """Read and check the target's config; a clear error if it is not Qwen3-MoE."""
    local = Path(path_or_id)
    if local.exists() and local.is_dir() and not (local / "config.json").exists():
        raise ValueError(f"target '{path_or_id}' is a directory without config.json; point target.path at a Qwen3-MoE model dir")
    if not local.exists() and (path_or_id.startswith((".", "/")) or os.sep in path_or_id and path_or_id.count("/") > 1):
        raise FileNotFoundError(f"target '{path_or_id}' does not exist; check target.path")
    try:
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except Exception as exc:  # the hub/IO error text is useful, keep it
        raise ValueError(f"cannot read the target config from '{path_or_id}': {exc}") from exc
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"target '{path_or_id}' is model_type={getattr(config, 'model_type', None)!r}; "
            f"this toolkit trains MTP heads for {SUPPORTED_MODEL_TYPES} (Qwen3-MoE) targets only"
        )
    return config


def fp8_load_kwargs(path_or_id: str, config) -> dict:
    """`from_pretrained` keyword arguments for the target's weights: {} for a bf16/fp32 checkpoint;
    for a block-FP8 one, transformers' `FineGrainedFP8Config(dequantize=True)`, so every weight
    arrives dequantized in the requested dtype (on a GPU transformers would otherwise build FP8
    linear layers, which the lean layers, fast_moe and the decode engine cannot read).

    A local checkpoint's headers are checked first (model/fp8.check_checkpoint: scales present
    and of the block grid's shape). transformers infers each weight's block from the weight and
    scale shapes, which is right only when a dimension is a whole number of blocks or a single
    (partial) block; any other ragged weight is refused here instead of being dequantized wrong.
    """
    quant = quantization_of(config)
    if quant is None:
        return {}
    local = Path(path_or_id)
    if (local / "config.json").is_file():
        from model.safetensors_io import weight_map

        shapes = check_checkpoint(weight_map(local), quant)
        ragged = [f"{n} {shape}" for n, shape in shapes.items()
                  if any(d % b and d > b for d, b in zip(shape[-2:], quant.block))]
        if ragged:
            raise ValueError(
                f"target '{path_or_id}': {len(ragged)} fp8 weights are not a whole number of {quant.block[0]}x"
                f"{quant.block[1]} blocks (e.g. {ragged[0]}); transformers' dequantizing loader would read them with "
                "the wrong block size. The Qwen3 FP8 releases' dimensions are whole 128x128 blocks; use such a checkpoint"
            )
    from transformers import FineGrainedFP8Config

    return {"quantization_config": FineGrainedFP8Config(
        dequantize=True, weight_block_size=quant.block, modules_to_not_convert=list(quant.not_converted) or None)}


def loading_note(quantization: TargetQuantization | None, dtype: torch.dtype) -> str:
    """One log line saying how the target's weights were loaded ('' for a bf16/fp32 checkpoint)."""
    if quantization is None:
        return ""
    return (f"{quantization.describe()} checkpoint: weights dequantized to {str(dtype).removeprefix('torch.')} on "
            "load; training, evaluation and the decode engine run the dequantized weights (docs/training.md, FP8 targets)")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and tests want exact comparisons)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class FrozenTarget(nn.Module):
    """A frozen `Qwen3MoeForCausalLM` with the few views the MTP head needs."""

    def __init__(self, model: Qwen3MoeForCausalLM, lean_experts: bool | None = None):
        """`lean_experts`: None = on when the model's weights are on a GPU (module docstring)."""
        super().__init__()
        self.model = model
        self.model.eval()
        self.model.requires_grad_(False)
        self.quantization: TargetQuantization | None = None  # set by load() for a block-FP8 checkpoint
        self._lean_layers = None  # (Dims, [LayerWeights]) while use_lean_layers is on
        self._lean_layer_fn = None  # qwen3_forward.decoder_layer, or its torch.compile'd form
        if lean_experts is None:
            lean_experts = model.lm_head.weight.device.type == "cuda"
        self.use_lean_experts(lean_experts)

    def use_lean_experts(self, enable: bool = True) -> None:
        """Switch every MoE layer's experts to fast_moe.experts_grouped (True) or back to
        transformers' implementation (False). Inference only, which is all a frozen target does."""
        self.lean_experts = enable
        fast_moe.use_lean_experts(self.model, enable)

    def use_lean_layers(self, enable: bool = True, compile: bool = False) -> None:
        """Opt-in: `hidden` runs qwen3_forward.py's decoder-layer forward over these weights (module
        docstring); enable=False frees its fused q/k/v copies and goes back to transformers.
        compile=True runs that layer function through torch.compile (one graph for all layers,
        the weights are its inputs; a new input shape compiles again)."""
        self._lean_layer_fn = torch.compile(decoder_layer, dynamic=False) if enable and compile else decoder_layer
        if not enable:
            self._lean_layers = None
            return
        if self._lean_layers is not None:
            return
        w = self.lm_head.weight
        layers = [LayerWeights.of(layer, w.device, w.dtype) for layer in self.model.model.layers]
        self._lean_layers = (Dims.of(self.config), layers)

    def _lean_hidden(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        dims, layers = self._lean_layers
        w = self.lm_head.weight
        experts = "grouped_mm" if w.device.type == "cuda" else "loop"
        T = input_ids_BT.shape[1]
        cos_TD, sin_TD = rope_table(self.model.model.rotary_emb, T, w.device, w.dtype)
        cos, sin = cos_TD[None, :, None], sin_TD[None, :, None]  # [1, T, 1, D]
        x_BTH = self.embed_tokens(input_ids_BT).to(w.dtype)
        for lw in layers:
            # kv_cache None + mask None: causal prefill, nothing cached
            x_BTH = self._lean_layer_fn(x_BTH, lw, dims, None, cos, sin, None, None, None, experts)
        return rms_norm(x_BTH, self.model.model.norm.weight, dims.eps)

    def compile_layers(self, enable: bool = True, **compile_kwargs) -> None:
        """Opt-in: torch.compile each decoder layer in place (`nn.Module.compile`); enable=False
        goes back to eager. The layers share their code, so after the first layer's graph the
        others reuse it (weights are inputs); a new input shape compiles again. Keyword arguments
        go to torch.compile. Not exercised by the CPU tests (compiling is a GPU-only benefit)."""
        layers = self.model.model.layers
        if not enable:
            for layer in layers:
                layer._compiled_call_impl = None  # what nn.Module.compile set
            return
        dyn = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        setattr(dyn, limit, max(getattr(dyn, limit), 2 * len(layers)))
        compile_kwargs.setdefault("dynamic", False)
        for layer in layers:
            layer.compile(**compile_kwargs)

    @classmethod
    def load(
        cls,
        path_or_id: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
    ) -> "FrozenTarget":
        """The target at `path_or_id` on `device` in `dtype` (default: `default_dtype`); a block-FP8
        checkpoint is dequantized to `dtype` on load (module docstring, `loading_note`)."""
        config = load_target_config(path_or_id, trust_remote_code)
        set_experts_implementation(config, device)
        dtype = dtype or default_dtype(device)
        quantization = quantization_of(config)
        kwargs = fp8_load_kwargs(path_or_id, config)
        try:
            model = Qwen3MoeForCausalLM.from_pretrained(
                path_or_id,
                config=config,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                # transformers >= 5.25 defaults to hub kernels, which need the `kernels` package and a
                # download; the toolkit runs its own layers
                use_kernels=False,
                **kwargs,
            )
        except Exception as exc:
            raise ValueError(f"cannot load the target weights from '{path_or_id}': {exc}") from exc
        target = cls(model.to(device))
        target.quantization = quantization
        return target

    # ------------------------------------------------------------ accessors
    @property
    def config(self) -> Qwen3MoeConfig:
        return self.model.config

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def last_layer(self) -> nn.Module:
        return self.model.model.layers[-1]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -------------------------------------------------------------- compute
    @torch.no_grad()
    def hidden(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Post-final-norm hidden states h_t, [B, T, H] (= the lm_head input).

        Right padding only: with a causal mask, padded positions never influence real ones.
        """
        if self._lean_layers is not None:
            return self._lean_hidden(input_ids_BT)
        out = self.model.model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None, with_logits: bool = False):
        """(hidden_BTH, logits_BTV or None). Logits are computed only when asked: the full
        [B, T, 151936] tensor is the largest activation of a training step."""
        hidden_BTH = self.hidden(input_ids_BT, attention_mask_BT)
        logits_BTV = self.lm_head(hidden_BTH) if with_logits else None
        return hidden_BTH, logits_BTV
