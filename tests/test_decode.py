"""The speculative decoding engine (model/engine.py, drafters.py, acceptance.py, evaluate.py) on CPU: acceptance rule, stub-model loops,
lossless greedy decoding on a tiny Qwen3-MoE, speculative sampling's distribution, and our
forward against transformers'."""

import pytest
import torch

from model.acceptance import (
    VERIFY_RULES,
    SamplingParams,
    VerifyRule,
    acceptance_stats,
    filtered_probs,
    mode_acceptance,
    sample,
    sampler_probs,
    verify_drafts,
)
from model.drafters import MTPDrafter, NGramDrafter
from model.engine import Engine, MTPHeadLM, TargetLM
from model.evaluate import EvalSettings, evaluate
from model.head import MTPHead
from model.report import per_position_mode

V = 512  # conftest.SMALL_VOCAB
GREEDY = SamplingParams()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------ stub models
def pack(tok, pos):
    """Stub hidden state: the (token, position) pair, exact in fp32."""
    return (tok * 4096 + pos).float()[..., None]


def unpack(h):
    v = h[..., 0].long()
    return v // 4096, v % 4096


class StubTarget:
    """Toy LM: the logits after `tok` at position `pos` are logits_fn(tok, pos)."""

    def __init__(self, logits_fn):
        self.logits_fn, self.device = logits_fn, torch.device("cpu")

    def allocate(self, batch_size, max_len):
        pass

    def forward(self, tokens_BT, positions_BT, prefill=False):
        return pack(tokens_BT, positions_BT)

    def logits(self, hidden):
        return self.logits_fn(*unpack(hidden))


class StubHead:
    """Toy MTP head: input (x_{p+1}, h_p) at position p -> predicts the token after x_{p+1}
    at position p+1 with logits_fn(x_{p+1}, p+1); logits_fn = the target's makes an oracle."""

    device, dtype, hidden_size = torch.device("cpu"), torch.float32, 1

    def __init__(self, logits_fn, vocab_size):
        self.logits_fn, self.vocab_size = logits_fn, vocab_size

    def allocate(self, batch_size, max_len):
        pass

    def forward(self, tokens_BT, hidden_BTH, positions_BT, prefill=False):
        return pack(tokens_BT, positions_BT + 1)

    def logits(self, hidden):
        return self.logits_fn(*unpack(hidden))


SV = 16  # stub vocabulary


def greedy_fn(tok, pos):
    """Deterministic toy target: next = (3 tok + pos + 1) mod SV."""
    return 10.0 * torch.nn.functional.one_hot((3 * tok + pos + 1) % SV, SV).float()


def draft_fn(wrong):
    """The target's choice, except +1 (wrong) when the predicted index pos+1 satisfies wrong()."""
    def fn(tok, pos):
        nxt = (3 * tok + pos + 1) % SV
        nxt = torch.where(wrong(pos + 1), (nxt + 1) % SV, nxt)
        return 10.0 * torch.nn.functional.one_hot(nxt, SV).float()
    return fn


def simulate(prompt_len, K, max_new, wrong):
    """Chain drafting told sequentially: a step that starts with s known tokens drafts indices
    s .. s+K-1 and accepts the leading correct ones; hist[n] counts steps accepting n."""
    s, hist = prompt_len + 1, [0] * (K + 1)
    while s - prompt_len < max_new:
        n = 0
        while n < K and not wrong(s + n):
            n += 1
        hist[n] += 1
        s += n + 1
    return hist


def run_stub(K, wrong, prompts, max_new, batch_size=None):
    target = StubTarget(greedy_fn)
    head = StubHead(draft_fn(wrong), SV)
    eng = Engine(target, MTPDrafter(head), batch_size=batch_size or len(prompts), max_len=64,
                 max_new_tokens=max_new, steps=K)
    return eng, eng.generate(prompts), eng.generate(prompts, speculative=False)


