"""Train a one-layer MTP draft head against a frozen Qwen3-MoE target.

    accelerate launch --config_file configs/accelerate/zero2.yaml train/train_mtp.py \
        --config configs/qwen3_30b_a3b.yaml train.output_dir=runs/30b head.num_steps=3
    python train/train_mtp.py --config configs/tiny.yaml          # one process, no DeepSpeed

Reads top to bottom: config -> target (before the Accelerator: ZeRO-3 would partition it) ->
accelerator -> head -> data -> optimizer -> resume -> loop -> final weights -> evaluate -> export.
With `target.partition=zero3` the target is built after the Accelerator instead, split across the
ranks by its own ZeRO-3 inference engine (train/partition.py, docs/training.md).

Footguns handled here:
- the target is frozen and is never handed to `accelerator.prepare`; its embedding and lm_head
  are shared with the head by reference, not as submodules;
- label shift lives in model/loss.py only;
- checkpoints are written under a temporary name and renamed when complete; SIGTERM/SIGINT
  finish the current optimizer step, save, and exit 0; `train.resume=auto` continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python train/train_mtp.py` / `accelerate launch train/train_mtp.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from model.head import MTPHead
from model.loss import mtp_loss, simulated_acceptance_length
from model.target import FrozenTarget, default_dtype
from train.common import MetricsWriter, env_rank, env_world_size, pick_device, print0
from train.config import Config, load_config, save_config, to_dict
from train.partition import gathered

from model.export import HEAD_WEIGHTS_NAME, RUN_CONFIG_NAME  # noqa: E402  (shared with the exporter)

TRAINER_STATE_NAME = "trainer_state.json"


# ----------------------------------------------------------------------------- phases

def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 head.num_steps=3")
    args = p.parse_args(argv)
    return args.config, args.overrides


def build_target(cfg: Config, device: torch.device, accelerator=None) -> FrozenTarget:
    dtype = {"auto": default_dtype(device), "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.target.dtype]
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
        from model.export import load_mtp_state

        head.load_state_dict(load_mtp_state(init, target.config), strict=True)
    head.to(device=target.device, dtype=torch.float32)
    head.activation_checkpointing = cfg.head.activation_checkpointing
    n = sum(p.numel() for p in head.parameters())
    print0(f"head: init={init}, {n / 1e6:.2f}M trainable params, num_steps={cfg.head.num_steps}, loss={cfg.head.loss}")
    return head


def make_accelerator(cfg: Config, device: torch.device):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    kwargs_handlers = []
    if device.type == "cpu" and env_world_size() > 1:
        # accelerate + DeepSpeed on CPU only work with gloo (design.md §5)
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
        # prepare(); DeepSpeed then needs the batch settings spelled out (design.md §5).
        ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = cfg.train.grad_clip
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
    if accelerator.num_processes != env_world_size():
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} processes but WORLD_SIZE={env_world_size()}")
    return accelerator


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
                cache_dir=Path(cfg.train.output_dir) / "data_cache",
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


# ----------------------------------------------------------------------------- state

@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens_seen: int = 0
    train_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """checkpoint-<step> dirs that were renamed into place (complete), oldest first."""
    found = []
    for p in out_dir.glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if p.is_dir() and tail.isdigit() and (p / TRAINER_STATE_NAME).exists():
            found.append((int(tail), p))
    return [p for _, p in sorted(found)]


def resolve_resume(cfg: Config, out_dir: Path) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        ckpts = complete_checkpoints(out_dir)
        return ckpts[-1] if ckpts else None
    path = Path(cfg.train.resume)
    if not (path / TRAINER_STATE_NAME).exists():
        raise ValueError(f"train.resume={path}: not a complete checkpoint dir (no {TRAINER_STATE_NAME})")
    return path


def save_checkpoint(accelerator, head, cfg: Config, state: TrainerState, out_dir: Path) -> Path:
    """Full training state (DeepSpeed engine, optimizer, scheduler, RNG) + head weights + config +
    data position, written to a temporary dir and renamed when complete."""
    final = out_dir / f"checkpoint-{state.step}"
    tmp = out_dir / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    weights = accelerator.get_state_dict(head)  # gathers ZeRO-3 partitions; every rank calls it
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / HEAD_WEIGHTS_NAME))
        save_config(cfg, tmp / RUN_CONFIG_NAME)
        (tmp / TRAINER_STATE_NAME).write_text(state.to_json())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(out_dir)[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(accelerator, head, cfg: Config, out_dir: Path, extra: dict) -> Path:
    final = out_dir / "final"
    tmp = out_dir / ".tmp-final"
    weights = accelerator.get_state_dict(head)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / HEAD_WEIGHTS_NAME))
        save_config(cfg, tmp / RUN_CONFIG_NAME)
        (tmp / "metrics.json").write_text(json.dumps(extra, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


class StopFlag:
    """SIGTERM/SIGINT ask for a clean stop at the next optimizer-step boundary."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested:  # a second signal: give up immediately
            raise KeyboardInterrupt
        self.requested = True
        print(f"[rank {env_rank()}] signal {signum}: will save a checkpoint and exit", flush=True)


