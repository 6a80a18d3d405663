"""Draft vocabularies (token maps, SGLang's --speculative-token-map): building, loading and
checking a map, and drafting among its ids as SGLang does (map[argmax of the map's logits])."""

import json

import pytest
import torch

from model.acceptance import SamplingParams, VerifyRule
from model.drafters import MTPDrafter, build_drafter
from model.engine import Engine, MTPHeadLM, TargetLM
from model.evaluate import EvalSettings, evaluate
from model.head import MTPHead
from model.token_map import coverage, frequent_tokens, load_token_map, save_token_map, token_map_info

from helpers import load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tiny_model):
    cfg, model, prompts = tiny_model
    head = MTPHead(cfg)
    head.init_from_target_layer(model.model.layers[-1], seed=1)
    return cfg, model, prompts, head


def test_frequent_tokens_orders_by_count_then_id_and_fills_with_unseen_ids():
    counts = torch.tensor([0, 5, 2, 5, 0, 9, 1])
    assert frequent_tokens(counts, 4).tolist() == [5, 1, 3, 2]  # 1 and 3 tie: the lower id first
    assert frequent_tokens(counts, 7).tolist() == [5, 1, 3, 2, 6, 0, 4]  # unseen 0 and 4 last, in id order
    assert coverage(counts, frequent_tokens(counts, 2)) == pytest.approx(14 / 22)
    for bad in (0, 8):
        with pytest.raises(ValueError, match="size"):
            frequent_tokens(counts, bad)


def test_assistant_token_counts_count_the_loss_mask_tokens_only():
    import datasets

    from data.chat import assistant_token_counts

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 3], [3, 4, 0]], "loss_mask": [[0, 1, 1, 0], [1, 1, 0]]})
    assert assistant_token_counts(ds, vocab_size=6).tolist() == [0, 0, 1, 2, 1, 0]


def test_load_token_map_reads_tensors_and_lists_and_refuses_bad_maps(tmp_path):
    save_token_map(torch.tensor([7, 3, 5], dtype=torch.int32), tmp_path / "ok.pt")
    ids = load_token_map(tmp_path / "ok.pt", vocab_size=10)
    assert ids.dtype == torch.long and ids.tolist() == [7, 3, 5]
    assert token_map_info(tmp_path / "ok.pt", ids)["size"] == 3
    torch.save([4, 2], tmp_path / "list.pt")  # FR-Spec style: a plain list
    assert load_token_map(tmp_path / "list.pt", vocab_size=10).tolist() == [4, 2]
    bad = {"range.pt": (torch.tensor([1, 10]), "outside the vocabulary"),
           "dupes.pt": (torch.tensor([1, 2, 1]), "repeats"),
           "empty.pt": (torch.tensor([], dtype=torch.long), "empty"),
           "float.pt": (torch.tensor([1.0, 2.0]), "1-D integer"),
           "matrix.pt": (torch.tensor([[1, 2]]), "1-D integer"),
           "dict.pt": ({"ids": [1, 2]}, "1-D integer")}
    for name, (obj, match) in bad.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=match):
            load_token_map(tmp_path / name, vocab_size=10)
    with pytest.raises(FileNotFoundError, match="build_token_map"):
        load_token_map(tmp_path / "nope.pt", vocab_size=10)


def test_draft_is_the_map_id_of_the_argmax_over_the_maps_logits(tiny):
    """SGLang: lm_head rows at the map's ids, top-1 over those logits, mapped back through the ids."""
    cfg, model, _, head = tiny
    tlm = TargetLM(model)
    ids = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(0))[:40]
    full, mapped = MTPDrafter(MTPHeadLM(head, tlm)), MTPDrafter(MTPHeadLM(head, tlm, token_map=ids))
    for d in (full, mapped):
        d.allocate(3, 16, 3, 0.0)
    h = torch.randn(3, cfg.hidden_size)
    logits = full.head.logits(h)
    expect = ids[logits[:, ids].argmax(-1)]
    got, q = mapped._draft(h)
    assert q is None and got.tolist() == expect.tolist()
    assert torch.equal(mapped.head.logits(h), logits[:, ids])  # the same numbers, on the map's rows
    # sampled drafts (the p/q rule): q lives on the whole vocabulary, zero outside the map
    mapped.allocate(3, 16, 3, 0.7)
    d, q = mapped._draft(h)
    outside = torch.ones(cfg.vocab_size, dtype=torch.bool)
    outside[ids] = False
    assert torch.isin(d, ids).all() and q.shape == (3, cfg.vocab_size)
    assert torch.allclose(q.sum(-1), torch.ones(3)) and q[:, outside].abs().max() == 0