# -------------------------------------------------------------------- acceptance core
def test_verify_drafts_greedy_cases():
    # target argmax per verify position: [5, 6, 7, 8]
    logits = torch.nn.functional.one_hot(torch.tensor([[5, 6, 7, 8]] * 3), 10).float()
    drafts = torch.tensor([[5, 6, 7], [1, 6, 7], [5, 6, 9]])  # all / none / two accepted
    n, emitted = verify_drafts(drafts, None, logits, GREEDY)
    assert n.tolist() == [3, 0, 2]
    assert [emitted[b, : n[b] + 1].tolist() for b in range(3)] == [[5, 6, 7, 8], [5], [5, 6, 7]]
    n1, e1 = verify_drafts(torch.tensor([[5], [4]]), None, logits[:2, :2], GREEDY)  # K = 1
    assert n1.tolist() == [1, 0] and e1[0].tolist() == [5, 6] and e1[1, 0].item() == 5


def test_acceptance_stats():
    s = acceptance_stats([2, 1, 0, 1])  # 4 steps emitting 1, 2, 1, 4 tokens
    assert s["verify_steps"] == 4 and s["acceptance_length"] == pytest.approx(8 / 4)
    assert s["per_position_acceptance_unconditional"] == [0.5, 0.25, 0.25]
    assert s["per_position_acceptance"] == [0.5, 0.5, 1.0]
    assert acceptance_stats([3, 0])["per_position_acceptance"] == [0.0]
    assert acceptance_stats([3, 0, 0])["per_position_acceptance"] == [0.0, None]


def tv(a, b) -> float:
    return 0.5 * (a - b).abs().sum().item()


def test_filters_match_their_definitions():
    """top-k renormalises, top-p keeps the smallest head of the sorted distribution reaching p
    (the crossing token included), verification applies them one after the other (SGLang's
    top_k_renorm then top_p_renorm), the sampler jointly (both on the unfiltered distribution)
    and min_p after both."""
    p = torch.tensor([0.4, 0.3, 0.12, 0.08, 0.06, 0.04])
    logits = p.log()
    f = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    torch.testing.assert_close(f, torch.tensor([0.4, 0.3, 0.12, 0, 0, 0]) / 0.82)
    f = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))  # 0.4 + 0.3 reaches 0.7
    torch.testing.assert_close(f, torch.tensor([0.4, 0.3, 0, 0, 0, 0]) / 0.7)
    f = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.71))  # crossing token kept
    torch.testing.assert_close(f, torch.tensor([0.4, 0.3, 0.12, 0, 0, 0]) / 0.82)
    # sequential: top-3 renormalised is [0.488, 0.366, 0.146]; top_p 0.8 keeps two of it
    f = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    torch.testing.assert_close(f, torch.tensor([0.4, 0.3, 0, 0, 0, 0]) / 0.7)
    # joint: in the top 3 and inside the 0.8 nucleus of p itself (0.4 + 0.3 < 0.8: three kept)
    g = sampler_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    torch.testing.assert_close(g / g.sum(), torch.tensor([0.4, 0.3, 0.12, 0, 0, 0]) / 0.82)
    g = sampler_probs(logits, SamplingParams(temperature=1.0, min_p=0.3))  # >= 0.3 * 0.4
    torch.testing.assert_close(g / g.sum(), torch.tensor([0.4, 0.3, 0.12, 0, 0, 0]) / 0.82)
    g = sampler_probs(logits, SamplingParams(temperature=1.0, min_p=0.31))
    torch.testing.assert_close(g / g.sum(), torch.tensor([0.4, 0.3, 0, 0, 0, 0]) / 0.7)
    # temperature sharpens before the filters
    torch.testing.assert_close(filtered_probs(logits, SamplingParams(temperature=0.5)), (p**2) / (p**2).sum())
    assert sample(torch.tensor([[0.1, 3.0, 0.2]]), GREEDY).item() == 1
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)


@pytest.mark.parametrize("rule", ["target_only", "rejection"])
@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)],
                         ids=["plain", "filtered"])
