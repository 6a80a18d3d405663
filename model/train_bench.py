"""Shared pieces of the training-step benchmark (scripts/bench_train.py): timing marks, a random
target and head built on the device, synthetic batches, the naive reference step (plain
transformers forward, full fp32 logits), the first-step gradient check against it, the timed
loop of a variant, and the FLOP floor. Torch and model/ only: the trainer's own step (train/)
stays in the script.

    target, impl = build_target("qwen3-30b-a3b", device, torch.bfloat16)
    head = build_head(target.config, device)
    row = run_variant(lambda marks: naive_step(target, head, opt, batch, device, 1, "ce", marks), device, 2, 5, ref)
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.nn.functional as F

from model.configs import build_random_target
from model.head import MTPHead
from model.loss import step_weights
from model.target import FrozenTarget


# ----------------------------------------------------------------------------- timing
class Marks:
    """Named time points of one step: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: dict[str, object] = {}

    def __call__(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.points[name] = ev
        else:
            self.points[name] = time.perf_counter()

    def ms(self, a: str, b: str) -> float:
        if a not in self.points or b not in self.points:
            return 0.0
        if self.cuda:
            return self.points[a].elapsed_time(self.points[b])
        return (self.points[b] - self.points[a]) * 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def autocast(device: torch.device):
    # accelerate's single-GPU bf16 mixed precision; on a CPU everything is fp32
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- building
def build_target(name: str, device: torch.device, dtype: torch.dtype, layers: int | None = None) -> tuple[FrozenTarget, str]:
    """Random target built in place on `device` (transformers' init, unit-variance logits).
    Returns it and transformers' default experts implementation for this config."""
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    model = build_random_target(name, seed=0, device=device, dtype=dtype, **overrides)
    model.config._attn_implementation = "sdpa"
    default_impl = model.config._experts_implementation  # what from_pretrained/plain init resolves to
    return FrozenTarget(model, lean_experts=False), default_impl


@torch.no_grad()
def build_head(config, device: torch.device) -> MTPHead:
    with torch.device(device):
        head = MTPHead(config)
    gen = torch.Generator(device=device).manual_seed(1)
    for name, p in head.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, config.initializer_range, generator=gen)
    return head.float().train()


def set_checkpointing(head: MTPHead, on: bool) -> None:
    head.activation_checkpointing = on  # what train/ sets from head.activation_checkpointing


def make_batch(vocab: int, B: int, T: int, mask_frac: float) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, min(vocab, 151643), (B, T), generator=g),
        "loss_mask": (torch.rand(B, T, generator=g) < mask_frac).long(),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "num_tokens": B * T,  # as the trainer's batches: counted on the host, no device sync
    }


def as_prefetched(batch: dict, device) -> dict:
    """A batch as the trainer's prefetcher (train/loop.py) delivers it: tensors on the device,
    the host copy of the loss mask beside them (label positions without a sync)."""
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return on_device | {"loss_mask_host": batch["loss_mask"]}


# ----------------------------------------------------------------------------- steps
def naive_loss(target, head, batch, device, num_steps: int, loss_type: str, marks: Marks) -> torch.Tensor:
    """Plain transformers target forward, full fp32 logits over all tokens, no chunking. Scores the
    positions our loss scores (step j+1 from q = j on), so both compute the same objective."""
    ids = batch["input_ids"].to(device)
    attn = batch["attention_mask"].to(device)
    B, T = ids.shape
    L = T - 1
    marks("target_start")
    with torch.no_grad():
        hidden = target.model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state  # [B, T, H]
    marks("target_end")
    with autocast(device):
        with torch.no_grad():
            embeds = target.embed_tokens(ids[:, 1:]).float()  # e(x_{q+1}) [B, L, H]
            p_t = None
            if loss_type != "ce":  # the target's distribution for x_{q+2}: softmax(lm_head(h_{q+1})) [B, L-1, V]
                p_t = F.softmax(target.lm_head(hidden[:, 1:L]).float(), dim=-1)
                neg_entropy_BL = torch.special.xlogy(p_t, p_t).sum(-1)  # sum_v q log q per position
        h0 = hidden[:, :L].float()
        labels_BL = ids[:, 2:].masked_fill(batch["loss_mask"].to(device)[:, 2:] == 0, -100)  # [B, L-1]
        pos = torch.arange(L, device=device).unsqueeze(0).expand(B, L)
        total, inp = 0.0, h0
        for j, w in enumerate(step_weights(num_steps, 0.6)):
            out = head(embeds, inp, pos)
            logits = target.lm_head(out[:, : L - 1]).float()  # [B, L-1, V] fp32, all of it at once
            labels = labels_BL.clone()
            labels[:, :j] = -100  # step j+1 needs step j's output at q-1
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            if p_t is not None:  # KL(q || p) = sum_v q log q - sum_v q log p, over the scored positions
                keep = labels >= 0
                cross_BL = (F.log_softmax(logits, dim=-1) * p_t).sum(-1)
                loss = loss + ((neg_entropy_BL - cross_BL) * keep).sum() / keep.sum()
            total = total + w * loss
            inp = torch.cat([h0[:, :1], out[:, :-1]], dim=1)
    return total