# ----------------------------------------------------------------------------- loop

def collate_rows(dataset, rows: list[dict], pad_id: int) -> dict:
    """Right-padded batch; rows of offline hidden states (data.hidden_states) also give "hidden" [B, T, H]."""
    from data.collate import collate_batch
    from data.hidden_states import HiddenStateStore, collate_hidden_states

    if isinstance(dataset, HiddenStateStore):
        return collate_hidden_states(rows, pad_id=pad_id)
    return collate_batch(rows, pad_id=pad_id)


def iterate_batches(sampler, dataset, state: TrainerState, pad_id: int):
    """Endless micro-batches from (epoch, batch_in_epoch) on; advances `state` as it goes."""
    while True:
        sampler.set_epoch(state.epoch)
        for i, indices in enumerate(sampler):
            if i < state.batch_in_epoch:
                continue
            rows = dataset.select(indices)
            batch = collate_rows(dataset, [rows[j] for j in range(len(indices))], pad_id=pad_id)
            state.batch_in_epoch = i + 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def loss_for_batch(cfg: Config, target: FrozenTarget, head, batch: dict, device: torch.device):
    input_ids = batch["input_ids"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    attn = batch["attention_mask"].to(device)
    if "hidden" in batch:  # offline (data.hidden_states): h_t stored by scripts/dump_hidden_states.py
        hidden = batch["hidden"].to(device, non_blocking=True)  # [B, T, H]
    else:
        hidden = target.hidden(input_ids, attn)  # [B, T, H], no grad
    return mtp_loss(
        head, target.embed_tokens, target.lm_head, input_ids, hidden, loss_mask,
        num_steps=cfg.head.num_steps, step_decay=cfg.head.step_decay, loss_type=cfg.head.loss,
        kl_weight=cfg.head.kl_weight, chunk_size=cfg.head.loss_chunk_size,
    ), int(attn.sum())


def train_loop(cfg, accelerator, target, head, optimizer, scheduler, train_ds, sampler, state, out_dir, metrics, pad_id):
    device = target.device
    K = cfg.head.num_steps
    stop = StopFlag()
    batches = iterate_batches(sampler, train_ds, state, pad_id)
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)
    win = {"loss": torch.zeros((), device=device), "n": 0, "correct": torch.zeros(K, device=device),
           "count": torch.zeros(K, device=device), "tokens": 0, "t0": time.perf_counter()}
    head.train()
    while state.step < cfg.train.max_steps:
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(head):
                out, ntok = loss_for_batch(cfg, target, head, batch, device)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.train.grad_clip > 0:
                    accelerator.clip_grad_norm_(head.parameters(), cfg.train.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            win["loss"] += out.loss.detach().float()
            win["n"] += 1
            win["correct"] += out.correct
            win["count"] += out.count
            win["tokens"] += ntok
        state.step += 1
        bar.update(1)

        last = state.step == cfg.train.max_steps
        if state.step % cfg.train.log_every == 0 or last:
            rec = log_window(accelerator, win, state, scheduler, K)
            metrics.write(rec)
            accelerator.log({k: v for k, v in rec.items() if k != "acc"} | {f"acc_{j + 1}": a for j, a in enumerate(rec["acc"])}, step=state.step)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", sim_al=f"{rec['simulated_acceptance_length']:.2f}")
            win.update(loss=torch.zeros((), device=device), n=0, correct=torch.zeros(K, device=device),
                       count=torch.zeros(K, device=device), tokens=0, t0=time.perf_counter())

        # a signal during the last step just lets the run finish (final/ and export follow)
        stop_now = not last and agree_on_stop(accelerator, stop.requested, device)
        if (cfg.train.save_every and state.step % cfg.train.save_every == 0 and not last) or stop_now:
            path = save_checkpoint(accelerator, head, cfg, state, out_dir)
            print0(f"saved {path}")
        if stop_now:
            bar.close()
            print0(f"stopped by signal at step {state.step}; resume with train.resume=auto")
            return False
    bar.close()
    return True


def agree_on_stop(accelerator, requested: bool, device) -> bool:
    """Every rank must save together, so a signal seen by one rank stops all of them."""
    if accelerator.num_processes == 1:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def log_window(accelerator, win, state: TrainerState, scheduler, K: int) -> dict:
    now = time.perf_counter()
    stats = torch.cat([win["loss"].reshape(1), torch.tensor([float(win["n"]), float(win["tokens"])], device=win["loss"].device),
                       win["correct"], win["count"]])
    stats = accelerator.reduce(stats, reduction="sum")
    loss = (stats[0] / stats[1]).item()
    tokens = int(stats[2].item())
    correct, count = stats[3 : 3 + K], stats[3 + K :]
    acc = [(c / n).item() if n > 0 else 0.0 for c, n in zip(correct, count)]
    dt = max(now - win["t0"], 1e-9)
    state.tokens_seen += tokens
    state.train_seconds += dt
    return {
        "step": state.step,
        "loss": loss,
        "acc": acc,
        "simulated_acceptance_length": simulated_acceptance_length(acc),
        "lr": scheduler.get_last_lr()[0],
        "tokens_per_s": tokens / dt,
        "tokens_seen": state.tokens_seen,
        "epoch": state.epoch,
        **({"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}),
    }


@torch.no_grad()
def evaluate_heldout(cfg, accelerator, target, head, heldout_ds, pad_id) -> dict | None:
    """Loss, per-step top-1 accuracy and simulated acceptance length on the held-out rows."""
    if heldout_ds is None or len(heldout_ds) == 0:
        return None
    K, device = cfg.head.num_steps, target.device
    head.eval()
    tot = torch.zeros(2 + 2 * K, device=device)
    # each rank takes a strided share; ranks with fewer rows still run the same number of batches
    rows = list(range(accelerator.process_index, len(heldout_ds), accelerator.num_processes))
    bs = cfg.train.micro_batch_size
    n_batches = math.ceil(math.ceil(len(heldout_ds) / accelerator.num_processes) / bs)
    for b in range(n_batches):
        idx = rows[b * bs : (b + 1) * bs] or [0]
        batch = collate_rows(heldout_ds, [heldout_ds[i] for i in idx], pad_id=pad_id)
        out, _ = loss_for_batch(cfg, target, head, batch, device)
        weight = 1.0 if rows[b * bs : (b + 1) * bs] else 0.0
        tot += weight * torch.cat([out.loss.detach().float().reshape(1), torch.ones(1, device=device), out.correct, out.count])
    tot = accelerator.reduce(tot, reduction="sum")
    head.train()
    acc = [(c / n).item() if n > 0 else 0.0 for c, n in zip(tot[2 : 2 + K], tot[2 + K :])]
    return {
        "heldout_loss": (tot[0] / tot[1].clamp(min=1)).item(),
        "heldout_acc": acc,
        "heldout_simulated_acceptance_length": simulated_acceptance_length(acc),
        "heldout_rows": len(heldout_ds),
    }


# ----------------------------------------------------------------------------- main

def flat_config(cfg: Config) -> dict:
    """`section.key` -> scalar, as trackers want (tensorboard's hparams takes no None or lists)."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)
    cfg = load_config(config_path, overrides)
    out_dir = Path(cfg.train.output_dir)
    device = pick_device()

    from accelerate.utils import set_seed
    from data.tokenizer import load_tokenizer

    set_seed(cfg.train.seed)
    # A whole target is loaded before the Accelerator exists (ZeRO-3 trap, design.md §5); a
    # partitioned one after it, because its ZeRO-3 engine needs the process group.
    target = build_target(cfg, device) if cfg.target.partition == "none" else None
    tokenizer = load_tokenizer(cfg.target.tokenizer or cfg.target.path, trust_remote_code=cfg.target.trust_remote_code)
    accelerator = make_accelerator(cfg, device)
    if target is None:
        target = build_target(cfg, device, accelerator)
    partition = partition_report(accelerator, target)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / RUN_CONFIG_NAME)
    accelerator.wait_for_everyone()

    head = build_head(cfg, target)
    train_ds, heldout_ds, sampler, report = build_data(cfg, tokenizer, accelerator)
    optimizer, scheduler = build_optimizer(cfg, head, device)
    head, optimizer, scheduler = accelerator.prepare(head, optimizer, scheduler)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    state = TrainerState()
    metrics = MetricsWriter(out_dir / "metrics.jsonl", accelerator.is_main_process)
    resume_from = resolve_resume(cfg, out_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = TrainerState(**json.loads((resume_from / TRAINER_STATE_NAME).read_text()))
        metrics.truncate_after(state.step)
        print0(f"resumed from {resume_from} at step {state.step}")
    elif accelerator.is_main_process and metrics.path.exists():
        metrics.path.unlink()  # a fresh run starts a fresh log

    if cfg.log.backend != "none":
        accelerator.init_trackers(
            cfg.log.project, config=flat_config(cfg),
            init_kwargs={"wandb": {"name": cfg.log.run_name, "dir": str(out_dir)}} if cfg.log.backend == "wandb" else {},
        )
    finished = train_loop(cfg, accelerator, target, head, optimizer, scheduler, train_ds, sampler, state, out_dir, metrics, pad_id)
    if not finished:
        accelerator.end_training()
        return 0

    summary = {"step": state.step, "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
               "data": report.as_dict(), **({"target_partition": partition} if partition else {})}
    heldout = evaluate_heldout(cfg, accelerator, target, head, heldout_ds, pad_id)
    if heldout:
        summary.update(heldout)
        metrics.write({"kind": "heldout", "step": state.step, **heldout})
        print0(f"held-out: loss {heldout['heldout_loss']:.4f}, acc {[round(a, 3) for a in heldout['heldout_acc']]}, "
               f"simulated acceptance length {heldout['heldout_simulated_acceptance_length']:.3f}")
    if torch.cuda.is_available():
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    final = save_final(accelerator, head, cfg, out_dir, summary)
    print0(f"final weights: {final}")

    post_training(cfg, accelerator, target, tokenizer, final, out_dir, summary, heldout_ds)
    accelerator.end_training()
    return 0


def post_training(cfg, accelerator, target, tokenizer, final: Path, out_dir: Path, summary: dict, heldout_ds) -> None:
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

        out = Path(cfg.export.out) if cfg.export.out else out_dir / "export"
        export_mtp(final, cfg.target.path, out, merge=cfg.export.merge, dtype=cfg.export.dtype, force=True,
                   acceptance_length=acceptance, train_config=to_dict(cfg))
        print0(f"exported mtp.* weights to {out}")


if __name__ == "__main__":
    sys.exit(main())
