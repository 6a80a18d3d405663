"""The training loop: batches, the loss of one batch, optimizer steps, logging, held-out metrics.

    finished = train_loop(cfg, accelerator, target, head, optimizer, scheduler, train_ds, sampler,
                          state, out_dir, metrics, pad_id, heldout_ds)   # False when stopped by a signal

Every `train.heldout_every` steps (but not at the last, which train_mtp.py's final evaluation
covers) the held-out metrics are computed on all ranks and written to metrics.jsonl as a
{"kind": "heldout", "step", "tokens_seen", ...} record: the training curve.

Label shift lives in model/loss.py only. SIGTERM/SIGINT finish the current optimizer step,
save a checkpoint (train/checkpoint.py) and return; every rank stops at the same step.
"""

from __future__ import annotations

import math
import queue
import signal
import threading
import time

import torch
from tqdm.auto import tqdm

from data.collate import collate_batch
from data.hidden_states import HiddenStateStore, collate_hidden_states
from model.loss import label_positions, mtp_loss, positions_to_device, replayed_acceptance, simulated_acceptance_length
from model.target import Target
from train.checkpoint import TrainerState, save_checkpoint
from train.common import env_rank, print0
from train.config import Config
from train.timeline import format_timeline, gpu_timeline, load_trace


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


# Batches are padded to a multiple of 8 tokens. The compiled head guards on T % 8 (the alignment
# of its buffers) besides a few size ranges, so lengths of both residues would compile it twice per
# range and run past torch.compile's cache of 8 graphs (then it runs eager); on one H200 the real
# run recompiled 10 times in 300 steps, 7 s each. Right padding is free otherwise: no real position
# attends to it and the loss mask is 0 there.
PAD_TO_MULTIPLE_OF = 8


def collate_rows(dataset, rows: list[dict], pad_id: int) -> dict:
    """Right-padded batch (training and held-out alike); rows of offline hidden states
    (data.hidden_states) also give "hidden" [B, T, H]."""
    if isinstance(dataset, HiddenStateStore):
        return collate_hidden_states(rows, pad_id=pad_id, pad_to_multiple_of=PAD_TO_MULTIPLE_OF)
    return collate_batch(rows, pad_id=pad_id, pad_to_multiple_of=PAD_TO_MULTIPLE_OF)


def iterate_batches(sampler, dataset, state: TrainerState, pad_id: int):
    """Endless (micro-batch, position) from the state's (epoch, batch_in_epoch) on. `position` is
    (epoch, batch_in_epoch) once that batch is consumed: the loop moves `state` there when it takes
    the batch, so a prefetcher reading ahead never makes a checkpoint skip a batch."""
    epoch, start = state.epoch, state.batch_in_epoch
    while True:
        sampler.set_epoch(epoch)
        for i, indices in enumerate(sampler):
            if i < start:
                continue
            rows = dataset.select(indices)
            batch = collate_rows(dataset, [rows[j] for j in range(len(indices))], pad_id=pad_id)
            batch["num_tokens"] = int(batch["attention_mask"].sum())  # counted here, on the CPU: no device sync
            yield batch, (epoch, i + 1)
        epoch, start = epoch + 1, 0


