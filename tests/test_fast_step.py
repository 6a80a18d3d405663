"""The fast training-step paths against their plain references (CPU, fp32, tiny shapes).

- model.loss "fused" vocabulary loss (input gradient computed in the forward, frozen lm_head)
  vs full-logit autograd and vs the checkpointed chunked path;
- model.fast_moe's inference MoE block and FrozenTarget's lean forward vs transformers.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import load_script

from model import fast_moe, loss_kernels
from model.configs import build_random_target, make_config
from model.head import MTPHead
from model.loss import _chunk_passes, label_positions, mtp_loss, vocab_loss
from model.target import FrozenTarget

V = 512
LOSS_TYPES = ["ce", "kl", "ce+kl"]


# ------------------------------------------------------------------ vocabulary loss
def full_logit_reference(h_NH, w_VH, labels_N, soft_NH, loss_type, kl_weight):
    """The textbook loss on full [N, V] logits; labels < 0 are ignored."""
    logp_NV = F.log_softmax(h_NH @ w_VH.T, dim=-1)
    valid_N = labels_N >= 0
    ce = F.nll_loss(logp_NV, labels_N, ignore_index=-100, reduction="sum")
    logq_NV = F.log_softmax(soft_NH @ w_VH.T, dim=-1) if soft_NH is not None else None
    kl = (logq_NV.exp() * (logq_NV - logp_NV)).sum(-1)[valid_N].sum() if logq_NV is not None else 0.0
    return {"ce": ce, "kl": kl_weight * kl, "ce+kl": ce + kl_weight * kl}[loss_type]


@pytest.mark.parametrize("impl", ["fused", "compiled"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("chunk", [0, 4, 7])
def test_fused_vocab_loss_equals_full_logits(loss_type, chunk, impl):
    torch.manual_seed(0)
    N, H = 19, 16
    w_VH = torch.randn(V, H) * H**-0.5
    h_NH = torch.randn(N, H, requires_grad=True)
    soft_NH = torch.randn(N, H) if loss_type != "ce" else None
    labels_N = torch.randint(0, V, (N,))
    labels_N[[2, 5, 6, 17]] = -100  # ignored positions
    kl_weight = 0.7

    terms, hits = vocab_loss(h_NH, w_VH, labels_N, soft_NH, loss_type, chunk, kl_weight, impl=impl)
    (terms * 1.3).backward()
    ref = full_logit_reference(h_NH, w_VH, labels_N, soft_NH, loss_type, kl_weight)
    ref_grad, = torch.autograd.grad(ref * 1.3, h_NH)

    torch.testing.assert_close(terms, ref.float())
    torch.testing.assert_close(h_NH.grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert h_NH.grad[[2, 5, 6, 17]].abs().max() == 0  # ignored labels: no gradient
    valid = labels_N >= 0
    assert hits.item() == int(((h_NH @ w_VH.T).argmax(-1) == labels_N)[valid].sum())
    with torch.no_grad():  # evaluation path: values only
        terms_eval, hits_eval = vocab_loss(h_NH, w_VH, labels_N, soft_NH, loss_type, chunk, kl_weight)
    torch.testing.assert_close(terms_eval, terms.detach())
    assert hits_eval.item() == hits.item()


@pytest.fixture(scope="module")
def tiny(tiny_model):
    cfg, model, _ = tiny_model
    return cfg, FrozenTarget(model)


def _loss_and_grads(cfg, target, ids, hidden, mask, **kwargs):
    head = MTPHead(cfg)
    head.init_random(seed=7)
    out = mtp_loss(head, target.embed_tokens, target.lm_head, ids, hidden, mask, **kwargs)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in head.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("num_steps", [1, 3])
def test_mtp_loss_fused_equals_full_logits_and_checkpointed(tiny, loss_type, num_steps):
    """Same loss, metrics and head gradients for: fused chunks, checkpointed chunks, and one
    unchunked full-logit pass (chunk_size=0 on the checkpoint path is plain autograd)."""
    cfg, target = tiny
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, 13))
    mask = (torch.rand(2, 13) > 0.3).long()  # masked-out labels
    hidden = target.hidden(ids)
    common = dict(num_steps=num_steps, loss_type=loss_type, kl_weight=0.5)
    ref, ref_grads = _loss_and_grads(cfg, target, ids, hidden, mask, chunk_size=0, vocab_impl="checkpoint", **common)
    for impl, chunk in (("fused", 5), ("fused", 0), ("checkpoint", 5)):
        out, grads = _loss_and_grads(cfg, target, ids, hidden, mask, chunk_size=chunk, vocab_impl=impl, **common)
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(out.step_loss, ref.step_loss)
        assert out.correct.tolist() == ref.correct.tolist() and out.count.tolist() == ref.count.tolist()
        assert grads.keys() == ref_grads.keys() and len(grads) > 10
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=f"{impl} {chunk} {k}")


def test_mtp_loss_rejects_unknown_vocab_impl(tiny):
    cfg, target = tiny
    ids = torch.randint(0, V, (1, 6))
    head = MTPHead(cfg)
    head.init_random(seed=7)
    with pytest.raises(ValueError, match="vocab loss impl"):
        mtp_loss(head, target.embed_tokens, target.lm_head, ids, target.hidden(ids), torch.ones_like(ids),
                 vocab_impl="nope")


def boolean_mask_rows(mask_BT, j):
    """The rule mtp_loss applied with a boolean mask before label_positions: aligned position q
    is scored at step j where loss_mask[q+2] == 1 (q <= T-3) and q >= j; row-major order."""
    B, T = mask_BT.shape
    mask_BL = torch.zeros(B, T - 1, dtype=torch.bool)
    mask_BL[:, : T - 2] = mask_BT[:, 2:].bool()
    mask_BL[:, :j] = False
    return torch.arange(B * (T - 1)).view(B, T - 1)[mask_BL]


def test_label_positions_by_hand():
    # L = 4: row 0 labels at q = 0 (x_2), 2 (x_4); row 1 at q = 0, 1, 2 (flat 4, 5, 6); q = 3 has none
    mask = torch.tensor([[1, 1, 1, 0, 1], [0, 0, 1, 1, 1]])
    got = [p.tolist() for p in label_positions(mask, 4)]
    assert got == [[0, 2, 4, 5, 6], [2, 5, 6], [2, 6], []]
    assert all(p.dtype == torch.long for p in label_positions(mask, 4))


@pytest.mark.parametrize("num_steps", [1, 2, 3, 12])
def test_label_positions_equal_the_boolean_mask_rows(num_steps):
    """Random masks, a row with no label, and (num_steps = T-1) a last step with no position."""
    g = torch.Generator().manual_seed(num_steps)
    for _ in range(5):
        mask = (torch.rand(4, 13, generator=g) > 0.4).long()
        mask[2] = 0  # a row with no label
        positions = label_positions(mask, num_steps)
        assert len(positions) == num_steps
        for j, pos in enumerate(positions):
            assert pos.tolist() == boolean_mask_rows(mask, j).tolist()
    if num_steps == 12:
        assert positions[-1].numel() == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("impl", ["fused", "checkpoint"])
@pytest.mark.parametrize("T, num_steps", [(13, 3), (6, 5)])  # (6, 5): the last step scores nothing
def test_mtp_loss_with_given_positions_equals_without(tiny, loss_type, impl, T, num_steps):
    cfg, target = tiny
    torch.manual_seed(2)
    ids = torch.randint(0, V, (3, T))
    mask = (torch.rand(3, T) > 0.3).long()
    mask[1] = 0  # a row with no label
    hidden = target.hidden(ids)
    common = dict(num_steps=num_steps, loss_type=loss_type, kl_weight=0.5, chunk_size=4, vocab_impl=impl)
    ref, ref_grads = _loss_and_grads(cfg, target, ids, hidden, mask, **common)
    out, grads = _loss_and_grads(cfg, target, ids, hidden, mask, positions=label_positions(mask, num_steps), **common)
    assert ref.count.tolist() == [len(boolean_mask_rows(mask, j)) for j in range(num_steps)]
    if T == 6:
        assert ref.count[-1] == 0
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.step_loss, ref.step_loss)
    assert out.correct.tolist() == ref.correct.tolist() and out.count.tolist() == ref.count.tolist()
    assert out.count.dtype == ref.count.dtype == torch.float32
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], msg=k)


# ------------------------------------------------------------------ frozen-target MoE forward
def experts_loop_reference(x_NH, idx_Nk, w_Nk, gate_up_E2IH, down_EHI):
    """One expert at a time, as the per-expert formula reads."""
    out_NH = torch.zeros_like(x_NH)
    I = down_EHI.shape[2]
    for n in range(x_NH.shape[0]):
        for j in range(idx_Nk.shape[1]):
            e = int(idx_Nk[n, j])
            g_2I = gate_up_E2IH[e] @ x_NH[n]
            out_NH[n] += w_Nk[n, j] * (down_EHI[e] @ (F.silu(g_2I[:I]) * g_2I[I:]))
    return out_NH


SLOT_SUMS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not fast_moe.available("cuda" if torch.cuda.is_available() else "cpu"),
    reason="the slot-sum kernel needs CUDA, or triton installed and TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("slot_sum", SLOT_SUMS)
def test_experts_grouped_equals_per_expert_loop(slot_sum, monkeypatch):
    monkeypatch.setenv("MTP_SLOT_SUM", slot_sum)
    torch.manual_seed(0)
    N, k, E, H, I = 11, 3, 6, 16, 8
    x_NH = torch.randn(N, H)
    gate_up_E2IH, down_EHI = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    idx_Nk = torch.stack([torch.randperm(E - 1)[:k] for _ in range(N)])  # expert E-1 gets no token
    w_Nk = torch.rand(N, k)
    out_NH = fast_moe.experts_grouped(x_NH, idx_Nk, w_Nk, gate_up_E2IH, down_EHI)
    ref_NH = experts_loop_reference(x_NH, idx_Nk, w_Nk, gate_up_E2IH, down_EHI)
    torch.testing.assert_close(out_NH, ref_NH, rtol=1e-5, atol=1e-5)
    perm_M, offs_E = fast_moe.sort_pairs(idx_Nk, E)
    assert offs_E.dtype == torch.int32 and offs_E[-1] == N * k and offs_E[-1] == offs_E[-2]
    assert torch.equal(idx_Nk.reshape(-1)[perm_M], idx_Nk.reshape(-1).sort().values)


@pytest.mark.parametrize("slot_sum", SLOT_SUMS)
def test_trainable_grouped_experts_match_loop_in_value_and_gradients(slot_sum, monkeypatch):
    """The head's GPU experts path (model/fast_moe.experts_grouped_train), run here on a CPU:
    the same output and the same gradients for x, routing weights and both expert weights."""
    monkeypatch.setenv("MTP_SLOT_SUM", slot_sum)
    torch.manual_seed(0)
    N, k, E, H, I = 9, 2, 5, 16, 8
    x_NH = torch.randn(N, H, requires_grad=True)
    gate_up_E2IH = torch.randn(E, 2 * I, H, requires_grad=True)
    down_EHI = torch.randn(E, H, I, requires_grad=True)
    idx_Nk = torch.stack([torch.randperm(E - 1)[:k] for _ in range(N)])
    w_Nk = torch.rand(N, k, requires_grad=True)
    g_NH = torch.randn(N, H)
    leaves = (x_NH, w_Nk, gate_up_E2IH, down_EHI)
    out = fast_moe.experts_grouped_train(x_NH, idx_Nk, w_Nk, gate_up_E2IH, down_EHI)
    grads = torch.autograd.grad((out * g_NH).sum(), leaves)
    ref = experts_loop_reference(x_NH, idx_Nk, w_Nk, gate_up_E2IH, down_EHI)
    ref_grads = torch.autograd.grad((ref * g_NH).sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not fast_moe.available("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="the slot-sum kernel needs CUDA, or triton installed and TRITON_INTERPRET=1")
def test_slot_sum_kernel_reads_each_tokens_rows_and_sends_gradients_back():
    """slot_sum against the gather-and-sum it replaces, over more than one column block, in value
    and gradient (each row of y gets the gradient of the one token it belongs to)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    N, k, E = 5, 3, 4
    H = fast_moe.SLOT_SUM_CONFIG["BLOCK_H"] + 40  # a masked second block
    perm_M, _ = fast_moe.sort_pairs(torch.randint(0, E, (N, k)), E)
    inv_M = torch.empty_like(perm_M)
    inv_M[perm_M] = torch.arange(N * k)
    y = torch.randn(N * k, H, device=dev, requires_grad=True)
    g = torch.randn(N, H, device=dev)
    out = fast_moe.slot_sum(y, inv_M.to(dev), (perm_M // k).to(dev), k)
    ref = y.index_select(0, inv_M.to(dev)).view(N, k, H).sum(1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad((out * g).sum(), y)
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), y)
    torch.testing.assert_close(grad, ref_grad)


def test_slot_sum_switch(monkeypatch):
    y = torch.zeros(2, 3)
    monkeypatch.setenv("MTP_SLOT_SUM", "torch")
    assert not fast_moe.slot_sum_enabled(y)
    monkeypatch.delenv("MTP_SLOT_SUM")
    assert not fast_moe.slot_sum_enabled(y)  # auto: CUDA only
    monkeypatch.setenv("MTP_SLOT_SUM", "cuda")
    with pytest.raises(ValueError, match="MTP_SLOT_SUM='cuda'"):
        fast_moe.slot_sum_enabled(y)


def test_head_experts_keep_transformers_path_on_cpu():
    """The head's experts are rerouted only for CUDA tensors; on a CPU transformers' forward runs."""
    head = MTPHead(make_config("tiny"))
    head.init_random(seed=0)
    experts = head.layers[0].mlp.experts
    assert "forward" in experts.__dict__ and experts.lean is True
    x = torch.randn(5, head.config.hidden_size)
    idx = torch.randint(0, head.config.num_experts, (5, head.config.num_experts_per_tok))
    w = torch.rand(5, head.config.num_experts_per_tok)
    torch.testing.assert_close(experts(x, idx, w), type(experts).forward(experts, x, idx, w))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_lean_target_forward_equals_transformers(norm_topk_prob):
    model = build_random_target("tiny", seed=0, vocab_size=V, bos_token_id=0, eos_token_id=1,
                                norm_topk_prob=norm_topk_prob).float()
    target = FrozenTarget(model)
    assert not target.lean_experts  # CPU default: transformers' path
    torch.manual_seed(2)
    ids = torch.randint(0, V, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    ref = target.hidden(ids, mask)
    target.use_lean_experts(True)
    experts = [layer.mlp.experts for layer in model.model.layers]
    lean = [e.__dict__.get("forward") for e in experts]
    assert all(f is not None for f in lean)
    torch.testing.assert_close(target.hidden(ids, mask), ref, rtol=1e-5, atol=1e-5)
    target.use_lean_experts(True)  # switching on twice keeps the same forward
    assert [e.__dict__.get("forward") for e in experts] == lean
    target.use_lean_experts(False)
    assert not any("forward" in e.__dict__ for e in experts)
    torch.testing.assert_close(target.hidden(ids, mask), ref)


def test_compiled_head_step_equals_eager_in_value_and_gradients():
    """MTPHead.compile_step (head.compile=true): the same outputs and gradients over k = 2 recursive
    steps, and a second sequence length (automatic dynamic shapes) still matches."""
    torch.manual_seed(0)
    head = MTPHead(make_config("tiny"))
    head.init_random(seed=1)
    H = head.config.hidden_size

    def run(T):
        gen = torch.Generator().manual_seed(T)
        e, h = torch.randn(2, T, H, generator=gen), torch.randn(2, T, H, generator=gen)
        pos = torch.arange(T)[None].expand(2, T)
        head.zero_grad(set_to_none=True)
        outs = head(e, h, pos, num_steps=2)
        sum((o * (j + 1)).pow(2).mean() for j, o in enumerate(outs)).backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in head.named_parameters()}

    for T in (17, 23):
        head.compile_step(False)
        ref_outs, ref_grads = run(T)
        head.compile_step(True)
        outs, grads = run(T)
        for a, b in zip(outs, ref_outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    head.compile_step(False)
    assert head._compiled_body is None


# ------------------------------------------------------------------ benchmark smoke test
def test_bench_train_cpu_smoke(tmp_path):
    """scripts/bench_train.py end to end on the tiny config: every variant runs and the JSON
    keeps its keys (the GPU run uses the same code)."""
    import json

    bench_train = load_script("bench_train")
    out = tmp_path / "bench.json"
    rc = bench_train.main(["--config", "tiny", "--device", "cpu", "--batch", "2", "--seq", "32", "--warmup", "0",
                           "--iters", "1", "--losses", "ce+kl", "--steps", "2", "--mask-frac", "0.7", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0
    variants = {r["variant"] for r in res["results"]}
    assert variants == {"naive", "online_old", "online", "online_lean", "offline_old", "offline"}
    for key in ("ce+kl/k=2",):
        s = res["summary"][key]
        for field in ("naive_tok_s", "online_tok_s", "offline_tok_s", "online_old_tok_s", "online_lean_tok_s",
                      "offline_old_tok_s", "online_steady_tok_s", "offline_steady_tok_s"):
            assert s[field] > 0, field
        assert set(s["peak_gib"]) == variants and s["online_over_naive"] > 0
    for r in res["results"]:  # every variant against the naive step's first loss and gradients (fp32 here)
        assert r["loss_first"] > 0, r["variant"]
        if r["variant"] != "naive":
            assert r["loss_rel_diff"] < 1e-5 and r["grad_rel_err"] < 1e-4 and r["grad_cosine"] > 0.9999, r
    for key in ("gpu", "date", "torch", "transformers"):
        assert key in res


# ------------------------------------------------------------------ on a GPU (skipped on CPU)
@pytest.mark.gpu
def test_gpu_lean_target_and_fused_loss_match_old_paths():
    """bf16 on CUDA: the lean experts forward against transformers' grouped_mm experts, and the
    fused loss against the checkpointed one under autocast, at the `small` config's shapes."""
    device = torch.device("cuda")
    model = build_random_target("small", seed=0).to(device=device, dtype=torch.bfloat16)
    model.config._experts_implementation = "grouped_mm"
    target = FrozenTarget(model, lean_experts=False)
    ids = torch.randint(0, 151643, (2, 256), device=device)
    ref = target.hidden(ids).float()
    target.use_lean_experts(True)
    for lean_layers in (False, True):
        target.use_lean_layers(lean_layers)
        lean = target.hidden(ids).float()
        assert ((lean - ref).norm() / ref.norm()).item() < 5e-2  # bf16; a near-tie may route differently
    target.use_lean_layers(False)

    head = MTPHead(model.config).to(device)
    head.init_random(seed=1)
    mask = torch.ones_like(ids)
    hidden = target.hidden(ids)
    grads = {}
    for impl in ("checkpoint", "fused"):
        head.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mtp_loss(head, target.embed_tokens, target.lm_head, ids, hidden, mask, num_steps=2,
                           loss_type="ce+kl", chunk_size=128, vocab_impl=impl)
        out.loss.backward()
        grads[impl] = torch.cat([p.grad.flatten().float() for p in head.parameters() if p.grad is not None])
        grads[impl + "_loss"] = out.loss.detach()
    torch.testing.assert_close(grads["fused_loss"], grads["checkpoint_loss"], rtol=1e-3, atol=1e-3)
    rel = (grads["fused"] - grads["checkpoint"]).norm() / grads["checkpoint"].norm()
    assert rel.item() < 1e-2


def test_lean_layers_hidden_equals_transformers():
    """FrozenTarget.use_lean_layers: qwen3_forward.py's layer forward without a KV cache; right padding
    changes only the padded positions."""
    model = build_random_target("tiny", seed=0, vocab_size=V, bos_token_id=0, eos_token_id=1).float()
    target = FrozenTarget(model)
    torch.manual_seed(3)
    ids = torch.randint(0, V, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    ref = target.hidden(ids, mask)
    target.use_lean_layers(True)
    lean = target.hidden(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(lean[real], ref[real], rtol=1e-4, atol=1e-4)
    target.use_lean_layers(False)
    torch.testing.assert_close(target.hidden(ids, mask), ref)


@pytest.mark.skipif(not loss_kernels.available("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="the loss kernel needs CUDA, or triton installed and TRITON_INTERPRET=1")
def test_ce_kernel_equals_compiled_passes_with_ties_and_ignored_rows():
    """The Triton ce pass against the torch.compile'd one (run eagerly): rows of more than one
    block, argmax ties within and across blocks (first index wins, as torch.argmax), an ignored row."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    C, Vb = 6, 2 * loss_kernels.CONFIG["BLOCK_V"] + 77  # a masked tail block
    z = torch.randn(C, Vb, generator=gen) * 3
    labels = torch.randint(0, Vb, (C,), generator=gen)
    z[0, 5], z[0, Vb - 3] = 40.0, 40.0  # tie across blocks: index 5
    labels[0] = 5
    z[1, 9], z[1, 10] = 40.0, 40.0  # tie within a block: index 9, so label 10 is no hit
    labels[1] = 10
    labels[2] = -100
    z[3, labels[3]] = 30.0  # a sure hit
    z, labels = z.to(dev), labels.to(dev)
    ref_terms, ref_hits, ref_g = _chunk_passes(z.clone(), None, labels, True, 0.0)
    terms, hits, g = loss_kernels.ce_chunk_pass(z.clone(), labels)
    torch.testing.assert_close(terms, ref_terms, rtol=1e-6, atol=1e-5)
    assert int(hits) == int(ref_hits) == 2  # rows 0 and 3
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-7)
    assert g[2].abs().max() == 0 and terms[2] == 0  # the ignored row


def test_loss_kernel_switch(monkeypatch):
    z = torch.zeros(2, 3)
    monkeypatch.setenv("MTP_LOSS_KERNEL", "inductor")
    assert not loss_kernels.enabled(z)
    monkeypatch.setenv("MTP_LOSS_KERNEL", "cuda")
    with pytest.raises(ValueError, match="MTP_LOSS_KERNEL='cuda'"):
        loss_kernels.enabled(z)
