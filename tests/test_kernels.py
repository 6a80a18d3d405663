"""The decode-step Triton kernels (model/linear_kernels.py, attn_kernels.py, moe_kernels.py)
against torch references, their batch invariance, and the engine running on them.

On a CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when no
GPU is visible; `pip install triton` is in the dev extras). Without triton the kernel tests skip
and the engine must refuse kernels="triton"."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import moe_kernels
from model.configs import make_config
from model.drafters import MTPDrafter
from model.engine import Engine, MTPHeadLM, TargetLM, check_kernels
from model.head import MTPHead
from model.qwen3_forward import Dims, LayerWeights, _experts_loop, attention, rope_table, step_mask

V = 512
ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not moe_kernels.available("cpu") and not torch.cuda.is_available(),
                                  reason="triton kernels need CUDA, or triton installed and TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tiny_model):
    cfg, model, prompts = tiny_model
    return cfg, model.to(DEV), prompts[:3]


def moe_weights(gen, H=100, I=48, E=8):
    """H and I not multiples of the tiles: masked tails."""
    return (torch.randn(E, 2 * I, H, generator=gen) * 0.2, torch.randn(E, H, I, generator=gen) * 0.2,
            torch.randn(E, H, generator=gen) * 0.5, torch.rand(H, generator=gen) + 0.5)


# ------------------------------------------------------------- references (no triton needed)
@pytest.mark.parametrize("norm_topk", [True, False])
def test_moe_reference_matches_transformers_router_and_loop(norm_topk):
    """experts_reference (the kernels' spec: top-k by logit, weights from the k logits or the
    full log-sum-exp) equals transformers' softmax -> top-k -> renormalise -> expert loop."""
    gen = torch.Generator().manual_seed(0)
    gate_up, down, router_w, _ = moe_weights(gen)
    hn, res = torch.randn(5, 100, generator=gen), torch.randn(5, 100, generator=gen)
    logits = hn @ router_w.T
    w, idx = torch.topk(logits.softmax(-1), 3)
    if norm_topk:
        w = w / w.sum(-1, keepdim=True)
    ids, weights = moe_kernels.route_reference(logits, 3, norm_topk)
    assert torch.equal(ids, idx)
    torch.testing.assert_close(weights, w)
    torch.testing.assert_close(moe_kernels.experts_reference(hn, ids, weights, res, gate_up, down),
                               res + _experts_loop(hn, idx, w, gate_up, down), atol=1e-5, rtol=1e-5)


def test_triton_kernels_refused_where_they_cannot_run(tiny, monkeypatch):
    cfg, model, _ = tiny
    monkeypatch.setattr(moe_kernels, "available", lambda device: False)
    with pytest.raises(ValueError, match="kernels='triton' needs triton"):
        TargetLM(model, kernels="triton")
    with pytest.raises(ValueError, match="choose one of"):
        TargetLM(model, kernels="cuda")
    with pytest.raises(ValueError, match="kernels='triton'"):  # the old spelling of the MoE kernels
        TargetLM(model, experts="triton")
    monkeypatch.setattr(moe_kernels, "available", lambda device: True)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        check_kernels("triton", "cpu", Dims.of(make_config("tiny", head_dim=24)))


