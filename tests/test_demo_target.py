"""train/demo_target.py's loss over the tokens the data uses (--vocab data): the exact
full-vocabulary cross-entropy of a model whose unused lm_head rows are zero, and rows that stay zero."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.demo_loss import DataVocab, chunked_ce, chunked_ce_unlikelihood, unlikelihood_candidates
from train.demo_target import DemoRecipe, train_demo_target


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


# ----------------------------------------------------------------------------- unlikelihood
def _candidates_by_hand(x_BT: torch.Tensor, window: int, sep: int) -> list[set[int]]:
    """The rule in words: for the label x[t+1], the ids among x[t-window+1 .. t] with no separator
    from there up to t (the label's conversation), other than the label."""
    out = []
    for row in x_BT.tolist():
        for t in range(len(row) - 1):
            got = set()
            for j in range(t, max(-1, t - window), -1):
                if row[j] == sep:
                    break
                got.add(row[j])
            if row[t] == sep:  # the label opens a new conversation: nothing before it counts
                got = set()
            got.discard(row[t + 1])
            out.append(got)
    return out


@pytest.mark.parametrize("window", [1, 3, 6])
def test_unlikelihood_candidates_follow_the_rule(window):
    sep = 99
    x = torch.tensor([[5, 6, 5, 7, 99, 5, 8, 8, 6, 5],
                      [1, 1, 1, 2, 1, 99, 99, 3, 1, 3]])
    cands = unlikelihood_candidates(x, window, separator=sep)
    assert cands.shape == (2 * 9, window)
    got = [set(c for c in row if c >= 0) for row in cands.tolist()]
    assert got == _candidates_by_hand(x, window, sep)
    # each id at most once (the loss takes a set, not a count)
    assert all(len([c for c in row if c >= 0]) == len(s) for row, s in zip(cands.tolist(), got))
    with pytest.raises(ValueError, match="window 0"):
        unlikelihood_candidates(x, 0, separator=sep)


def test_unlikelihood_candidates_spot_check():
    x = torch.tensor([[5, 6, 5, 7, 99, 5, 8]])
    got = [sorted(c for c in row if c >= 0) for row in unlikelihood_candidates(x, 4, separator=99).tolist()]
    # labels: 6, 5, 7, 99, 5, 8
    assert got == [[5], [6], [5, 6], [5, 6, 7], [], [5]]


def _direct_ce_ul(h, w, labels, cands):
    logp = torch.log_softmax((h @ w.T).double(), -1)
    ce = -logp.gather(1, labels[:, None]).mean()
    ul = 0.0
    for i, row in enumerate(cands.tolist()):
        for c in set(c for c in row if c >= 0):
            ul = ul - torch.log1p(-logp[i, c].exp())
    return ce, ul / len(labels)


@pytest.mark.parametrize("use_vocab", [False, True])
def test_unlikelihood_loss_equals_its_definition_and_its_gradient(use_vocab):
    vocab, w, h, _ = _setup(N=9)
    x = torch.tensor([[1, 4, 4, 9, 17, 30, 4, 9, 41, 2]])  # 30 separates two conversations here
    labels = x[0, 1:]
    cands = unlikelihood_candidates(x, 5, separator=30)
    assert (cands >= 0).sum() > 5
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ce, ul = chunked_ce_unlikelihood(h1, w1, labels, cands, 4, vocab if use_vocab else None)
    (ce + 0.7 * ul).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ce_ref, ul_ref = _direct_ce_ul(h2, w2, labels, cands)
    (ce_ref + 0.7 * ul_ref).backward()
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-6)
    assert ul.item() == pytest.approx(ul_ref.item(), rel=1e-6) and ul.item() > 0
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    used = (vocab.index_of >= 0) if use_vocab else torch.ones(len(w), dtype=torch.bool)
    torch.testing.assert_close(w1.grad[used], w2.grad[used], rtol=1e-5, atol=1e-7)
    assert chunked_ce(h, w, labels, 4, vocab if use_vocab else None).item() == pytest.approx(ce.item(), rel=1e-6)


