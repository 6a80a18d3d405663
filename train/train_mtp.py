"""Train a one-layer MTP draft head against a frozen Qwen3-MoE target.

    accelerate launch --config_file configs/accelerate/zero2.yaml train/train_mtp.py \
        --config configs/qwen3_30b_a3b.yaml train.output_dir=runs/30b head.num_steps=3
    python train/train_mtp.py --config configs/tiny.yaml          # one process, no DeepSpeed

Reads top to bottom: config -> run dir (train/run_dir.py: writable, locked, one run's; the
checkpoint to resume chosen and checked) -> target (before the Accelerator: ZeRO-3 would
partition it) -> accelerator -> head -> data -> optimizer -> resume -> loop -> final weights ->
evaluate -> export. A user error (ValueError, OSError) prints one `error:` line and exits 2;
`--debug` or MTP_DEBUG=1 shows the traceback.
With `target.partition=zero3` the target is built after the Accelerator instead, split across the
ranks by its own ZeRO-3 inference engine (train/partition.py, docs/training.md).

Footguns handled here:
- the target is frozen and is never handed to `accelerator.prepare`; its embedding and lm_head
  are shared with the head by reference, not as submodules;
- label shift lives in model/loss.py only;
- checkpoints (train/checkpoint.py) are written under a temporary name, with a manifest, and
  renamed when complete; SIGTERM/SIGINT finish the current optimizer step, save, and exit 0
  (train/loop.py); `train.resume=auto` continues from the newest one that verifies;
- the export replaces only an export of this same run (export_mtp.py's rule otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from model.head import MTPHead
from model.mtp_weights import RUN_CONFIG_NAME, load_mtp_state
from model.fp8 import quantization_of
from model.target import FrozenTarget, avoid_cudnn_attention, default_dtype, load_target_config, loading_note
from train.accelerator import make_accelerator
from train.checkpoint import resume_or_start, save_final
from train.common import MetricsWriter, env_rank, env_world_size, pick_device, print0
from train.config import Config, load_config, save_config, to_dict
from train.loop import evaluate_heldout, heldout_record, train_loop
from train.partition import gathered
from train.run_dir import Run, export_dir, export_is_ours, open_run


# ----------------------------------------------------------------------------- phases

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (also MTP_DEBUG=1); otherwise a user error is one line")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 head.num_steps=3")
    return p.parse_args(argv)


def build_target(cfg: Config, device: torch.device, accelerator=None) -> FrozenTarget:
    dtype = {"auto": default_dtype(device), "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.target.dtype]
    note = loading_note(quantization_of(load_target_config(cfg.target.path, cfg.target.trust_remote_code)), dtype)
    if note:  # a block-FP8 target: every path below dequantizes it on load
        print0(f"target: {note}")
    if cfg.target.partition == "zero3":
        return build_partitioned_target(cfg, device, dtype, accelerator)
    if cfg.data.hidden_states:
        # Offline: batches carry the stored h_t, so only embed_tokens and lm_head are read (plus the
        # last layer for head.init=last_layer); target.hidden() raises.
        from model.shared_weights import load_shared_weights

        target = load_shared_weights(
            cfg.target.path, device=device, dtype=dtype, last_layer=cfg.head.init == "last_layer",
            attn_implementation=cfg.target.attn_implementation, trust_remote_code=cfg.target.trust_remote_code,
        )
        print0(f"target: {cfg.target.path}, offline: embed_tokens + lm_head only, hidden states from {cfg.data.hidden_states}")
        return target
    target = FrozenTarget.load(
        cfg.target.path, device=device, dtype=dtype,
        trust_remote_code=cfg.target.trust_remote_code, attn_implementation=cfg.target.attn_implementation,
    )
    print0(f"target: {cfg.target.path} ({sum(p.numel() for p in target.parameters()) / 1e6:.1f}M params, {dtype}, {device})")
    if cfg.target.compile:
        if device.type == "cuda":
            target.compile_layers(dynamic=None)  # automatic dynamic: bucketed lengths stop recompiling
            print0("target: decoder layers compiled (target.compile=true)")
        else:
            print0("target.compile=true ignored: compiling pays on a GPU only")
    return target


def build_partitioned_target(cfg: Config, device: torch.device, dtype: torch.dtype, accelerator):
    """target.partition=zero3: decoder layers split across ranks by a ZeRO-3 inference engine,
    embed_tokens and lm_head whole on every rank (train/partition.py). Built after the Accelerator,
    whose process group the engine uses."""
    from accelerate.utils import DistributedType
    from train.partition import load_partitioned_target

    if accelerator is None or accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(
            "target.partition=zero3 needs a DeepSpeed launch: accelerate launch --config_file "
            "configs/accelerate/zero2.yaml train/train_mtp.py ... (docs/training.md, 'Targets larger than one GPU')"
        )
    target = load_partitioned_target(
        cfg.target.path, device, dtype, micro_batch_size=cfg.train.micro_batch_size,
        world_size=accelerator.num_processes, attn_implementation=cfg.target.attn_implementation,
        trust_remote_code=cfg.target.trust_remote_code,
    )
    held, total = target.held_elements()
    print(f"[rank {accelerator.process_index}] target partition: holds {held} of {total} decoder-layer elements "
          f"({100 * held / total:.1f}%); embed_tokens and lm_head replicated", flush=True)
    print0(f"target: {cfg.target.path} ({total / 1e6:.1f}M decoder-layer params partitioned over "
           f"{accelerator.num_processes} ranks by ZeRO-3, {dtype}, {device})")
    return target


def partition_report(accelerator, target) -> dict | None:
    """Per-rank decoder-layer elements held, for final/metrics.json (every rank calls it)."""
    if not hasattr(target, "held_elements"):
        return None
    held, total = target.held_elements()
    held_per_rank = accelerator.gather(torch.tensor([held], device=target.device)).tolist()
    return {"decoder_layer_elements": total, "held_per_rank": held_per_rank}


def build_head(cfg: Config, target: FrozenTarget) -> MTPHead:
    head = MTPHead(target.config)
    init = cfg.head.init
    if init == "random":
        head.init_random(seed=cfg.train.seed)
    elif init == "last_layer":
        with gathered(target.last_layer):  # whole on every rank for the copy (a no-op unless partitioned)
            head.init_from_target_layer(target.last_layer, seed=cfg.train.seed)
    else:  # a path to existing MTP weights: fine-tuning
        head.load_state_dict(load_mtp_state(init, target.config), strict=True)
    head.to(device=target.device, dtype=torch.float32)
    head.activation_checkpointing = cfg.head.activation_checkpointing
    if cfg.head.compile:
        if head.fc.weight.is_cuda:
            head.compile_step()
            print0("head: training step compiled (head.compile=true)")
        else:
            print0("head.compile=true ignored: compiling pays on a GPU only")
    n = sum(p.numel() for p in head.parameters())
    print0(f"head: init={init}, {n / 1e6:.2f}M trainable params, num_steps={cfg.head.num_steps}, loss={cfg.head.loss}")
    return head


def build_data(cfg: Config, tokenizer, accelerator):
    from data.chat import build_chat_dataset
    from data.collate import BucketBatchSampler

    if cfg.data.hidden_states:  # offline: the dump holds the tokenized rows and their h_t
        from data.hidden_states import HiddenStateStore

        ds = HiddenStateStore(cfg.data.hidden_states)
        ds.check_compatible(cfg.target.path, tokenizer, cfg.data)  # a mismatching dump is refused
        report = ds.skip_report()
    else:
        # rank 0 first: it tokenizes and saves the rows under <output_dir>/data_cache; the other
        # ranks (and a resumed run) load them from there
        with accelerator.main_process_first():
            ds, report = build_chat_dataset(
                cfg.data.train, tokenizer, cfg.data.max_length, limit=cfg.data.limit, num_proc=cfg.data.num_proc,
                cache_dir=Path(cfg.train.output_dir) / "data_cache", enable_thinking=cfg.data.enable_thinking,
            )
    print0(f"data: {report.summary()}")
    holdout = min(cfg.data.holdout, max(len(ds) - 1, 0))
    heldout_ds = ds.select(range(holdout)) if holdout else None
    train_ds = ds.select(range(holdout, len(ds)))
    need = cfg.train.micro_batch_size * accelerator.num_processes
    if len(train_ds) < need:
        raise ValueError(
            f"data.train has {len(train_ds)} usable training rows but one step needs {need} "
            f"(train.micro_batch_size x {accelerator.num_processes} processes); add data or lower the batch size"
        )
    sampler = BucketBatchSampler(
        train_ds.lengths if cfg.data.hidden_states else train_ds["length"], cfg.train.micro_batch_size, seed=cfg.train.seed,
        num_replicas=accelerator.num_processes, rank=accelerator.process_index,
        bucket_size_multiplier=cfg.data.bucket_multiplier,
    )
    return train_ds, heldout_ds, sampler, report


def build_optimizer(cfg: Config, head: MTPHead, device: torch.device):
    from transformers import get_cosine_schedule_with_warmup

    decay, no_decay = [], []
    for name, p in head.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        fused=device.type == "cuda",
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
    return optimizer, scheduler


# ----------------------------------------------------------------------------- main

def flat_config(cfg: Config) -> dict:
    """`section.key` -> scalar, as trackers want (tensorboard's hparams takes no None or lists)."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# What a user can cause and fix (a config value, a path, a data file, a busy or foreign run dir):
# one `error:` line, exit 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_training(args.config, args.overrides)
    except USER_ERRORS as e:
        if args.debug or os.environ.get("MTP_DEBUG") == "1":
            raise
        print(f"error: {e}" if env_rank() == 0 else f"[rank {env_rank()}] error: {e}", file=sys.stderr, flush=True)
        return 2


def run_training(config_path: str | None, overrides: list[str]) -> int:
    cfg = load_config(config_path, overrides)
    if cfg.export.enabled and (Path(cfg.target.path) / "config.json").is_file():
        from model.export import plan_export

        plan_export(cfg.target.path, cfg.export.merge, cfg.export.quantize)  # fail now, not after training
    # The run dir is checked, locked and claimed before minutes of target loading (train/run_dir.py).
    run = open_run(cfg, env_rank(), env_world_size())
    try:
        return train_run(cfg, run)
    finally:
        run.close()


def train_run(cfg: Config, run: Run) -> int:
    out_dir = run.out_dir
    device = pick_device()
    cudnn_attention = avoid_cudnn_attention()  # bucketed lengths: no per-shape cuDNN plans (before anything compiles)

    from accelerate.utils import set_seed
    from data.tokenizer import load_tokenizer

    set_seed(cfg.train.seed)
    # A whole target is loaded before the Accelerator exists (under ZeRO-3, transformers would
    # partition it and no engine would gather it: 0 elements per rank); a
    # partitioned one after it, because its ZeRO-3 engine needs the process group.
    target = build_target(cfg, device) if cfg.target.partition == "none" else None
    tokenizer = load_tokenizer(cfg.target.tokenizer or cfg.target.path, trust_remote_code=cfg.target.trust_remote_code)
    accelerator = make_accelerator(cfg, device)
    if target is None:
        target = build_target(cfg, device, accelerator)
    partition = partition_report(accelerator, target)
    same_on_all_ranks(accelerator, run)
    if accelerator.is_main_process:
        run.claim()
        save_config(cfg, out_dir / RUN_CONFIG_NAME)  # a resume changed safe keys only: this is what runs
    accelerator.wait_for_everyone()

    head = build_head(cfg, target)
    train_ds, heldout_ds, sampler, report = build_data(cfg, tokenizer, accelerator)
    optimizer, scheduler = build_optimizer(cfg, head, device)
    head, optimizer, scheduler = accelerator.prepare(head, optimizer, scheduler)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    metrics = MetricsWriter(out_dir / "metrics.jsonl", accelerator.is_main_process)
    state = resume_or_start(accelerator, run.resume_from, run.run_id, metrics)

    if cfg.log.backend != "none":
        accelerator.init_trackers(
            cfg.log.project, config=flat_config(cfg),
            init_kwargs={"wandb": {"name": cfg.log.run_name, "dir": str(out_dir)}} if cfg.log.backend == "wandb" else {},
        )
    finished = train_loop(cfg, accelerator, target, head, optimizer, scheduler, train_ds, sampler, state, out_dir, metrics,
                          pad_id, heldout_ds)
    if not finished:
        accelerator.end_training()
        return 0

    summary = {"step": state.step, "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
               "data": report.as_dict(), **({"target_partition": partition} if partition else {})}
    heldout = evaluate_heldout(cfg, accelerator, target, head, heldout_ds, pad_id)
    if heldout:
        summary.update(heldout)
        metrics.write(heldout_record(state, heldout))
        print0(f"held-out: loss {heldout['heldout_loss']:.4f}, acc {[round(a, 3) for a in heldout['heldout_acc']]}, "
               f"simulated acceptance length {heldout['heldout_simulated_acceptance_length']:.3f}")
    if torch.cuda.is_available():
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    final = save_final(accelerator, head, cfg, out_dir, summary)
    print0(f"final weights: {final}")

    # the speculative evaluation runs with the attention kernels eval_acceptance.py gets
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    post_training(cfg, accelerator, target, tokenizer, final, out_dir, summary, heldout_ds, run.run_id)
    accelerator.end_training()
    return 0


def same_on_all_ranks(accelerator, run: Run) -> None:
    """Every rank chose its checkpoint on its own, from the same files: check they agree, and take
    rank 0's run id (a fresh run's id is drawn on each rank)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    mine = [str(run.resume_from), run.run_id]
    chosen = broadcast_object_list(list(mine), from_process=0)
    if chosen[0] != mine[0]:
        raise RuntimeError(f"rank {accelerator.process_index} chose {mine[0]} to resume from, rank 0 {chosen[0]}")
    run.run_id = chosen[1]  # a fresh run's id is rank 0's


def post_training(cfg, accelerator, target, tokenizer, final: Path, out_dir: Path, summary: dict, heldout_ds,
                  run_id: str) -> None:
    """Evaluate (optional) and export (default on), on rank 0 only, from the saved final weights."""
    if not accelerator.is_main_process:
        return
    acceptance = None
    if cfg.eval.enabled:
        from train.evaluate import run_eval

        report = run_eval(cfg, target, tokenizer, final, heldout_ds, out_dir / "eval.json")
        acceptance = report["acceptance_length"]
        summary["eval_acceptance_length"] = acceptance
        (final / "metrics.json").write_text(json.dumps(summary, indent=2))
    if cfg.export.enabled:
        if cfg.eval.min_acceptance_length is not None and (acceptance is None or acceptance < cfg.eval.min_acceptance_length):
            print0(f"export skipped: acceptance length {acceptance} < eval.min_acceptance_length={cfg.eval.min_acceptance_length}")
            return
        from model.export import export_mtp

        out = export_dir(cfg)
        # export_mtp.py's rule: a non-empty dir is replaced only when this run wrote it (a rerun or
        # resume of the same run); anything else raises (checked at start too, so this is rare)
        try:
            replace = export_is_ours(out, run_id)
        except ValueError as e:
            raise ValueError(f"{e} (the trained weights are in {final}: export them with scripts/export_mtp.py)") from None
        export_mtp(final, cfg.target.path, out, merge=cfg.export.merge, dtype=cfg.export.dtype,
                   quantize=cfg.export.quantize, force=replace, acceptance_length=acceptance,
                   train_config=to_dict(cfg), run_id=run_id, token_map=cfg.eval.token_map)
        print0(f"exported mtp.* weights to {out}")


if __name__ == "__main__":
    sys.exit(main())
