"""The decode benchmarks' shared pieces (scripts/bench_decode.py, scripts/profile_decode.py).

    model = build_target("qwen3-30b-a3b", "cuda", std=0.02); head = build_head(model, "cuda", 0.02)
    ms = time_steps(step, iters, device)               # GPU time of back-to-back calls
    floor = hbm_floor_ms(model.config, batch, tokens, tbps=4.3, ctx=ctx)  # ctx: cached tokens a row
    lossless_check(...), kernels_check(...)            # the correctness checks each run records

Random weights of the real shape are enough for timing; routing of random weights is roughly
uniform, which the HBM floor assumes too.
"""

from __future__ import annotations

import time

import torch

from model.configs import build_random_target
from model.drafters import MTPDrafter
from model.engine import Engine, MTPHeadLM, TargetLM
from model.head import MTPHead
from model.target import set_experts_implementation

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s] {msg}", flush=True)


@torch.no_grad()
def build_target(name: str, device: str, std: float):
    """Random weights Normal(0, std), norms 1, allocated and initialised directly on `device`
    (bf16 on CUDA)."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = build_random_target(name, seed=0, device=device, dtype=dtype, std=std, unit_logits=False)
    set_experts_implementation(model.config, device)
    return model.eval()


@torch.no_grad()
def build_head(model, device: str, std: float) -> MTPHead:
    """A head initialised from the target's last layer (fc = [noise | I]), built on `device`."""
    with torch.device(device):
        head = MTPHead(model.config)
    head = head.to(next(model.parameters()).dtype).eval()
    head.layers[0].load_state_dict(model.model.layers[-1].state_dict())
    H = model.config.hidden_size
    head.fc.weight.normal_(0.0, std)
    head.fc.weight[:, H:].copy_(torch.eye(H, device=device))
    for norm in (head.pre_fc_norm_embedding, head.pre_fc_norm_hidden, head.norm):
        norm.weight.fill_(1.0)
    return head


def hbm_floor_ms(cfg, batch: int, tokens: int, tbps: float, ctx: int = 0) -> float:
    """Bytes one forward over batch x tokens after ctx cached tokens must read (the weights, and
    each row's K/V cache), over the bandwidth (module doc)."""
    b = 2  # bf16
    H, D, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    E, k, inter = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    attn = (2 * nq * D * H + 2 * nkv * D * H) * b
    norms = (2 * H + 2 * D) * b
    router = E * H * b
    hit = E * (1 - (1 - k / E) ** (batch * tokens))
    experts = hit * 3 * inter * H * b
    kv = batch * (ctx + tokens) * 2 * nkv * D * b
    total = cfg.num_hidden_layers * (attn + norms + router + experts + kv)
    total += cfg.vocab_size * H * b + batch * tokens * H * b + H * b  # lm_head, embedding rows, final norm
    return total / (tbps * 1e12) * 1e3


def time_steps(step, iters: int, device) -> float:
    """ms per call of `step`, back to back (GPU time via CUDA events on CUDA)."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t) * 1e3 / iters


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@torch.no_grad()
def lossless_check(model, head, cfg, B: int, K: int, a, kernels: str, experts: str | None) -> dict:
    """T=0 speculative vs plain outputs of the same engine (mismatches are reported, not hidden)."""
    gen = torch.Generator().manual_seed(1000 + B)
    prompts = [torch.randint(0, cfg.vocab_size, (a.ctx,), generator=gen).tolist() for _ in range(B)]
    n = a.hf_tokens
    tlm = TargetLM(model, experts=experts, kernels=kernels)
    eng = Engine(tlm, MTPDrafter(MTPHeadLM(head, tlm, experts=experts, kernels=kernels)), batch_size=B,
                 max_len=a.ctx + n + K + 1, max_new_tokens=n, steps=K)
    spec, ref = eng.generate(prompts), eng.generate(prompts, speculative=False)
    mism = [i for i, (s, r) in enumerate(zip(spec.rows, ref.rows)) if s.output_ids != r.output_ids]
    first = [next(j for j, (x, y) in enumerate(zip(spec.rows[i].output_ids, ref.rows[i].output_ids)) if x != y)
             for i in mism]
    del eng, tlm
    free_memory()
    return {"batch": B, "K": K, "new_tokens": n, "mismatching_rows": len(mism), "first_mismatch_at": first,
            "plain_outputs": [r.output_ids for r in ref.rows]}


@torch.no_grad()
def kernels_check(model, a, kernel_sets: list[str], experts: str | None, batch_sizes=(1, 8)) -> dict:
    """Per kernels setting, after a shared prefill: logits of a 4-token verify step against
    transformers' forward on the same tokens (relative error), and whether the decode step of
    the first token gives bit-identical logits to the verify step's first position."""
    cfg, dev = model.config, torch.device(a.device)
    res = {}
    g = torch.Generator().manual_seed(5)

    def rel(x, y):
        return ((x.float() - y.float()).norm() / y.float().norm()).item()

    for B in batch_sizes:
        prompts = torch.randint(0, cfg.vocab_size, (B, a.ctx), generator=g).to(dev)
        nxt = torch.randint(0, cfg.vocab_size, (B, 4), generator=g).to(dev)
        pos = a.ctx + torch.arange(4, device=dev).expand(B, 4)
        hf = model(torch.cat([prompts, nxt], 1)).logits[:, a.ctx:].float()  # the reference
        for kernels in kernel_sets:
            tlm = TargetLM(model, experts=experts, kernels=kernels)
            tlm.allocate(B, a.ctx + 16)
            tlm.forward(prompts, torch.arange(a.ctx, device=dev).expand(B, -1), prefill=True)
            one = tlm.logits(tlm.forward(nxt[:, :1], pos[:, :1]))  # decode step (writes slot ctx)
            four = tlm.logits(tlm.forward(nxt, pos))  # verify step over the same first token
            res.setdefault(kernels, {})[str(B)] = {
                "verify_vs_hf_rel_err": rel(four, hf), "decode_vs_hf_rel_err": rel(one, hf[:, :1]),
                "decode_equals_verify": bool(torch.equal(one[:, 0], four[:, 0]))}
            del tlm
    free_memory()
    return res
