"""A frozen target partitioned across ranks with DeepSpeed ZeRO-3 (`target.partition=zero3`).

    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 8 train/train_mtp.py \
        --config configs/qwen3_30b_a3b.yaml target.partition=zero3

For targets larger than one GPU. The head still trains under the Accelerator's own DeepSpeed engine
(ZeRO-2 by default); the target gets a second, inference-only DeepSpeed engine (ZeRO-3, no
optimizer) that the Accelerator never sees, so `save_state` / `load_state` stay the head's alone.

What is partitioned and what is not:
- the decoder layers and the final norm are ZeRO-3 parameters: each rank stores 1/world_size of
  every tensor, and the engine all-gathers one layer's parameters just before that layer runs and
  frees them after it (prefetching the next while the current one computes);
- `embed_tokens` and `lm_head` are replicated on every rank, read straight from the checkpoint
  (model/shared_weights.py). The head uses both outside the target's forward, in its own forward
  and backward, so gathering them would cost two extra vocabulary-sized all-gathers per micro-batch
  and hold them gathered through the backward anyway. The decoder therefore runs on `inputs_embeds`
  computed here from the replicated embedding; its own (partitioned) embedding and the CausalLM's
  lm_head are dropped after loading.

Every rank must call `hidden()` the same number of times (the all-gathers are collectives). The
training loop and the held-out evaluation do; the rank-0-only speculative evaluator cannot, which
is why train/config.py refuses `eval.enabled` with a partitioned target.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

from model.shared_weights import load_shared_weights
from model.target import fp8_load_kwargs, load_target_config, set_experts_implementation

PREFETCH_BUCKET_SIZE = 50_000_000  # elements fetched ahead of the running layer


def target_zero3_config(micro_batch_size: int, world_size: int, bf16: bool, hidden_size: int) -> dict:
    """DeepSpeed config of the target's inference engine. DeepSpeed checks the batch fields even
    without an optimizer; they only need to be consistent.

    Parameters of at most `hidden_size` elements (the RMSNorm weights, a few KB a layer) stay whole
    on every rank after their first use (DeepSpeed's stage3_param_persistence_threshold): gathering
    them per layer would cost more latency than it saves memory. Every matrix stays partitioned.
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": hidden_size,
            "stage3_prefetch_bucket_size": PREFETCH_BUCKET_SIZE,
        },
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def hf_zero3_loading(ds_config: dict):
    """While active, transformers' `from_pretrained` builds the model under `deepspeed.zero.Init`
    (each rank allocates only its partitions) and copies checkpoint tensors in one module at a
    time from rank 0. transformers keeps the config through a weak reference; the previous one
    (the Accelerator's, under a ZeRO-3 head) is put back afterwards."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_ds

    previous = hf_ds._hf_deepspeed_config_weak_ref
    holder = HfDeepSpeedConfig(ds_config)  # registers itself
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = previous
        del holder


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gathered(module: nn.Module):
    """Context in which a partitioned module's parameters are whole on every rank (read-only);
    a no-op for an ordinary module. Every rank must enter it."""
    params = [p for p in module.parameters() if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class PartitionedTarget(nn.Module):
    """The attributes of model.target.FrozenTarget that training uses (`config`, `embed_tokens`,
    `lm_head`, `last_layer`, `device`, `hidden`), over a ZeRO-3 partitioned decoder."""

    def __init__(self, config: Qwen3MoeConfig, engine, embed_tokens: nn.Embedding, lm_head: nn.Linear):
        super().__init__()
        self.config = config
        self.engine = engine  # deepspeed.DeepSpeedEngine around the Qwen3MoeModel (embed_tokens dropped)
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self.eval()
        self.requires_grad_(False)

    @property
    def decoder(self) -> nn.Module:
        return self.engine.module

    @property
    def last_layer(self) -> nn.Module:
        """Partitioned: read it inside `gathered(target.last_layer)`."""
        return self.decoder.layers[-1]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @torch.no_grad()
    def hidden(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Post-final-norm hidden states h_t, [B, T, H]; a collective (see the module docstring)."""
        embeds_BTH = self.embed_tokens(input_ids_BT)
        out = self.engine(inputs_embeds=embeds_BTH, attention_mask=attention_mask_BT, use_cache=False)
        return out.last_hidden_state

    def held_elements(self) -> tuple[int, int]:
        """(elements of the decoder layers stored on this rank, elements in all of them). A
        persistent parameter (a norm weight) counts its partition plus its whole copy, which stays
        resident once gathered."""
        local = total = 0
        for p in self.decoder.layers.parameters():
            assert is_partitioned(p), "a decoder-layer parameter escaped ZeRO-3 partitioning"
            local += p.ds_tensor.numel() + (p.ds_numel if getattr(p, "ds_persist", False) else 0)
            total += p.ds_numel
        return local, total


def load_partitioned_target(
    path: str, device: torch.device, dtype: torch.dtype, *, micro_batch_size: int, world_size: int,
    attn_implementation: str = "sdpa", trust_remote_code: bool = False,
) -> PartitionedTarget:
    """Replicated embed_tokens + lm_head, and the decoder loaded straight into ZeRO-3 partitions.
    Needs torch.distributed / deepspeed.comm initialised (the Accelerator does it)."""
    import deepspeed

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"target.partition=zero3 reads the target from a local directory; target.path={path} is not "
                         "one (download the checkpoint once and point target.path at it)")
    shared = load_shared_weights(path, device=device, dtype=dtype, last_layer=False,
                                 attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    config = load_target_config(path, trust_remote_code)
    set_experts_implementation(config, device)
    fp8 = fp8_load_kwargs(path, config)  # a block-FP8 target is dequantized to `dtype` as it loads
    ds_config = target_zero3_config(micro_batch_size, world_size, bf16=dtype == torch.bfloat16,
                                    hidden_size=config.hidden_size)
    with hf_zero3_loading(ds_config):
        model = Qwen3MoeForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, use_kernels=False, **fp8,  # no hub kernels (model/target.py)
        )
    decoder = model.model
    # the replicated copies above serve the decoder's input and the head; these partitioned
    # duplicates would only take memory
    decoder.embed_tokens = None
    del model
    decoder.eval()
    decoder.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=decoder, config=ds_config)
    engine.eval()
    return PartitionedTarget(decoder.config, engine, shared.embed_tokens, shared.lm_head)
