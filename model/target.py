"""The frozen Qwen3-MoE target: loading, hidden states, shared embedding and lm_head.

The target never trains. It gives the head three things:
- `hidden(input_ids)`: the post-final-norm hidden states h_t (the lm_head input), [B, T, H];
- `embed_tokens`: its input embedding, shared by the head (frozen);
- `lm_head`: its output projection, shared by the head (frozen).

Plain single-device code: no accelerate, no DeepSpeed. Partitioning a target larger than one GPU
is done by `train/`, which may hand in any module with the same attributes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)


def set_experts_implementation(config, device: torch.device | str) -> None:
    """grouped_mm experts on GPU (4.6x faster than the per-expert loop, design.md §5);
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


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and tests want exact comparisons)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class FrozenTarget(nn.Module):
    """A frozen `Qwen3MoeForCausalLM` with the few views the MTP head needs."""

    def __init__(self, model: Qwen3MoeForCausalLM):
        super().__init__()
        self.model = model
        self.model.eval()
        self.model.requires_grad_(False)

    @classmethod
    def load(
        cls,
        path_or_id: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
    ) -> "FrozenTarget":
        config = load_target_config(path_or_id, trust_remote_code)
        set_experts_implementation(config, device)
        dtype = dtype or default_dtype(device)
        try:
            model = Qwen3MoeForCausalLM.from_pretrained(
                path_or_id,
                config=config,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        except Exception as exc:
            raise ValueError(f"cannot load the target weights from '{path_or_id}': {exc}") from exc
        return cls(model.to(device))

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
        out = self.model.model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None, with_logits: bool = False):
        """(hidden_BTH, logits_BTV or None). Logits are computed only when asked: the full
        [B, T, 151936] tensor is the largest activation of a training step."""
        hidden_BTH = self.hidden(input_ids_BT, attention_mask_BT)
        logits_BTV = self.lm_head(hidden_BTH) if with_logits else None
        return hidden_BTH, logits_BTV


def read_config_text(model_dir: str | Path) -> dict:
    """The target's config.json as written by its authors (not re-serialised by transformers,
    which renames `num_experts` to `num_local_experts`; design.md §2)."""
    with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
        return json.load(f)
