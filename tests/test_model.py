"""The head's names and shapes, the target wrapper, and the loss's label shift (CPU, tiny)."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.configs import make_config
from model.head import MTPHead, head_param_shapes
from model.loss import mtp_loss, simulated_acceptance_length, step_weights
from model.target import FrozenTarget

V = 512


@pytest.fixture(scope="module")
def tiny(tiny_model):
    cfg, model, _ = tiny_model
    target = FrozenTarget(model)
    head = MTPHead(cfg)
    head.init_random(seed=1)
    return cfg, target, head


def expected_head_shapes(cfg):
    """The exported-name table (docs/export.md) with the `mtp.` prefix removed and the experts in transformers'
    fused layout (the exporter splits them per expert)."""
    H, D = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    L = "layers.0."
    return {
        "fc.weight": (H, 2 * H),
        "pre_fc_norm_embedding.weight": (H,),
        "pre_fc_norm_hidden.weight": (H,),
        "norm.weight": (H,),
        L + "input_layernorm.weight": (H,),
        L + "post_attention_layernorm.weight": (H,),
        L + "self_attn.q_proj.weight": (q, H),
        L + "self_attn.k_proj.weight": (kv, H),
        L + "self_attn.v_proj.weight": (kv, H),
        L + "self_attn.o_proj.weight": (H, q),
        L + "self_attn.q_norm.weight": (D,),
        L + "self_attn.k_norm.weight": (D,),
        L + "mlp.gate.weight": (E, H),
        L + "mlp.experts.gate_up_proj": (E, 2 * I, H),
        L + "mlp.experts.down_proj": (E, H, I),
    }


@pytest.mark.parametrize("name", ["tiny", "qwen3-30b-a3b"])
def test_head_names_and_shapes_match_design(name):
    cfg = make_config(name)
    assert head_param_shapes(cfg) == expected_head_shapes(cfg)


def test_30b_head_size_matches_design():
    shapes = head_param_shapes(make_config("qwen3-30b-a3b"))
    n = sum(math.prod(s) for s in shapes.values())
    assert 0.62e9 < n < 0.64e9  # "about 0.63 B parameters"
    assert shapes["fc.weight"] == (2048, 4096)
    assert shapes["layers.0.mlp.experts.gate_up_proj"] == (128, 2 * 768, 2048)


def test_head_has_no_embedding_or_lm_head(tiny):
    _, _, head = tiny
    names = set(head.state_dict())
    assert not any("embed" in n and "norm" not in n for n in names)
    assert not any("lm_head" in n for n in names)


def test_head_layer_is_moe_even_if_target_layer0_is_dense():
    cfg = make_config("tiny", vocab_size=V, mlp_only_layers=[0], bos_token_id=0, eos_token_id=1)
    head = MTPHead(cfg)
    assert "layers.0.mlp.gate.weight" in head.state_dict()


def test_lm_head_of_wrapper_hidden_equals_target_logits(tiny):
    cfg, target, _ = tiny
    ids = torch.randint(0, V, (2, 11))
    hidden, logits = target(ids, with_logits=True)
    ref = target.model(input_ids=ids).logits
    torch.testing.assert_close(target.lm_head(hidden), ref)
    torch.testing.assert_close(logits, ref)


def test_last_layer_init_copies_target_layer(tiny):
    cfg, target, _ = tiny
    head = MTPHead(cfg)
    head.init_from_target_layer(target.last_layer)
    src = target.last_layer.state_dict()
    for k, v in head.layers[0].state_dict().items():
        assert torch.equal(v, src[k]), k
    H = cfg.hidden_size
    assert torch.equal(head.fc.weight[:, H:], torch.eye(H))


def reference_loss_one_step(head, target, ids, mask):
    """Position by position, no vectorised shift: the head at q sees (e(x_{q+1}), h_q) and is
    scored on x_{q+2} where that token is in the loss mask."""
    hidden = target.hidden(ids)
    B, T = ids.shape
    pos = torch.arange(T - 1).unsqueeze(0)
    total, n, hits = 0.0, 0, 0
    for b in range(B):
        e = target.embed_tokens(ids[b : b + 1, 1:])
        out = head(e, hidden[b : b + 1, : T - 1], pos)
        for q in range(T - 2):
            if mask[b, q + 2]:
                logits = target.lm_head(out[0, q])
                total = total + F.cross_entropy(logits[None], ids[b, q + 2][None])
                hits += int(logits.argmax() == ids[b, q + 2])
                n += 1
    return total / n, hits, n


def test_one_step_loss_matches_position_by_position_reference(tiny):
    cfg, target, head = tiny
    torch.manual_seed(3)
    ids = torch.randint(0, V, (2, 9))
    mask = torch.zeros_like(ids)
    mask[0, 3:7] = 1
    mask[1, 2:] = 1
    out = mtp_loss(head, target.embed_tokens, target.lm_head, ids, target.hidden(ids), mask, num_steps=1, chunk_size=3)
    ref, hits, n = reference_loss_one_step(head, target, ids, mask)
    torch.testing.assert_close(out.loss, ref.float())
    assert out.count.tolist() == [n] and out.correct.tolist() == [hits]


def test_second_step_reads_first_step_output_one_position_back(tiny):
    cfg, target, head = tiny
    torch.manual_seed(4)
    ids = torch.randint(0, V, (1, 8))
    mask = torch.ones_like(ids)
    hidden = target.hidden(ids)
    T = ids.shape[1]
    pos = torch.arange(T - 1).unsqueeze(0)
    e = target.embed_tokens(ids[:, 1:])
    out1 = head(e, hidden[:, : T - 1], pos)
    inp2 = torch.cat([hidden[:, :1], out1[:, :-1]], dim=1)
    out2 = head(e, inp2, pos)
    # step 2 is scored at q = 1 .. T-3 on x_{q+2}
    logits = target.lm_head(out2[0, 1 : T - 2])
    ref2 = F.cross_entropy(logits, ids[0, 3:T])
    res = mtp_loss(head, target.embed_tokens, target.lm_head, ids, hidden, mask, num_steps=2, chunk_size=0)
    torch.testing.assert_close(res.step_loss[1], ref2.detach())
    assert res.count.tolist() == [T - 2, T - 3]


@pytest.mark.parametrize("loss_type", ["ce", "kl", "ce+kl"])
def test_chunked_loss_equals_full_loss_values_and_grads(tiny, loss_type):
    cfg, target, _ = tiny
    ids = torch.randint(0, V, (2, 13))
    mask = (torch.rand(2, 13) > 0.3).long()
    hidden = target.hidden(ids)
    grads = []
    losses = []
    for chunk in (0, 5):
        head = MTPHead(cfg)
        head.init_random(seed=7)
        out = mtp_loss(head, target.embed_tokens, target.lm_head, ids, hidden, mask,
                       num_steps=3, loss_type=loss_type, chunk_size=chunk)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({k: p.grad.clone() for k, p in head.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)


def test_kl_is_zero_when_head_reproduces_target_distribution(tiny):
    """KL target = softmax(lm_head(h_{q+1})): a head whose output equals h_{q+1} has KL 0."""
    cfg, target, _ = tiny
    ids = torch.randint(0, V, (1, 7))
    hidden = target.hidden(ids)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, e, h, pos, num_steps=1):
            return [hidden[:, 1:] + 0 * self.w] * num_steps

    out = mtp_loss(Oracle(), target.embed_tokens, target.lm_head, ids, hidden, torch.ones_like(ids), loss_type="kl")
    assert abs(out.loss.item()) < 1e-5


def test_step_weights_and_simulated_acceptance_length():
    w = step_weights(3, 0.5)
    assert abs(sum(w) - 1) < 1e-9 and w[0] > w[1] > w[2]
    assert simulated_acceptance_length([]) == 1.0
    assert abs(simulated_acceptance_length([0.8, 0.5]) - (1 + 0.8 + 0.4)) < 1e-9
    assert simulated_acceptance_length([1.0, 1.0, 1.0]) == 4.0


@pytest.mark.parametrize("impl", [None, "eager", "sdpa"])
def test_head_is_causal_whatever_attention_the_config_names(impl):
    cfg = make_config("tiny", vocab_size=V, bos_token_id=0, eos_token_id=1)
    cfg._attn_implementation = impl
    head = MTPHead(cfg)
    head.init_random(seed=0)
    e, h = torch.randn(1, 6, cfg.hidden_size), torch.randn(1, 6, cfg.hidden_size)
    pos = torch.arange(6)[None]
    a = head(e, h, pos)
    e2 = e.clone()
    e2[:, 4:] += 1.0  # change the future only
    b = head(e2, h, pos)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_hits_out_maps_each_steps_top1_to_its_position(tiny):
    """mtp_loss(hits_out=): step j's [B, T-1] map is True exactly where its scored prediction at
    position q (label x_{q+2}) is the label; labels made to equal the head's choice at even q."""
    cfg, target, head = tiny
    torch.manual_seed(5)
    T = 10
    ids = torch.randint(0, V, (1, T))
    with torch.no_grad():
        for q in range(0, T - 2, 2):  # the prediction at q reads x_0..x_{q+1} only: fix x_{q+2} to it
            e = target.embed_tokens(ids[:, 1:])
            out1 = head(e, target.hidden(ids)[:, : T - 1], torch.arange(T - 1)[None])
            ids[0, q + 2] = target.lm_head(out1[0, q]).argmax()
        hidden = target.hidden(ids)
        e = target.embed_tokens(ids[:, 1:])
        pos = torch.arange(T - 1)[None]
        out1 = head(e, hidden[:, : T - 1], pos)
        out2 = head(e, torch.cat([hidden[:, :1], out1[:, :-1]], dim=1), pos)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # scored labels x_2 .. x_9
    hits: list = []
    res = mtp_loss(head, target.embed_tokens, target.lm_head, ids, hidden, mask, num_steps=2, chunk_size=3, hits_out=hits)
    want = []
    for j, out in enumerate((out1, out2)):
        w = torch.zeros(1, T - 1, dtype=torch.bool)
        for q in range(j, T - 2):
            w[0, q] = bool(target.lm_head(out[0, q]).argmax() == ids[0, q + 2])
        want.append(w)
    assert [h.shape for h in hits] == [(1, T - 1)] * 2
    assert torch.equal(hits[0], want[0]) and torch.equal(hits[1], want[1])
    assert hits[0][0, 0:T - 2:2].all() and res.correct.tolist() == [float(h.sum()) for h in hits]