def naive_step(target, head, optimizer, batch, device, num_steps: int, loss_type: str, marks: Marks) -> None:
    naive_loss(target, head, batch, device, num_steps, loss_type, marks).backward()
    marks("backward_end")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class GradCheck:
    """Every variant's first step against the naive step's, from the same initial head weights."""

    def __init__(self, head):
        self.init = {n: p.detach().to("cpu", copy=True) for n, p in head.named_parameters()}
        self.ref: dict[tuple, tuple[float, dict]] = {}  # (loss, k) -> (naive loss, grads on the host)

    def restore(self, head) -> None:
        with torch.no_grad():
            for n, p in head.named_parameters():
                p.copy_(self.init[n])
        head.zero_grad(set_to_none=True)

    def first_step(self, head, loss_fn) -> tuple[float, dict]:
        self.restore(head)
        loss = loss_fn()
        loss.backward()
        grads = {n: p.grad.detach().float() for n, p in head.named_parameters() if p.grad is not None}
        value = float(loss.detach())
        head.zero_grad(set_to_none=True)
        return value, grads

    def record_naive(self, key, head, loss_fn) -> None:
        value, grads = self.first_step(head, loss_fn)
        self.ref[key] = (value, {n: g.cpu() for n, g in grads.items()})
        self.restore(head)

    def compare(self, key, head, loss_fn) -> dict:
        value, grads = self.first_step(head, loss_fn)
        self.restore(head)
        if key not in self.ref:
            return {"loss_first": value}
        ref_value, ref = self.ref[key]
        num = den = dot = nrm = 0.0
        for n, r in ref.items():
            r = r.to(grads[n].device)
            g = grads.get(n, torch.zeros_like(r))
            num += float((g - r).pow(2).sum())
            den += float(r.pow(2).sum())
            dot += float((g * r).sum())
            nrm += float(g.pow(2).sum())
        return {"loss_first": value, "loss_rel_diff": abs(value - ref_value) / abs(ref_value),
                "grad_rel_err": (num / den) ** 0.5 if den else None,
                "grad_cosine": dot / ((den * nrm) ** 0.5) if den and nrm else None}


def run_variant(step_fn, device, warmup: int, iters: int, marks_ref: list) -> dict:
    free(device)
    rows = []
    for i in range(warmup + iters):
        marks = Marks(device)
        marks_ref[0] = marks
        marks("start")
        step_fn(marks)
        marks("end")
        sync(device)
        if i >= warmup:
            target_ms = marks.ms("target_start", "target_end")
            rows.append({
                "step_ms": marks.ms("start", "end"),
                "target_ms": target_ms,
                "head_ms": marks.ms("start", "backward_end") - target_ms,
                "optimizer_ms": marks.ms("backward_end", "end"),
            })
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    # then `iters` steps back to back with one sync at the end, as the trainer runs them: the host
    # launches a step while the GPU still runs the last one, so the start of a step does not wait on it
    t0 = Marks(device)
    t0("start")
    for _ in range(iters):
        marks_ref[0] = Marks(device)
        step_fn(marks_ref[0])
    t0("end")
    sync(device)
    med["steady_step_ms"] = t0.ms("start", "end") / iters
    med["peak_gib"] = peak_gib(device)
    return med


# ----------------------------------------------------------------------------- FLOPs
def active_params(cfg) -> tuple[int, int]:
    """(matmul params touched per token by one MoE decoder layer, causal-attention width nq*hd)."""
    H, hd = cfg.hidden_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    attn = H * nq * hd * 2 + H * nkv * hd * 2
    moe = H * cfg.num_experts + cfg.num_experts_per_tok * 3 * H * cfg.moe_intermediate_size
    return attn + moe, nq * hd


def floor_flops(cfg, B: int, T: int, k: int, loss: str, n_scored: int, online: bool) -> float:
    per_layer, attn_width = active_params(cfg)
    N = B * T
    attn_fwd = 2 * B * T * T * attn_width  # QK^T + PV, causal half
    target = cfg.num_hidden_layers * (2 * per_layer * N + attn_fwd) if online else 0
    head_fwd = 2 * (per_layer + 2 * cfg.hidden_size * cfg.hidden_size) * N + attn_fwd  # + fc
    vocab = 2 * cfg.hidden_size * cfg.vocab_size * n_scored
    total = target + k * (3 * head_fwd + 2 * vocab) + (vocab if loss != "ce" else 0)
    return float(total)