def read_ahead_in_thread(items, depth: int = 2):
    """`items`, produced by a background thread up to `depth` ahead. The training step waits on the
    GPU (DeepSpeed reads the gradient norm every step), and the next batch's collation and pinning
    then run in that wait instead of after it (about 8% of a step on one H200 otherwise).
    An exception in the producer is raised here, at the item it failed on."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def produce():
        try:
            for item in items:
                q.put((item, None))
        except BaseException as exc:  # handed to the consumer
            q.put((None, exc))

    threading.Thread(target=produce, daemon=True, name="batch-read-ahead").start()
    while True:
        item, exc = q.get()
        if exc is not None:
            raise exc
        yield item


def prefetch_to_device(batches, device: torch.device):
    """On a GPU, batches are collated and pinned by a background thread, and the next (batch,
    position) is copied on a side stream while the current step runs (an offline batch's hidden
    states are 33 MB at 4 x 2048 x 2048 bf16: about 6 ms as a pageable copy on the step's stream).
    Keys ending in "_host" stay on the host: "loss_mask_host", the pinned loss mask that
    loss_for_batch reads the label positions from without waiting for the device.
    Elsewhere the batches pass through unchanged."""
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def on_device(key, value):
        return torch.is_tensor(value) and not key.endswith("_host")

    def pinned(items):
        for batch, position in items:
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            yield batch | {"loss_mask_host": batch["loss_mask"]}, position

    def load(item):
        batch, position = item
        with torch.cuda.stream(stream):
            batch = {k: v.to(device, non_blocking=True) if on_device(k, v) else v for k, v in batch.items()}
        return batch, position

    batches = read_ahead_in_thread(pinned(batches))
    ahead = load(next(batches))
    while True:
        main = torch.cuda.current_stream(device)
        main.wait_stream(stream)
        batch, position = ahead
        for k, v in batch.items():
            if on_device(k, v):
                v.record_stream(main)  # allocated on the side stream, used on the main one
        ahead = load(next(batches))
        yield batch, position


def loss_for_batch(cfg: Config, target: Target, head, batch: dict, device: torch.device, vocab_impl: str | None = None,
                   hits_out: list | None = None):
    """(LossOutput, tokens in the batch); `vocab_impl` is model/loss.py's (the benchmark times each):
    by default "compiled" with head.compile=true on a GPU, else "fused". `hits_out`: mtp_loss's."""
    if vocab_impl is None:
        vocab_impl = "compiled" if cfg.head.compile and device.type == "cuda" else "fused"
    # label positions from a host copy of the mask (the prefetcher's, or a CPU batch's): mtp_loss
    # would otherwise read the mask back from the device (a sync); a mask given only on the device
    # is read back here once, before the target's forward is queued
    host_mask = batch.get("loss_mask_host", batch["loss_mask"]).cpu()
    positions = positions_to_device(label_positions(host_mask, cfg.head.num_steps), device)
    input_ids = batch["input_ids"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    attn = batch["attention_mask"].to(device)
    if "hidden" in batch:  # offline (data.hidden_states): h_t stored by scripts/dump_hidden_states.py
        hidden = batch["hidden"].to(device, non_blocking=True)  # [B, T, H]
    else:
        # no mask: rows are right-padded, so causal attention keeps padding out of every real
        # position, and sdpa runs its causal flash kernel instead of a masked one
        hidden = target.hidden(input_ids)  # [B, T, H], no grad
    return mtp_loss(
        head, target.embed_tokens, target.lm_head, input_ids, hidden, loss_mask,
        num_steps=cfg.head.num_steps, step_decay=cfg.head.step_decay, loss_type=cfg.head.loss,
        kl_weight=cfg.head.kl_weight, chunk_size=cfg.head.loss_chunk_size, vocab_impl=vocab_impl,
        positions=positions, hits_out=hits_out,
    ), batch["num_tokens"] if "num_tokens" in batch else int(attn.sum())  # the latter waits for the device


def train_loop(cfg, accelerator, target, head, optimizer, scheduler, train_ds, sampler, state, out_dir, metrics, pad_id,
               heldout_ds=None):
    device = target.device
    K = cfg.head.num_steps
    stop = StopFlag()
    batches = prefetch_to_device(iterate_batches(sampler, train_ds, state, pad_id), device)
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)
    win = {"loss": torch.zeros((), device=device), "n": 0, "correct": torch.zeros(K, device=device),
           "count": torch.zeros(K, device=device), "tokens": 0, "t0": time.perf_counter(), "data_s": 0.0}
    profiler = StepProfiler(cfg.train.profile_step, out_dir, accelerator.is_main_process)
    head.train()
    while state.step < cfg.train.max_steps:
        profiler.before_step(state.step + 1)
        for _ in range(cfg.train.grad_accum):
            t_data = time.perf_counter()
            batch, (state.epoch, state.batch_in_epoch) = next(batches)
            win["data_s"] += time.perf_counter() - t_data
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
        profiler.after_step(state.step)
        bar.update(1)

        last = state.step == cfg.train.max_steps
        every = cfg.train.heldout_every
        heldout_due = bool(every) and state.step % every == 0 and not last and heldout_ds is not None
        # a held-out step closes the logging window too, so its record's tokens_seen is exact
        if state.step % cfg.train.log_every == 0 or last or heldout_due:
            rec = log_window(accelerator, win, state, scheduler, K)
            metrics.write(rec)
            accelerator.log({k: v for k, v in rec.items() if k != "acc"} | {f"acc_{j + 1}": a for j, a in enumerate(rec["acc"])}, step=state.step)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", sim_al=f"{rec['simulated_acceptance_length']:.2f}")
            win.update(loss=torch.zeros((), device=device), n=0, correct=torch.zeros(K, device=device),
                       count=torch.zeros(K, device=device), tokens=0, t0=time.perf_counter(), data_s=0.0)

        if heldout_due:
            # before a checkpoint of the same step, so a run resumed from it keeps this record
            heldout = evaluate_heldout(cfg, accelerator, target, head, heldout_ds, pad_id)
            if heldout:
                metrics.write(heldout_record(state, heldout))
                bar.set_postfix(heldout_sim_al=f"{heldout['heldout_simulated_acceptance_length']:.2f}")
            win["t0"] = time.perf_counter()  # the evaluation is not training time (tokens_per_s)

        # a signal during the last step just lets the run finish (final/ and export follow)
        stop_now = not last and agree_on_stop(accelerator, stop.requested, device)
        if (cfg.train.save_every and state.step % cfg.train.save_every == 0 and not last) or stop_now:
            path = save_checkpoint(accelerator, head, cfg, state, out_dir)
            print0(f"saved {path}")
        if stop_now:
            bar.close()
            profiler.after_step(state.step, final=True)
            print0(f"stopped by signal at step {state.step}; resume with train.resume=auto")
            return False
    bar.close()
    profiler.after_step(state.step, final=True)  # a profile cut short by the end of the run is still written
    return True


class StepProfiler:
    """train.profile_step=N: torch.profiler over optimizer steps N .. N+2 (CPU and CUDA), written on
    rank 0 as <output_dir>/profile-step<N>.txt (the GPU timeline of train/timeline.py, then two
    tables: by CUDA time, by CPU time) and the chrome trace <output_dir>/profile-step<N>.json.gz."""

    STEPS = 3

    def __init__(self, start: int, out_dir, enabled: bool):
        self.start, self.out_dir, self.enabled, self.prof = start, out_dir, enabled and start > 0, None

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.start and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            # no with_stack: its Python tracer, with the batch-reading thread running, left undecodable
            # event names that key_averages() failed on (torch 2.13, CPU); the timeline names ops only
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def after_step(self, step: int, final: bool = False) -> None:
        if self.prof is None or (step < self.start + self.STEPS - 1 and not final):
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        avg = self.prof.key_averages()
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        n = step - self.start + 1
        trace = self.out_dir / f"profile-step{self.start}.json.gz"
        self.prof.export_chrome_trace(str(trace))
        text = (f"# optimizer steps {self.start}..{step}: {wall:.3f} s wall ({wall / n * 1e3:.1f} ms a step)\n\n"
                f"{format_timeline(gpu_timeline(load_trace(trace)))}\n\n"
                f"## by {sort}\n{avg.table(sort_by=sort, row_limit=40, max_name_column_width=80)}\n"
                f"## by self_cpu_time_total\n{avg.table(sort_by='self_cpu_time_total', row_limit=40, max_name_column_width=80)}\n")
        path = self.out_dir / f"profile-step{self.start}.txt"
        path.write_text(text)
        print0(f"profile of steps {self.start}..{step} ({wall / n * 1e3:.1f} ms a step): {path}")
        self.prof, self.enabled = None, False


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
        "data_wait_frac": win["data_s"] / dt,  # of the window's wall time, waiting for the next batch (this rank)
        "tokens_seen": state.tokens_seen,
        "epoch": state.epoch,
        **({"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}),
    }


def heldout_record(state: TrainerState, heldout: dict) -> dict:
    """The metrics.jsonl line of one held-out evaluation (periodic or final)."""
    return {"kind": "heldout", "step": state.step, "tokens_seen": state.tokens_seen, **heldout}


@torch.no_grad()
def evaluate_heldout(cfg, accelerator, target, head, heldout_ds, pad_id) -> dict | None:
    """Loss, per-step top-1 accuracy and simulated acceptance length on the held-out rows."""
    if heldout_ds is None or len(heldout_ds) == 0:
        return None
    K, device = cfg.head.num_steps, target.device
    head.eval()
    tot = torch.zeros(4 + 2 * K, device=device)  # loss, batches, correct[K], count[K], emitted, verify steps
    # each rank takes a strided share; ranks with fewer rows still run the same number of batches
    rows = list(range(accelerator.process_index, len(heldout_ds), accelerator.num_processes))
    bs = cfg.train.micro_batch_size
    n_batches = math.ceil(math.ceil(len(heldout_ds) / accelerator.num_processes) / bs)
    for b in range(n_batches):
        idx = rows[b * bs : (b + 1) * bs] or [0]
        batch = collate_rows(heldout_ds, [heldout_ds[i] for i in idx], pad_id=pad_id)
        hits: list = []
        out, _ = loss_for_batch(cfg, target, head, batch, device, hits_out=hits)
        emitted, steps = replayed_acceptance(hits, batch["loss_mask"])
        weight = 1.0 if rows[b * bs : (b + 1) * bs] else 0.0
        tot += weight * torch.cat([out.loss.detach().float().reshape(1), torch.ones(1, device=device), out.correct, out.count,
                                   torch.tensor([emitted, steps], dtype=torch.float32, device=device)])
    tot = accelerator.reduce(tot, reduction="sum")
    head.train()
    acc = [(c / n).item() if n > 0 else 0.0 for c, n in zip(tot[2 : 2 + K], tot[2 + K : 2 + 2 * K])]
    return {
        "heldout_loss": (tot[0] / tot[1].clamp(min=1)).item(),
        "heldout_acc": acc,
        "heldout_simulated_acceptance_length": simulated_acceptance_length(acc),
        # the same hits replayed as greedy speculative decoding walks the text (model/loss.py)
        "heldout_replayed_acceptance_length": (tot[-2] / tot[-1]).item() if tot[-1] > 0 else None,
        "heldout_rows": len(heldout_ds),
    }