# ---------------------------------------------------------------------------- kernels
@needs_triton
@pytest.mark.parametrize("norm_topk", [True, False])
def test_moe_kernels_match_reference_and_are_batch_invariant(norm_topk):
    gen = torch.Generator().manual_seed(1)
    gate_up, down, router_w, norm_w = (t.to(DEV) for t in moe_weights(gen))
    x, a = torch.randn(20, 100, generator=gen).to(DEV), torch.randn(20, 100, generator=gen).to(DEV)
    h, hn, ids, wts = moe_kernels.router(x, a, norm_w, router_w, 1e-6, 3, norm_topk)
    for got, want in zip((h, hn, ids, wts), moe_kernels.router_reference(x, a, norm_w, router_w, 1e-6, 3, norm_topk)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for n in (1, 3, 20):  # 20 tokens: two tl.dot groups of 16
        torch.testing.assert_close(moe_kernels.experts(hn[:n], ids[:n], wts[:n], h[:n], gate_up, down),
                                   moe_kernels.experts_reference(hn[:n], ids[:n], wts[:n], h[:n], gate_up, down),
                                   atol=1e-4, rtol=1e-4)
    # a token's output does not depend on the other tokens of the step (bit for bit): change
    # every other token (inputs and routing) and keep the token's place in the step. (Its place
    # is not varied: numpy's matmul, which the interpreter's tl.dot runs on, rounds by column;
    # on the GPU bench_decode.py checks decode-step against verify-step logits.)
    full = moe_kernels.experts(hn, ids, wts, h, gate_up, down)
    perm = torch.randperm(20, generator=gen).to(DEV)
    for i in (0, 7, 19):
        others = perm[perm != i][:19]
        rows = torch.cat([others[:i], torch.tensor([i], device=DEV), others[i:]])
        mixed = moe_kernels.experts(hn[rows], ids[rows], wts[rows], h[rows], gate_up, down)
        assert torch.equal(mixed[i], full[i])


@needs_triton
@pytest.mark.parametrize("per_sm,flatten", [(1, False), (1, True), (3, True)])
def test_persistent_expert_kernels_give_the_same_bits(per_sm, flatten, monkeypatch):
    """A persistent grid (a program streams several (expert, row block) items) computes every
    item as a program of its own would: the same bits. The interpreter's 4 "SMs" give 4 or 12
    programs for up to 8 experts x 4 row blocks, so programs take several items, and at 20
    tokens 8 experts are in use while at 1 token 3 are (programs with nothing to do)."""
    gen = torch.Generator().manual_seed(4)
    gate_up, down, router_w, norm_w = (t.to(DEV) for t in moe_weights(gen, H=100, I=48, E=8))
    x, a = torch.randn(20, 100, generator=gen).to(DEV), torch.randn(20, 100, generator=gen).to(DEV)
    h, hn, ids, wts = moe_kernels.router(x, a, norm_w, router_w, 1e-6, 3, True)
    tiles = {"gate_up": {"BLOCK_I": 16, "BLOCK_IN": 64, "num_warps": 4, "num_stages": 2},
             "down": {"BLOCK_H": 32, "BLOCK_IN": 16, "num_warps": 4, "num_stages": 2}}
    for n in (1, 20):
        args = (hn[:n], ids[:n], wts[:n], h[:n], gate_up, down)
        for name, tile in tiles.items():
            monkeypatch.setitem(moe_kernels.CONFIG, name, dict(tile))
        each = moe_kernels.experts(*args)
        for name, tile in tiles.items():
            monkeypatch.setitem(moe_kernels.CONFIG, name, dict(tile, per_sm=per_sm, flatten=flatten))
        assert moe_kernels.programs(8 * 4, moe_kernels.CONFIG["down"], torch.device(DEV)) < 8 * 4 or DEV == "cuda"
        assert torch.equal(moe_kernels.experts(*args), each)
        torch.testing.assert_close(each, moe_kernels.experts_reference(*args), atol=1e-4, rtol=1e-4)


@needs_triton
def test_linear_kernel_matches_f_linear_and_is_batch_invariant():
    from model import linear_kernels

    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(300, 200, generator=gen).to(DEV), torch.randn(2, 10, 200, generator=gen).to(DEV)
    y = linear_kernels.linear(x, w)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), atol=1e-4, rtol=1e-4)
    assert linear_kernels.linear(x, w, True).dtype == torch.float32
    x2 = torch.randn(2, 10, 200, generator=gen).to(DEV)  # other tokens, same place for token (1, 3)
    x2[1, 3] = x[1, 3]
    assert torch.equal(linear_kernels.linear(x2, w)[1, 3], y[1, 3])
    norm_w = torch.rand(200, generator=gen).to(DEV) + 0.5  # the fused input RMSNorm
    yn = linear_kernels.linear(x, w, norm_w=norm_w, eps=1e-6)
    torch.testing.assert_close(yn, torch.nn.functional.linear(torch.nn.functional.rms_norm(x, (200,), norm_w, 1e-6), w),
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(linear_kernels.linear(x2, w, norm_w=norm_w, eps=1e-6)[1, 3], yn[1, 3])


@needs_triton
@pytest.mark.parametrize("split", [2, 3])
def test_linear_kernel_split_over_k_is_exact_and_batch_invariant(split, monkeypatch):
    """SPLIT_K programs per output tile, the last adding the shares in order: F.linear's result
    (plain, fp32 out, with the fused norm; 3 splits of 6 tiles and of a ragged 5), a token's bits
    the same whatever else the step holds and in a 1-token step, the counters left at zero."""
    from model import linear_kernels

    gen = torch.Generator().manual_seed(4)
    for K in (768, 600):  # 6 tiles of 128, and 5 with a ragged end
        monkeypatch.setitem(linear_kernels.CONFIG, "small", {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4,
                                                             "num_stages": 2, "SPLIT_K": split})
        w, x = torch.randn(300, K, generator=gen).to(DEV), torch.randn(2, 10, K, generator=gen).to(DEV)
        norm_w = torch.rand(K, generator=gen).to(DEV) + 0.5
        x2 = torch.randn(2, 10, K, generator=gen).to(DEV)  # other tokens, same place for token (1, 3)
        x2[1, 3] = x[1, 3]
        for kw in ({}, {"norm_w": norm_w}):
            y = linear_kernels.linear(x, w, **kw)
            ref = torch.nn.functional.rms_norm(x, (K,), norm_w, 1e-6) if kw else x
            torch.testing.assert_close(y, torch.nn.functional.linear(ref, w), atol=1e-4, rtol=1e-4)
            assert torch.equal(linear_kernels.linear(x2, w, **kw)[1, 3], y[1, 3])
            assert torch.equal(linear_kernels.linear(x[1:, 3:4], w, **kw)[0, 0], y[1, 3])
            assert torch.equal(linear_kernels.linear(x, w, True, **kw), y.float())
        split_y = linear_kernels.linear(x, w)
        monkeypatch.setitem(linear_kernels.CONFIG["small"], "SPLIT_K", 1)
        assert not torch.equal(linear_kernels.linear(x, w), split_y)  # the splits did run (another sum order)
    assert int(moe_kernels._TICKETS[torch.device(DEV)].abs().sum()) == 0


@needs_triton
@pytest.mark.parametrize("norm", [False, True])
def test_linear_kernel_first_tile_early_gives_the_same_bits(norm, monkeypatch):
    """The linear kernel's first weight tile, loaded before the PDL wait, is accumulated in the
    same order as without it: the two forms agree bit for bit (one tile, and several)."""
    from model import linear_kernels, moe_kernels

    gen = torch.Generator().manual_seed(3)
    for K in (64, 700):  # BLOCK_K is 256 for these shapes: one tile, and three with a ragged end
        w = torch.randn(96, K, generator=gen).to(DEV)
        x = torch.randn(5, K, generator=gen).to(DEV)
        norm_w = (torch.rand(K, generator=gen) + 0.5).to(DEV) if norm else None
        monkeypatch.setitem(moe_kernels.PDL, "prefetch", True)
        early = linear_kernels.linear(x, w, norm_w=norm_w)
        monkeypatch.setitem(moe_kernels.PDL, "prefetch", False)
        plain = linear_kernels.linear(x, w, norm_w=norm_w)
        assert torch.equal(early, plain)
        ref = torch.nn.functional.rms_norm(x, (K,), norm_w, 1e-6) if norm else x
        torch.testing.assert_close(early, torch.nn.functional.linear(ref, w), atol=1e-4, rtol=1e-4)


def test_pdl_launch_arguments_only_on_a_cuda_device(monkeypatch):
    """Programmatic dependent launch is asked for on CUDA devices of compute capability 9+ only,
    and never when it is turned off."""
    from model import moe_kernels

    assert moe_kernels.pdl_args(torch.zeros(1)) == {"USE_PDL": False}
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(moe_kernels, "_pdl_capable", lambda index: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert moe_kernels.pdl_args(torch.zeros(1)) == {"USE_PDL": True, "launch_pdl": True}
    monkeypatch.setitem(moe_kernels.PDL, "enabled", False)
    assert moe_kernels.pdl_args(torch.zeros(1)) == {"USE_PDL": False}
    monkeypatch.setitem(moe_kernels.PDL, "enabled", True)
    monkeypatch.setattr(moe_kernels, "_pdl_capable", lambda index: False)
    assert moe_kernels.pdl_args(torch.zeros(1)) == {"USE_PDL": False}


def test_pdl_env_switch_is_read_strictly():
    """MTP_DECODE_PDL takes 1/0 (and on/off, true/false); anything else is refused by name."""
    from model.moe_kernels import _pdl_from_env

    assert _pdl_from_env(None) and _pdl_from_env("1") and _pdl_from_env(" ON ")
    assert not _pdl_from_env("0") and not _pdl_from_env("false")
    with pytest.raises(ValueError, match="MTP_DECODE_PDL='no'"):
        _pdl_from_env("no")


def attention_case(tiny, S: int, starts: list[int], seed: int, T: int = 4):
    """A cache of S slots with stale entries everywhere, T step tokens per row from the given start
    positions: (dims, layer weights, the cache after qk_prep, positions, q from qk_prep, the torch
    path's attention output after o_proj, the torch path's cache)."""
    from model import attn_kernels

    cfg, model, _ = tiny
    d = Dims.of(cfg)
    lw = LayerWeights.of(model.model.layers[0], DEV, torch.float32)
    B = len(starts)
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, B, d.n_kv, S, d.head_dim, generator=gen).to(DEV)
    ref_cache = cache.clone()
    x = torch.randn(B, T, cfg.hidden_size, generator=gen).to(DEV)
    pos = torch.tensor(starts, device=DEV)[:, None] + torch.arange(T, device=DEV)
    cos, sin = rope_table(model.model.rotary_emb, S, DEV, torch.float32)
    mask = step_mask(pos, S, d.n_heads // d.n_kv, torch.float32)
    bidx = torch.arange(B, device=DEV)[:, None].expand(B, T)
    want = attention(x, lw, d, ref_cache, cos[pos].unsqueeze(2), sin[pos].unsqueeze(2), mask, bidx, pos)
    q = attn_kernels.qk_prep(torch.nn.functional.linear(x, lw.qkv), lw.qk_norm, cos, sin, cache, pos, d.eps,
                             d.n_heads, d.n_kv)
    return d, lw, cache, pos, q, want, ref_cache


@needs_triton
def test_attention_kernels_match_torch_path_and_are_batch_invariant(tiny):
    """q/k norm + RoPE + cache write + attention against qwen3_forward.py's SDPA path, on a cache
    with stale entries past each row's length; a row's result is the same whether the step
    holds 1 or 4 of its tokens."""
    from model import attn_kernels

    d, lw, cache, pos, q, want, ref_cache = attention_case(tiny, S=32, starts=[5, 17, 0], seed=3)
    B, T = pos.shape
    got = torch.nn.functional.linear(attn_kernels.decode_attention(q, cache, pos, d.n_kv), lw.o)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache, ref_cache, atol=1e-5, rtol=1e-5)  # same K/V written
    one = attn_kernels.decode_attention(q.view(B, T, -1, d.head_dim)[:, :1].reshape(B, -1, d.head_dim),
                                        cache, pos[:, :1], d.n_kv)
    assert torch.equal(one, attn_kernels.decode_attention(q, cache, pos, d.n_kv)[:, :1])


@needs_triton
def test_attention_split_over_the_cache_is_exact_and_batch_invariant(tiny, monkeypatch):
    """With the cache split over programs (MTP_ATTN_SPLIT slots each, the last split to finish
    combining): the torch path's result on rows that span 1, 2 and 3 splits; every token of a
    4-token step equal bit for bit to a 1-token step at its position, also where the two steps
    split differently (position 30 alone fits the first split, the step 30..33 does not); the
    unsplit kernel's bits where a row fits one split; the split counters left at zero."""
    from model import attn_kernels

    monkeypatch.setitem(attn_kernels.CONFIG, "attention", {"BLOCK_S": 16, "num_warps": 4, "SPLIT_S": 0})
    d, lw, cache, pos, q, want, _ = attention_case(tiny, S=80, starts=[30, 40, 70], seed=5)
    B, T = pos.shape

    def run(q_, pos_, split):
        monkeypatch.setenv("MTP_ATTN_SPLIT", str(split))
        return attn_kernels.decode_attention(q_, cache, pos_, d.n_kv)

    unsplit, split = run(q, pos, 0), run(q, pos, 32)
    torch.testing.assert_close(torch.nn.functional.linear(split, lw.o), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split, unsplit, atol=1e-5, rtol=1e-5)
    assert not torch.equal(split[1:], unsplit[1:])  # rows 1 and 2 did go through the combine
    q4 = q.view(B, T, -1, d.head_dim)
    for t in range(T):
        one = run(q4[:, t].contiguous(), pos[:, t:t + 1], 32)
        assert torch.equal(one, split[:, t:t + 1]), t
    short = pos[:1, :1] - 20  # position 10: one split, the unsplit kernel's bits
    assert torch.equal(run(q4[:1, 0].contiguous(), short, 32), run(q4[:1, 0].contiguous(), short, 0))
    assert int(moe_kernels._TICKETS[torch.device(DEV)].abs().sum()) == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_every_kernel_builds_for_hopper(tmp_path):
    """The interpreter runs kernels as Python, so it cannot catch what only a GPU build rejects
    (it missed a split-only branch that the unsplit attention kernel still compiled, with a bf16
    pointer where fp32 was loaded). tests/kernel_builds.py records every launch of the decode and
    training kernels' wrappers at the 30B-A3B shape (decode, a batch-16 verify step, the split
    options, the ce pass, the slot sum) and builds each for sm_90 with Triton's CUDA compiler and
    the ptxas it ships, in a process without TRITON_INTERPRET. Each split build's ticket is an
    acquire-release atomic at GPU scope with the partials read from L2; the unsplit builds have none."""
    if not any((Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin").glob("ptxas*")):
        pytest.skip("this triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MTP_ATTN_SPLIT")}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "kernel_builds.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout)
    failed = {k: v["error"] for k, v in built.items() if "error" in v}
    assert not failed, failed
    names = {k.split("[")[0] for k in built}
    assert any("[prefetch]" in k for k in built)
    assert names == {"_linear_kernel", "_qk_prep_kernel", "_attention_kernel", "_router_kernel", "_route_kernel",
                     "_gate_up_kernel", "_down_kernel", "_combine_kernel", "_ce_rows", "_slot_sum_kernel"}
    for kernel in ("_attention_kernel", "_linear_kernel"):
        for label, b in built.items():
            if label.startswith(kernel):
                split = "[splits]" in label
                assert ("atom.global.gpu.acq_rel.add" in b["ptx"] and "ld.global.cg" in b["ptx"]) == split, label
                assert split or "atom." not in b["ptx"], label


def test_split_counters_grow_and_outgrown_buffers_stay_alive(monkeypatch):
    """One zeroed counter buffer per device, shared by the split kernels; a bigger grid gets a new
    one and the old one is kept (a CUDA graph captured before still holds its address)."""
    monkeypatch.setattr(moe_kernels, "_TICKETS", {})
    monkeypatch.setattr(moe_kernels, "_OUTGROWN", [])
    first = moe_kernels.split_tickets(10, torch.device("cpu"))
    assert first.numel() == 1024 and first.dtype == torch.int32 and not first.any()
    assert moe_kernels.split_tickets(1024, torch.device("cpu")) is first
    grown = moe_kernels.split_tickets(5000, torch.device("cpu"))
    assert grown.numel() == 5000 and not grown.any() and moe_kernels._OUTGROWN == [first]


def test_attention_split_setting_is_read_strictly(monkeypatch):
    from model import attn_kernels

    monkeypatch.setitem(attn_kernels.CONFIG, "attention", {"BLOCK_S": 16, "num_warps": 4, "SPLIT_S": 0})
    for ok, n in (("", 0), ("0", 0), (" 64 ", 64)):
        monkeypatch.setenv("MTP_ATTN_SPLIT", ok)
        assert attn_kernels.split_slots() == n
    for bad in ("24", "-16", "half"):
        monkeypatch.setenv("MTP_ATTN_SPLIT", bad)
        with pytest.raises(ValueError, match="multiple of BLOCK_S=16"):
            attn_kernels.split_slots()


# ----------------------------------------------------------------------------- engine
@needs_triton
@pytest.mark.parametrize("split", [0, 16], ids=["whole-cache", "split-cache"])
def test_engine_on_triton_kernels_matches_torch_path_and_is_lossless(tiny, split, monkeypatch):
    """Plain greedy decoding on the kernels gives the torch path's tokens, and speculative
    decoding on them gives the same tokens as plain decoding on them (K=2, a head from the
    target's last layer, so some drafts are accepted). split-cache: attention over 16-slot splits of
    the 40-slot cache, so rows cross split boundaries as they grow."""
    from model import attn_kernels

    monkeypatch.setitem(attn_kernels.CONFIG, "attention", {"BLOCK_S": 16, "num_warps": 4, "SPLIT_S": split})
    cfg, model, prompts = tiny
    with torch.device(DEV):
        head = MTPHead(cfg).float().eval()
    head.layers[0].load_state_dict(model.model.layers[-1].state_dict())
    new = 6
    outs = {}
    for kernels in ("torch", "triton"):
        tlm = TargetLM(model, kernels=kernels)
        eng = Engine(tlm, MTPDrafter(MTPHeadLM(head, tlm, kernels=kernels)), batch_size=len(prompts), max_len=40,
                     max_new_tokens=new, steps=2, eos_ids=(1,))
        spec, plain = eng.generate(prompts), eng.generate(prompts, speculative=False)
        outs[kernels] = [r.output_ids for r in plain.rows]
        assert [r.output_ids for r in spec.rows] == outs[kernels]
        assert sum(sum(r.hist) for r in spec.rows) > 0
    assert outs["triton"] == outs["torch"]


@needs_triton
def test_token_map_drafts_on_triton_kernels_as_on_the_torch_path(tiny):
    """A draft vocabulary (the map's lm_head rows through the linear kernel): the same drafts and
    accept counts as the torch path, and the output stays plain decoding's."""
    cfg, model, prompts = tiny
    with torch.device(DEV):
        head = MTPHead(cfg).float().eval()
    head.layers[0].load_state_dict(model.model.layers[-1].state_dict())
    ids = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(0))[: cfg.vocab_size // 3]
    got = {}
    for kernels in ("torch", "triton"):
        tlm = TargetLM(model, kernels=kernels)
        head_lm = MTPHeadLM(head, tlm, kernels=kernels, token_map=ids)
        h = torch.randn(3, cfg.hidden_size, device=DEV)
        # the map's rows of the full logits (another GEMM shape: equal up to rounding)
        torch.testing.assert_close(head_lm.logits(h), tlm.logits(h)[:, ids.to(DEV)], rtol=1e-5, atol=1e-5)
        eng = Engine(tlm, MTPDrafter(head_lm), batch_size=len(prompts), max_len=40, max_new_tokens=6, steps=2, eos_ids=(1,))
        spec, plain = eng.generate(prompts), eng.generate(prompts, speculative=False)
        assert [r.output_ids for r in spec.rows] == [r.output_ids for r in plain.rows]
        got[kernels] = ([r.output_ids for r in spec.rows], [r.hist for r in spec.rows])
    assert got["triton"] == got["torch"]


@needs_triton
def test_big_steps_keep_triton_attention_and_match_torch_path(tiny, monkeypatch):
    """Steps over MAX_STEP_TOKENS tokens (regeneration at batch 256) run torch linears and experts
    around the Triton attention: the same greedy tokens as the torch path, plain and speculative."""
    from model import engine as engine_mod
    from model import qwen3_forward

    cfg, model, prompts = tiny
    monkeypatch.setattr(engine_mod, "MAX_STEP_TOKENS", 2)  # every step of 3 prompts is "big"
    calls = []
    real = qwen3_forward.decoder_layer_big_step
    monkeypatch.setattr(engine_mod, "decoder_layer_big_step", lambda *a: calls.append(1) or real(*a))
    with torch.device(DEV):
        head = MTPHead(cfg).float().eval()
    head.layers[0].load_state_dict(model.model.layers[-1].state_dict())
    outs = {}
    for kernels in ("torch", "triton"):
        tlm = TargetLM(model, kernels=kernels)
        eng = Engine(tlm, MTPDrafter(MTPHeadLM(head, tlm, kernels=kernels)), batch_size=len(prompts), max_len=40,
                     max_new_tokens=6, steps=2, eos_ids=(1,))
        plain = [r.output_ids for r in eng.generate(prompts, speculative=False).rows]
        assert [r.output_ids for r in eng.generate(prompts).rows] == plain
        outs[kernels] = plain
        assert bool(calls) == (kernels == "triton")
    assert outs["triton"] == outs["torch"]