def test_verify_drafts_sampling_is_unbiased(rule, sp):
    """One draft position: the emitted token follows the target's filtered distribution,
    whatever the draft is. Target-only accepts a top-1 draft with probability p(d); p/q
    rejection sampling accepts a sampled draft with probability sum(min(p, q))."""
    torch.manual_seed(0)
    N, Vt = 200_000, 6
    p_raw = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    q = torch.tensor([0.05, 0.05, 0.1, 0.1, 0.3, 0.4])
    logits = p_raw.log().expand(N, 2, Vt)
    p = filtered_probs(p_raw.log(), sp)
    if rule == "rejection":
        draft = torch.multinomial(q, N, replacement=True)[:, None]
        n, emitted = verify_drafts(draft, q.expand(N, 1, Vt), logits, sp, VerifyRule("rejection"))
        assert n.float().mean().item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.01)
    else:  # the head's top-1 token: deterministic; q is ignored
        draft = torch.full((N, 1), int(q.argmax()) if sp.top_k <= 0 else 1)
        n, emitted = verify_drafts(draft, q.expand(N, 1, Vt), logits, sp, VerifyRule())
        assert n.float().mean().item() == pytest.approx(p[draft[0, 0]].item(), abs=0.01)
    freq = torch.bincount(emitted[:, 0], minlength=Vt).float() / N
    assert tv(freq, p) < 0.01
    assert tv(q, p) > 0.5  # the draft alone would fail the bound


def test_accept_thresholds_follow_sglang():
    """threshold_single: a draft whose target probability reaches it is always accepted;
    threshold_acc: accept when u < p / threshold_acc (more acceptance below 1: lossy)."""
    torch.manual_seed(0)
    N, Vt = 50_000, 4
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(N, 2, Vt)
    draft = torch.full((N, 1), 1)  # p(d) = 0.3
    sp = SamplingParams(temperature=1.0)
    rate = lambda rule: verify_drafts(draft, None, logits, sp, rule)[0].float().mean().item()  # noqa: E731
    assert rate(VerifyRule()) == pytest.approx(0.3, abs=0.01)
    assert rate(VerifyRule(threshold_single=0.25)) == 1.0
    assert rate(VerifyRule(threshold_acc=0.5)) == pytest.approx(0.6, abs=0.01)
    with pytest.raises(ValueError, match="thresholds"):
        VerifyRule("rejection", threshold_acc=0.5)


