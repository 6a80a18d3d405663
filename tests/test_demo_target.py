"""train/demo_target.py's loss over the tokens the data uses (--vocab data): the exact
full-vocabulary cross-entropy of a model whose unused lm_head rows are zero, and rows that stay zero."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.demo_target import DataVocab, DemoRecipe, chunked_ce, train_demo_target


def _setup(seed=0, V=50, H=8, N=13, multiple=1):
    g = torch.Generator().manual_seed(seed)
    chats = [np.array([1, 4, 4, 9, 17, 30], dtype=np.int32), np.array([2, 9, 41, 30], dtype=np.int32)]
    vocab = DataVocab.from_chats(chats, V, "cpu", multiple=multiple)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    vocab.zero_unused_rows(w)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    used = vocab.used_ids
    labels = used[torch.randint(len(used), (N,), generator=g)]
    labels[3] = 5  # a label the training chats never use: its logit is 0
    labels[7] = 0
    return vocab, w, h, labels


def test_data_vocab_indexes_the_used_tokens():
    vocab, w, _, _ = _setup()
    assert vocab.used_ids.tolist() == [1, 2, 4, 9, 17, 30, 41]
    assert vocab.index_of[9].item() == 3 and vocab.index_of[5].item() == -1
    assert vocab.log_rest.item() == pytest.approx(np.log(50 - 7))
    assert w[5].abs().sum() == 0 and w[9].abs().sum() > 0
    topped = DataVocab.from_chats([np.array([1, 4, 9, 17, 30, 2, 41])], 50, "cpu", multiple=4)
    assert len(topped.used_ids) == 8 and {1, 2, 4, 9, 17, 30, 41} < set(topped.used_ids.tolist())
    assert DataVocab.from_chats([np.array([1, 4])], 6, "cpu", multiple=8).log_rest.item() == -np.inf  # all rows


@pytest.mark.parametrize("multiple", [1, 4])
def test_used_token_loss_equals_the_full_vocabulary_loss_for_a_topped_up_set(multiple):
    vocab, w, h, labels = _setup(multiple=multiple)
    full = F.cross_entropy(h @ w.T, labels)
    assert chunked_ce(h, w, labels, 5, vocab).item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize("chunk", [4, 64])
def test_used_token_loss_equals_the_full_vocabulary_loss(chunk):
    vocab, w, h, labels = _setup()
    h_full, w_full = h.clone().requires_grad_(), w.clone().requires_grad_()
    full = F.cross_entropy(h_full @ w_full.T, labels)
    full.backward()
    h_ours, w_ours = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = chunked_ce(h_ours, w_ours, labels, chunk, vocab)
    ours.backward()
    # (the loss is summed in fp32, as the training step does)
    assert ours.item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(h_ours.grad, h_full.grad, rtol=1e-5, atol=1e-7)
    unused = vocab.index_of < 0
    assert w_ours.grad[unused].abs().sum() == 0  # the unused rows get no gradient ...
    torch.testing.assert_close(w_ours.grad[~unused], w_full.grad[~unused], rtol=1e-5, atol=1e-7)
    # ... where the full loss would move them: the shortcut is exact only because they stay zero
    assert w_full.grad[unused].abs().sum() > 0


def test_unused_rows_stay_zero_under_adamw_with_weight_decay():
    vocab, w, h, labels = _setup()
    w = w.float().requires_grad_()
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        chunked_ce(h.float(), w, labels, 8, vocab).backward()
        opt.step()
        opt.zero_grad()
    unused = vocab.index_of < 0
    assert w[unused].abs().sum() == 0 and w[~unused].abs().sum() > 0


def test_an_unknown_vocab_setting_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--vocab 'used'.*'data' or 'full'"):
        train_demo_target(DemoRecipe(out=str(tmp_path / "t"), vocab="used", smoke=True))
    assert not (tmp_path / "t").exists()


def test_named_demo_config_is_the_demo_targets_shape():
    """bench_decode.py --config demo times the steps of the model make_demo_target.py trains."""
    from model.configs import make_config
    from train.demo_target import DEMO

    named, trained = make_config("demo").to_dict(), make_config("tiny", **DEMO).to_dict()
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "vocab_size",
                "tie_word_embeddings"):
        assert named[key] == trained[key], key