def test_identity_map_changes_nothing_and_a_small_map_stays_lossless(tiny):
    cfg, model, prompts, head = tiny
    tlm = TargetLM(model)

    def run(token_map):
        eng = Engine(tlm, build_drafter("mtp", head, tlm, token_map=token_map), batch_size=len(prompts), max_len=48,
                     max_new_tokens=12, steps=3)
        out = eng.generate(prompts).rows
        return [r.output_ids for r in out], [r.hist for r in out]

    plain = Engine(tlm, None, batch_size=len(prompts), max_len=48, max_new_tokens=12)
    ref = [r.output_ids for r in plain.generate(prompts, speculative=False).rows]
    full_out, full_hist = run(None)
    same_out, same_hist = run(torch.arange(cfg.vocab_size))
    assert full_out == ref and same_out == full_out and same_hist == full_hist
    small_out, _ = run(torch.tensor(sorted({t for r in ref for t in r})[:3]))  # most right drafts impossible
    assert small_out == ref  # verification is the target's: a map limits drafts, never the output
    with pytest.raises(ValueError, match="token map"):
        build_drafter("ngram", None, tlm, token_map=torch.arange(4))


def test_evaluate_records_the_map_and_checks_it(tiny, tmp_path):
    cfg, model, prompts, head = tiny
    path = tmp_path / "map.pt"
    save_token_map(torch.arange(0, cfg.vocab_size, 2), path)
    s = EvalSettings(steps=2, batch_size=5, max_new_tokens=6, token_map=str(path))
    rep = evaluate(model, head, None, prompts, s, eos_ids=[], progress=False)
    assert rep["token_map"]["size"] == cfg.vocab_size // 2 and rep["token_map"]["path"] == str(path)
    assert len(rep["token_map"]["sha256"]) == 64 and rep["lossless"] is True
    assert evaluate(model, head, None, prompts, EvalSettings(steps=2, max_new_tokens=4), eos_ids=[],
                    progress=False)["token_map"] is None
    save_token_map(torch.tensor([0, cfg.vocab_size]), tmp_path / "big.pt")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        evaluate(model, head, None, prompts, EvalSettings(steps=2, token_map=str(tmp_path / "big.pt")),
                 eos_ids=[], progress=False)
    with pytest.raises(ValueError, match="drafter 'ngram'"):
        EvalSettings(drafter="ngram", token_map=str(path)).check()
    sp = SamplingParams(temperature=0.8)  # sampled drafts under the p/q rule take the map too
    rep = evaluate(model, head, None, prompts, EvalSettings(steps=2, max_new_tokens=6, sampling=sp, token_map=str(path),
                                                            verify=VerifyRule("rejection")), eos_ids=[], progress=False)
    assert rep["verify_steps"] > 0


def test_build_token_map_script_counts_assistant_tokens(tiny_target_dir, chat_jsonl, tmp_path, capsys):
    build = load_script("build_token_map")
    out = tmp_path / "hot.pt"
    assert build.main(["--target", str(tiny_target_dir), "--data", str(chat_jsonl), "--size", "500",
                       "--out", str(out), "--max-length", "512"]) == 0
    ids = load_token_map(out, vocab_size=151936)
    info = json.loads((tmp_path / "hot.pt.json").read_text())
    assert ids.numel() == 500 and info["size"] == 500 and 0.5 < info["coverage"] <= 1.0
    assert info["assistant_tokens"] > 1000 and info["rows"] > 0 and "covers" in capsys.readouterr().out
    im_end, im_start = 151645, 151644  # every assistant turn ends in <|im_end|>, a loss-mask token;
    assert im_end in ids.tolist() and im_start not in ids.tolist()  # <|im_start|> opens turns: never one
    assert build.main(["--target", str(tiny_target_dir), "--data", str(chat_jsonl), "--size", "200000",
                       "--out", str(tmp_path / "x.pt")]) == 1
    assert "vocabulary" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
    with pytest.raises(SystemExit):  # argparse: a map of no ids
        build.main(["--target", str(tiny_target_dir), "--data", str(chat_jsonl), "--size", "0", "--out", str(out)])
    assert "--size must be >= 1" in capsys.readouterr().err