def test_mode_acceptance_follows_the_rule():
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]])
    torch.testing.assert_close(mode_acceptance(p, VerifyRule()), torch.tensor([[0.5, 0.9]]))
    torch.testing.assert_close(mode_acceptance(p, VerifyRule(threshold_single=0.8)), torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(mode_acceptance(p, VerifyRule(threshold_acc=0.6)), torch.tensor([[0.5 / 0.6, 1.0]]))
    out = torch.empty(1, 1)  # verify_drafts fills it for the positions that score drafts
    verify_drafts(torch.tensor([[2]]), None, p.log(), SamplingParams(temperature=1.0), mode_accept_out=out)
    torch.testing.assert_close(out, torch.tensor([[0.5]]))


def peaked_fn(tok, pos):
    """Toy target at T = 1: the greedy_fn token with probability 0.6, the other 15 share 0.4."""
    nxt = (3 * tok + pos + 1) % SV
    probs = torch.full((*nxt.shape, SV), 0.4 / (SV - 1)).scatter(-1, nxt[..., None], 0.6)
    return probs.log()


@pytest.mark.parametrize("K", [1, 3])
def test_mode_acceptance_bounds_a_top1_drafter(K):
    """Every position of the toy target has mode probability 0.6, so the report's mode
    acceptance is 0.6 exactly; an oracle head (the target's top token) is accepted about that
    often, a head that always drafts a 0.027 token far less. Greedy and rejection: not tracked."""
    prompts = [[1, 2, 3], [5], [7, 7, 2, 9], [4, 4], [11, 3], [6, 1, 8]]
    rates = {}
    for name, fn in (("oracle", greedy_fn), ("wrong", draft_fn(lambda s: s >= 0))):
        torch.manual_seed(0)
        eng = Engine(StubTarget(peaked_fn), MTPDrafter(StubHead(fn, SV)), batch_size=len(prompts), max_len=64,
                     max_new_tokens=40, steps=K, sampling=SamplingParams(temperature=1.0))
        rows = eng.generate(prompts).rows
        hist = [sum(c) for c in zip(*(r.hist for r in rows))]
        mode = per_position_mode([sum(c) for c in zip(*(r.mode_accept for r in rows))], hist)
        assert mode[0] == pytest.approx(0.6, abs=1e-6)  # position 1 is reached by every step
        assert all(m is None or m == pytest.approx(0.6, abs=1e-6) for m in mode)
        rates[name] = acceptance_stats(hist)["per_position_acceptance"][0]
    assert rates["oracle"] == pytest.approx(0.6, abs=0.1) and rates["wrong"] < 0.15
    for sp, rule in ((SamplingParams(), VerifyRule()), (SamplingParams(temperature=1.0), VerifyRule("rejection"))):
        eng = Engine(StubTarget(peaked_fn), MTPDrafter(StubHead(greedy_fn, SV)), batch_size=2, max_len=64,
                     max_new_tokens=8, steps=K, sampling=sp, rule=rule)
        assert all(r.mode_accept == [] for r in eng.generate(prompts[:2]).rows)


# ------------------------------------------------------------------- stub-model loops
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("case", ["all", "none", "partial"])
def test_stub_loop_statistics(K, case):
    wrong = {"all": lambda s: s < 0, "none": lambda s: s >= 0, "partial": lambda s: s % 3 == 0}[case]
    prompts = [[1, 2, 3, 4, 5], [7], [3, 3, 9, 2, 2, 2, 8, 1], [4, 4]]
    max_new = 13
    _, spec, plain = run_stub(K, wrong, prompts, max_new)
    for p, s, r in zip(prompts, spec.rows, plain.rows):
        assert s.output_ids == r.output_ids and len(s.output_ids) == max_new
        assert s.hist == simulate(len(p), K, max_new, wrong)
    if case == "all":  # hand-written: 12 tokens after the prefill's first one, K+1 per step
        st = acceptance_stats(spec.rows[0].hist)
        assert st["acceptance_length"] == K + 1 and st["verify_steps"] == 12 // (K + 1)
        assert st["per_position_acceptance"] == [1.0] * K
    if case == "none":
        st = acceptance_stats(spec.rows[1].hist)
        assert st["acceptance_length"] == 1 and st["verify_steps"] == 12 and st["accept_histogram"][0] == 12
        assert st["per_position_acceptance_unconditional"] == [0.0] * K


def test_stub_loop_eos_and_padding_rows():
    """EOS inside an accepted block: the tokens after it are dropped, the row stops counting,
    the other rows go on; a batch smaller than the engine's is padded with finished rows."""
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9]]
    target, head = StubTarget(greedy_fn), StubHead(greedy_fn, SV)
    free = Engine(target, MTPDrafter(head), batch_size=3, max_len=64, max_new_tokens=20, steps=3)
    ref = free.generate(prompts, speculative=False).rows
    eos = ref[0].output_ids[2]  # mid-block of row 0's first verify step (outputs 1..4)
    assert eos not in ref[0].output_ids[:2]
    eng = Engine(target, MTPDrafter(head), batch_size=3, max_len=64, max_new_tokens=20, steps=3, eos_ids=[eos])
    spec, plain = eng.generate(prompts), eng.generate(prompts, speculative=False)
    assert [r.output_ids for r in spec.rows] == [r.output_ids for r in plain.rows]
    assert spec.rows[0].output_ids == ref[0].output_ids[:3] and spec.rows[0].hist == [0, 0, 0, 1]
    cut = ref[1].output_ids.index(eos) + 1 if eos in ref[1].output_ids else 20
    assert len(spec.rows[1].output_ids) == cut


# ---------------------------------------------------------- tiny Qwen3-MoE, lossless
@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model


def plain_outputs(model, prompts, max_new, eos_ids=()):
    tlm = TargetLM(model)
    eng = Engine(tlm, None, batch_size=len(prompts), max_len=64, max_new_tokens=max_new, eos_ids=eos_ids)
    return [r.output_ids for r in eng.generate(prompts, speculative=False).rows]


