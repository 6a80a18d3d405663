"""The Accelerator of a training run, with the DeepSpeed settings this trainer needs.

    accelerator = make_accelerator(cfg, device)

Batches are sharded by our own resumable sampler and never go through `prepare()`, so the
DeepSpeed batch fields are filled in here; on CPU the process group must be gloo.
"""

from __future__ import annotations

import os

import torch

from train.common import env_world_size, print0
from train.config import Config


def drop_overlap_comm_for_one_process(ds_config: dict, num_processes: int) -> bool:
    """ZeRO-1/2's overlap_comm overlaps the gradient reduction with the backward and pays for it with
    a device-wide synchronize after every backward. One process reduces nothing, so only the
    synchronize is left: the GPU idles while the CPU launches the optimizer step (one H200, ZeRO-2:
    83 ms of wall a step for 64 ms of GPU work). Turned off there; True when it was."""
    zero_opt = ds_config.get("zero_optimization") or {}
    if num_processes == 1 and zero_opt.get("stage") in (1, 2) and zero_opt.get("overlap_comm"):
        zero_opt["overlap_comm"] = False
        return True
    return False


def make_accelerator(cfg: Config, device: torch.device):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    kwargs_handlers = []
    if device.type == "cpu" and env_world_size() > 1:
        # accelerate + DeepSpeed on CPU run with 2 processes only under gloo (otherwise accelerate
        # sees one process and DeepSpeed's batch-size assertion fails)
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
    log_with = None if cfg.log.backend == "none" else cfg.log.backend
    if cfg.log.backend == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # never prompt for a key
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        kwargs_handlers=kwargs_handlers,
        log_with=log_with,
        project_dir=cfg.train.output_dir,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # We shard batches ourselves (resumable sampler), so the dataloader never goes through
        # prepare(); DeepSpeed then needs the batch settings spelled out or it raises.
        ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = cfg.train.grad_clip
        drop_overlap_comm_for_one_process(ds, accelerator.num_processes)
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            # Checkpoints and final/ write the whole head (head.safetensors), which under ZeRO-3
            # needs its partitions gathered on save. accelerate's own flags
            # (`--use_deepspeed --zero_stage 3`, no config file) leave this off, and the first
            # save would fail after the steps were trained.
            ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    zero = ""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # for the log line and the ZeRO-3 check
        zero = f", ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    print0(f"accelerator: {accelerator.distributed_type.value}{zero}, {accelerator.num_processes} process(es), "
           f"device {device}, mixed precision {accelerator.mixed_precision}")
    if zero == ", ZeRO-3" and cfg.head.num_steps > 1:
        # ZeRO-3 reduces a parameter's gradient once per use in the graph; the k recursive steps
        # use every head parameter k times and DeepSpeed 0.19 asserts (duplicate ds_id in a reduce
        # bucket). Marking the head a ZeRO-3 "leaf" module avoids the assert but its gradients then
        # never reach the optimizer (measured: the loss stays flat), so refuse instead of training
        # nothing.
        raise ValueError(
            f"head.num_steps={cfg.head.num_steps} is not supported under DeepSpeed ZeRO-3: each head parameter "
            "is used k times per step. The head is small (0.63B params for Qwen3-30B-A3B): train it under "
            "ZeRO-2 (configs/accelerate/zero2.yaml), or use head.num_steps=1 with ZeRO-3"
        )
    if zero == ", ZeRO-3" and cfg.head.compile:
        # ZeRO-3 gathers and frees each parameter from module hooks, which a compiled graph of the
        # whole layer does not run between its ops
        raise ValueError("head.compile=true is not supported under DeepSpeed ZeRO-3; train the head under ZeRO-2 "
                         "(configs/accelerate/zero2.yaml) or set head.compile=false")
    if accelerator.num_processes != env_world_size():
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} processes but WORLD_SIZE={env_world_size()}")
    return accelerator