def test_unlikelihood_pushes_a_recent_token_down():
    """One SGD step on the unlikelihood term lowers the probability of a repeated candidate."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 6, generator=g, dtype=torch.float64)
    h = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[3, 7, 3, 7]])
    cands = unlikelihood_candidates(x, 8, separator=19)  # last position: label 7, candidate 3
    _, ul = chunked_ce_unlikelihood(h, w, x[0, 1:], cands, 2)
    ul.backward()
    p_before = torch.softmax(h[2] @ w.T, -1)[3]
    p_after = torch.softmax((h[2] - 0.5 * h.grad[2]) @ w.T, -1)[3]
    assert p_after < p_before


@pytest.mark.parametrize("bad, match", [
    (dict(unlikelihood=-1.0), "--unlikelihood -1.0"),
    (dict(seq_unlikelihood_s=-1.0), "--seq-unlikelihood-s -1.0"),
    (dict(seq_unlikelihood_s=5.0, seq_unlikelihood_weight=0.0), "--seq-unlikelihood-weight 0.0"),
    (dict(seq_unlikelihood_s=5.0, seq_unlikelihood_batch=16, seq_unlikelihood_prompts=8), "1 <= batch <= prompts"),
])
def test_bad_unlikelihood_settings_are_refused_before_any_work(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train_demo_target(DemoRecipe(out=str(tmp_path / "t"), smoke=False, **bad))
    assert not (tmp_path / "t").exists()


# ----------------------------------------------------------------------------- sequence-level unlikelihood
def test_repeated_ngram_mask_marks_the_repeats_of_the_answer_only():
    from train.demo_unlikelihood import repeated_ngram_mask

    prompt = [1, 2, 3]
    #          answer: 4 5 1 2 3 | 6 7 6 7 6 7
    ids = prompt + [4, 5, 1, 2, 3, 6, 7, 6, 7, 6, 7]
    got = repeated_ngram_mask(ids, len(prompt), 3)
    # (1,2,3) repeats the prompt's; (6,7,6) first at answer index 5, again at 7 (overlapping: a loop)
    assert got == [False, False, True, True, True, False, False, True, True, True, True]
    assert repeated_ngram_mask([9, 8, 7, 6], 0, 2) == [False] * 4
    assert repeated_ngram_mask([5, 5, 5], 1, 2) == [True, True]  # (5,5) at 0 and at 1


@pytest.mark.parametrize("use_vocab", [False, True])
def test_token_unlikelihood_equals_its_definition(use_vocab):
    from train.demo_loss import chunked_token_unlikelihood

    vocab, w, h, _ = _setup(N=9)
    tokens = torch.tensor([1, 4, 4, 9, 41, 30, 2, 17, 9])
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = chunked_token_unlikelihood(h1, w1, tokens, 3, vocab if use_vocab else None)
    got.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    p = torch.softmax(h2 @ w2.T, -1).gather(1, tokens[:, None])[:, 0]
    ref = -torch.log1p(-p).sum()
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-8)


def test_sequence_unlikelihood_updates_push_the_model_off_its_own_loop():
    """A stub generator answers every prompt with a loop; a few updates (unlikelihood only, SGD)
    lower the loss of those answers, and the stats count what was generated and marked."""
    from model.configs import build_random_target
    from train.demo_unlikelihood import SeqUnlikelihood

    torch.manual_seed(0)
    model = build_random_target("tiny", seed=0, unit_logits=False, num_hidden_layers=1)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    loop = [21, 22, 23] * 5 + [99]

    def generate(m, ps, n):
        assert n == 16 and not torch.is_grad_enabled()
        return [list(loop) for _ in ps]

    seq = SeqUnlikelihood(model, prompts, eos_ids=[99], generate=generate, ngram=3, new_tokens=16,
                          prompts_per_round=3, batch_size=3, loss_chunk=8)
    x, att, mk, generated = next(seq._batches())
    assert generated == 3 * 15 and mk.sum().item() == 3 * 12  # the EOS is dropped; 3 of each 15 are first seen
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):  # first teach the model the loop (a random model gives every token ~1/vocab)
        logits = model(input_ids=x, attention_mask=att).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    before = seq.loss(x, att, mk, generated).item()
    assert before > 1.0
    with torch.no_grad():  # the definition: the state before each marked token scores that token
        p = torch.softmax(model(input_ids=x, attention_mask=att).logits.double(), -1)
        ref = sum(-torch.log1p(-p[b, t - 1, x[b, t]]) for b, t in mk.nonzero().tolist()) / generated
    assert before == pytest.approx(ref.item(), rel=1e-4)

    def update():
        opt.step()
        opt.zero_grad()

    stats = seq.run(0.0, ce_step=lambda: torch.zeros(()), aux_loss=lambda: torch.zeros(()), update=update,
                    log=lambda m: None)
    assert stats.updates == 1 and stats.rounds == 1 and stats.marked_tokens == 2 * 3 * 12
    for _ in range(5):
        seq.run(0.0, lambda: torch.zeros(()), lambda: torch.zeros(()), update, log=lambda m: None)
    after = seq.loss(x, att, mk, generated).item()
    assert after < 0.9 * before  # 1.60 -> 1.31 here; a sign error would raise it
    with pytest.raises(ValueError, match="no training prompt"):
        SeqUnlikelihood(model, [], eos_ids=[99], generate=generate)