class OracleHead(StubHead):
    """Drafts exactly the reference continuation of each row (so blocks are fully accepted)."""

    def __init__(self, ref_rows):
        width = max(len(r) for r in ref_rows) + 8
        self.ref = torch.tensor([r + [0] * (width - len(r)) for r in ref_rows])
        self.vocab_size = V

    def forward(self, tokens_BT, hidden_BTH, positions_BT, prefill=False):
        rows = torch.arange(tokens_BT.shape[0])[:, None].expand_as(tokens_BT)
        return pack(rows, positions_BT + 1)

    def logits(self, hidden):
        row, pos = unpack(hidden)
        nxt = self.ref[row, (pos + 1).clamp(max=self.ref.shape[1] - 1)]
        return torch.nn.functional.one_hot(nxt, V).float()


def test_our_greedy_equals_transformers_generate(tiny):
    cfg, model, prompts = tiny
    ours = plain_outputs(model, prompts[:2], 10)
    for p, o in zip(prompts[:2], ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert ref[0, len(p):].tolist() == o


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("init", ["random", "last_layer"])
def test_greedy_speculative_is_lossless(tiny, K, init):
    cfg, model, prompts = tiny
    max_new = 16
    head = MTPHead(cfg)
    if init == "random":
        head.init_random(seed=1)
    else:
        head.init_from_target_layer(model.model.layers[-1], seed=1)
    ref = plain_outputs(model, prompts, max_new)
    eos = ref[1][5]  # a token greedy decoding emits: some rows stop early
    ref_eos = plain_outputs(model, prompts, max_new, eos_ids=[eos])
    assert any(len(r) < max_new for r in ref_eos)
    tlm = TargetLM(model)
    eng = Engine(tlm, MTPDrafter(MTPHeadLM(head, tlm)), batch_size=4, max_len=48, max_new_tokens=max_new,
                 steps=K, eos_ids=[eos])
    out = eng.generate(prompts[:4]).rows + eng.generate(prompts[4:]).rows  # 2nd batch: 3 padding rows
    assert [r.output_ids for r in out] == ref_eos
    for r in out:
        assert sum((n + 1) * c for n, c in enumerate(r.hist)) >= len(r.output_ids) - 1


@pytest.mark.parametrize("K", [1, 3])
def test_oracle_blocks_accepted_across_eos(tiny, K):
    cfg, model, prompts = tiny
    max_new = 20
    ref = plain_outputs(model, prompts, max_new)
    # an EOS strictly inside an accepted block: output index m with m % (K+1) != 0
    row, m = next((b, m) for b, r in enumerate(ref) for m in range(2, max_new - 1)
                  if m % (K + 1) != 0 and r[m] not in r[:m])
    eos = ref[row][m]
    ref_eos = plain_outputs(model, prompts, max_new, eos_ids=[eos])
    assert len(ref_eos[row]) == m + 1
    oracle = OracleHead([p + r for p, r in zip(prompts, ref)])
    eng = Engine(TargetLM(model), MTPDrafter(oracle), batch_size=len(prompts), max_len=48,
                 max_new_tokens=max_new, steps=K, eos_ids=[eos])
    out = eng.generate(prompts).rows
    assert [r.output_ids for r in out] == ref_eos
    for r in out:  # every verify step accepted all K drafts
        assert r.hist[:K] == [0] * K and r.hist[K] >= 1


def test_evaluate_report_on_tiny(tiny):
    cfg, model, prompts = tiny
    head = MTPHead(cfg)
    head.init_from_target_layer(model.model.layers[-1], seed=1)
    rows = [{"prompt_ids": p, "category": "ab"[i % 2], "id": f"q{i}"} for i, p in enumerate(prompts)]
    rep = evaluate(model, head, None, rows, EvalSettings(steps=2, batch_size=2, max_new_tokens=6), eos_ids=[],
                   progress=False)
    assert rep["lossless"] is True and rep["lossless_mismatches"] == 0
    assert rep["generated_tokens"] == 5 * 6 and rep["num_prompts"] == 5
    assert sum(rep["accept_histogram"]) == rep["verify_steps"] == sum(r["verify_steps"] for r in rep["per_prompt"])
    assert set(rep["per_category"]) == {"a", "b"} and [r["id"] for r in rep["per_prompt"]] == [r["id"] for r in rows]
    with pytest.raises(ValueError, match="max-len"):
        evaluate(model, head, None, rows, EvalSettings(steps=2, max_new_tokens=6, max_len=12), progress=False)
    with pytest.raises(ValueError, match="steps"):
        evaluate(model, head, None, rows, EvalSettings(steps=0), progress=False)


def test_ngram_drafter(tiny):
    cfg, model, prompts = tiny
    # a looping stub target: the n-gram drafter must lock on and get every draft accepted
    period = lambda tok, pos: 10.0 * torch.nn.functional.one_hot((tok + 1) % 4, SV).float()  # noqa: E731
    eng = Engine(StubTarget(period), NGramDrafter(), batch_size=2, max_len=64, max_new_tokens=30, steps=3)
    out = eng.generate([[0, 1, 2, 3, 0], [2]])
    assert out.rows[0].output_ids == [(1 + i) % 4 for i in range(30)]
    assert out.rows[0].hist[0] == 0 and out.rows[0].hist[3] >= 6
    # lossless on the real tiny model, K=3
    ref = plain_outputs(model, prompts, 12)
    eng = Engine(TargetLM(model), NGramDrafter(), batch_size=5, max_len=40, max_new_tokens=12, steps=3)
    assert [r.output_ids for r in eng.generate(prompts).rows] == ref


# ------------------------------------------------------------ speculative sampling
@pytest.mark.parametrize("rule", ["target_only", "rejection"])
@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=5, top_p=0.9)],
                         ids=["plain", "filtered"])
def test_speculative_sampling_matches_target_distribution(rule, sp):
    """Toy vocabulary of 8, context = (token, position): the joint law of output tokens 1 and 2
    (both from the first verify step, K=3) must be the target's filtered one, not the draft's,
    under either verification rule."""
    gen = torch.Generator().manual_seed(0)
    Vt, P = 8, 8
    t_logits = 2.0 * torch.randn(Vt, P, Vt, generator=gen)
    d_logits = 2.0 * torch.randn(Vt, P, Vt, generator=gen)
    target = StubTarget(lambda tok, pos: t_logits[tok, pos % P])
    head = StubHead(lambda tok, pos: d_logits[tok, pos % P], Vt)
    N = 20_000
    torch.manual_seed(0)
    eng = Engine(target, MTPDrafter(head), batch_size=N, max_len=16, max_new_tokens=4, steps=3, sampling=sp,
                 rule=VerifyRule(rule))
    out = torch.tensor([r.output_ids for r in eng.generate([[0]] * N).rows])  # [N, 4]
    emp = torch.zeros(Vt, Vt)
    emp.index_put_((out[:, 1], out[:, 2]), torch.ones(N), accumulate=True)
    emp /= N

    def exact(table):  # P(out1, out2) for prompt [0]: out0 at pos 1, out1 at pos 2, out2 at pos 3
        p0 = sampler_probs(t_logits[0, 0], sp)  # the prefill's token comes from the target's sampler
        p0 = p0 / p0.sum()
        joint = torch.zeros(Vt, Vt)
        for a in range(Vt):
            pa = filtered_probs(table[a, 1], sp)
            for b in range(Vt):
                joint[b] += p0[a] * pa[b] * filtered_probs(table[b, 2], sp)
        return joint

    tv_target = 0.5 * (emp - exact(t_logits)).abs().sum().item()
    tv_draft = 0.5 * (emp - exact(d_logits)).abs().sum().item()
    assert tv_target < 0.04, tv_target
    assert tv_draft > 0.15, tv_draft  # the bound can fail: sampling the draft's law would
    # and acceptance is neither all nor nothing
    hist = torch.tensor([r.hist for r in eng.generate([[0]] * N).rows]).sum(0)
    assert hist[0] > 0 and hist[1:].sum() > 0


# ---------------------------------------------------- our forward vs transformers
@pytest.mark.parametrize("experts", ["loop", "gather", "grouped_mm"])
def test_forward_matches_transformers_and_cache_rollback(tiny, experts):
    cfg, model, _ = tiny
    torch.manual_seed(1)
    B, T = 3, 12
    toks = torch.randint(0, V, (B, T))
    with torch.no_grad():
        ref = model(toks).logits
        tlm = TargetLM(model, experts=experts)
        tlm.allocate(B, 32)
        pos = torch.arange(T).expand(B, T)
        full = tlm.logits(tlm.forward(toks, pos, prefill=True))
        torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
        # incremental with per-row lengths: prefill 4, rows then advance differently
        tlm.allocate(B, 32)
        tlm.forward(toks[:, :4], pos[:, :4], prefill=True)
        step = tlm.logits(tlm.forward(toks[:, 4:7], pos[:, 4:7]))  # 3 tokens at once
        torch.testing.assert_close(step, ref[:, 4:7], atol=1e-4, rtol=1e-4)
        # garbage at positions 7..9, then roll back to 7 (just reuse the positions)
        tlm.forward(torch.randint(0, V, (B, 3)), pos[:, 7:10])
        for t in range(7, T):
            one = tlm.logits(tlm.forward(toks[:, t:t + 1], pos[:, t:t + 1]))
            torch.testing.assert_close(one[:, 0], ref[:, t], atol=1e-4, rtol=1e-4)
        # rows at different positions in one call: row b is fed position 5 + b
        tlm.allocate(B, 32)
        tlm.forward(toks[:, :8], pos[:, :8], prefill=True)
        p = torch.tensor([[5], [6], [7]])
        mixed = tlm.logits(tlm.forward(toks.gather(1, p), p))[:, 0]
        torch.testing.assert_close(mixed, ref[torch.arange(B), p[:, 0]], atol=1e-4, rtol=1e-4)


def test_head_path_matches_mtp_head(tiny):
    cfg, model, _ = tiny
    head = MTPHead(cfg)
    head.init_random(seed=3, std=0.1)
    tlm = TargetLM(model)
    hl = MTPHeadLM(head, tlm)
    B, T = 2, 9
    toks = torch.randint(0, V, (B, T))
    hid = torch.randn(B, T, cfg.hidden_size)
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        ref = head(model.model.embed_tokens(toks), hid, pos)
        hl.allocate(B, 16)
        torch.testing.assert_close(hl.forward(toks, hid, pos, prefill=True), ref, atol=1e-5, rtol=1e-5)
        hl.allocate(B, 16)
        a = hl.forward(toks[:, :5], hid[:, :5], pos[:, :5], prefill=True)
        hl.forward(toks[:, 5:7].flip(0), hid[:, 5:7] * 3, pos[:, 5:7])  # rejected drafts, overwritten
        b = hl.forward(toks[:, 5:], hid[:, 5:], pos[:, 5:])
        torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=1e-5, rtol=1e-5)


def test_target_only_accepts_no_more_than_rejection_sampling_here(tiny):
    """The tiny random target and a random head are both high-entropy: on the same seeds p/q
    rejection sampling of sampled drafts accepts almost everything, SGLang's target-only rule
    (top-1 drafts, accepted with probability p(d)) almost nothing. (Not a theorem: a sure target
    and an unsure head can reverse it; model/acceptance.py.)"""
    cfg, model, prompts = tiny
    head = MTPHead(cfg)
    head.init_random(seed=3)
    for seed in (0, 1, 2):
        al = {}
        for kind in VERIFY_RULES:
            s = EvalSettings(steps=2, sampling=SamplingParams(temperature=1.0), verify=VerifyRule(kind), batch_size=5,
                             max_new_tokens=10, seed=seed, baseline=False)
            rep = evaluate(model, head, None, prompts, s, eos_ids=[], progress=False)
            al[kind] = rep["acceptance_length"]
            mode = rep["per_position_mode_acceptance"]  # tracked for the target-only rule only
            assert (mode is None) == (kind == "rejection") and (mode is None or len(mode) == 2)
        assert al["target_only"] <= al["rejection"], (seed, al)


# ------------------------------------------------------------------ on a GPU (skipped on CPU)
@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_gpu_sampling_rules_run_in_cuda_graphs(kernels):
    """bf16 on CUDA with CUDA graphs: greedy speculative output equals plain output, and both
    verification rules run with top-k/top-p filters inside the captured step."""
    from model.configs import build_random_target

    device = torch.device("cuda")
    model = build_random_target("small", seed=0).to(device=device, dtype=torch.bfloat16).eval()
    head = MTPHead(model.config)
    head.init_random(seed=1)
    head.to(device=device, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151643, (n,), generator=gen).tolist() for n in (17, 40, 5, 64)]
    base = dict(steps=3, batch_size=4, max_new_tokens=24, kernels=kernels)
    rep = evaluate(model, head, None, prompts, EvalSettings(**base), eos_ids=[], progress=False)
    assert rep["lossless"] is True, rep["lossless_mismatches"]
    sp = SamplingParams(temperature=0.7, top_p=0.8, top_k=20)
    for kind in VERIFY_RULES:
        rep = evaluate(model, head, None, prompts, EvalSettings(sampling=sp, verify=VerifyRule(kind), **base),
                       eos_ids=[], progress=False)
        assert 1.0 <= rep["acceptance_length"] <= 4.0 and rep["generated_tokens"] == 4 * 24


# ------------------------------------------------------------- replayed acceptance (training's held-out figure)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("pattern", [lambda i: i % 3 == 0, lambda i: (i % 5 == 1) | (i % 5 == 2),
                                     lambda i: (i * 7) % 11 < 4])
def test_replayed_acceptance_walks_the_text_as_the_engine_does(K, pattern):
    """Teacher-forced hits of the stub head (a draft of index i is wrong iff pattern(i), at any
    depth), replayed over prompt + answer: the same verify steps as the engine's own run, every
    answer token after the first emitted once, and the engine's histogram outside its last step."""
    from model.loss import replayed_acceptance

    prompts = [[1, 2, 3, 4, 5], [7], [3, 3, 9, 2, 2, 2, 8, 1]]
    max_new = 17
    _, spec, _ = run_stub(K, pattern, prompts, max_new)
    for p, row in zip(prompts, spec.rows):
        ids = p + row.output_ids
        T = len(ids)
        mask = torch.zeros(1, T, dtype=torch.long)
        mask[0, len(p):] = 1
        # step j read at position q belongs to the chain anchored at q - j, which drafts index
        # (q - j) + 2 + j = q + 2 there; the stub is wrong at an index whatever the depth
        hits = [torch.tensor([[not pattern(q + 2) for q in range(T - 1)]]) for j in range(K)]
        emitted, steps = replayed_acceptance(hits, mask)
        assert steps == sum(row.hist) and emitted == max_new - 1
        # the engine counts its last step's drafts past max_new too; every other step agrees
        engine_emitted = sum((n + 1) * c for n, c in enumerate(row.hist))
        assert 0 <= engine_emitted - emitted <= K


def test_replayed_acceptance_by_hand():
    from model.loss import replayed_acceptance

    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1, 1, 1]])  # row 1: two spans
    hit = torch.tensor([[False, True, False, False, False, True, False],
                        [True, True, True, True, True, True, True]])
    # row 0, K=1: anchor 1 (x_2 is the target's), hit -> 2 tokens; anchor 3 miss -> 1; anchor 4 miss -> 1: 4 in 3
    # row 1: span x_1..x_2: anchor 0, one token left -> 1 in 1; span x_4..x_7: anchor 3, 2 + 1 -> 3 in 2
    assert replayed_acceptance([hit[:1]], mask[:1]) == (4, 3)
    assert replayed_acceptance([hit[1:]], mask[1:]) == (4, 3)
    assert replayed_acceptance([hit], mask) == (8, 6)
    every = torch.ones(1, 11, dtype=torch.bool)
    span = torch.tensor([[0, 0] + [1] * 9 + [0]])  # 9 answer tokens: 8 after the first, K+1 = 4 a step
    assert replayed_acceptance([every] * 3, span) == (8, 2)
