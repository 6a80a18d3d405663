"""scripts/regenerate_data.py on a tiny random target, make_demo_target.py --smoke, and the
diversity/loop metric (model/diversity.py). CPU, no downloads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT

from data.regenerate import regenerate
from model.diversity import diversity_stats, ends_in_loop, loop_period

SHAREGPT = {"id": "sg1", "source": "test", "conversations": [
    {"from": "system", "value": "  Be brief.  "},
    {"from": "human", "value": "Hi there!\n"},
    {"from": "gpt", "value": "old answer one"},
    {"from": "human", "value": "And again?"},
    {"from": "gpt", "value": "old answer two", "extra": 7},
]}
OPENAI = {"id": "oa1", "meta": {"k": [1, 2]}, "messages": [
    {"role": "user", "content": [{"type": "text", "text": "Tell me a joke."}]},
    {"role": "assistant", "content": "old joke", "reasoning_content": "think"},
]}
BAD = [
    '{"conversations": "not a list"}',  # wrong_type
    '{"nothing": 1}',  # missing_field
    '{"messages": [{"role": "user", "content": "only a question"}]}',  # no_assistant_turn
    "{not json",  # bad_json
]


def _regen(target_dir, tok, rows, **kw):
    args = dict(max_new_tokens=6, batch_size=2, max_len=256, device="cpu", tokenizer=tok, progress=False)
    args.update(kw)
    return regenerate(str(target_dir), rows, **args)


@pytest.fixture(scope="module")
def regenerated(tiny_target_dir, qwen3_tokenizer):
    raws = [json.dumps(SHAREGPT), json.dumps(OPENAI), *BAD]
    return _regen(tiny_target_dir, qwen3_tokenizer, raws)


def test_format_preserved_and_only_assistant_changed(regenerated):
    rows, report = regenerated
    assert len(rows) == 2
    sg, oa = rows
    # ShareGPT stays ShareGPT, extra fields kept
    assert set(sg) == set(SHAREGPT) and sg["id"] == "sg1" and sg["source"] == "test"
    assert len(sg["conversations"]) == 5
    for new, old in zip(sg["conversations"], SHAREGPT["conversations"]):
        assert set(new) == set(old)  # the assistant turn's extra key too
        if old["from"] == "gpt":
            assert isinstance(new["value"], str) and new["value"] != old["value"]
        else:
            assert new == old  # system/user turns untouched, whitespace included
    assert sg["conversations"][4]["extra"] == 7
    # OpenAI stays OpenAI; reasoning_content dropped (thinking is off), user turn untouched
    assert set(oa) == {"id", "meta", "messages"} and oa["meta"] == OPENAI["meta"]
    assert oa["messages"][0] == OPENAI["messages"][0]
    assert set(oa["messages"][1]) == {"role", "content"} and oa["messages"][1]["content"] != "old joke"
    assert report["turns_regenerated"] == 3


def test_bad_rows_reported(regenerated):
    _, report = regenerated
    assert report["rows"]["total"] == 6 and report["rows"]["kept"] == 2
    assert report["rows"]["skipped"] == {"bad_json": 1, "missing_field": 1, "no_assistant_turn": 1, "wrong_type": 1}


def test_deterministic_at_t0_and_cut_rules(tiny_target_dir, qwen3_tokenizer, regenerated):
    rows_again, _ = _regen(tiny_target_dir, qwen3_tokenizer, [json.dumps(SHAREGPT), json.dumps(OPENAI)])
    assert rows_again == regenerated[0]
    # --max-turns 1: the conversation ends after its first (regenerated) assistant turn
    rows, report = _regen(tiny_target_dir, qwen3_tokenizer, [json.dumps(SHAREGPT)], max_turns=1)
    assert [t["from"] for t in rows[0]["conversations"]] == ["system", "human", "gpt"]
    assert report["conversations_cut"] == {"max_turns": 1}
    # a first prompt that cannot fit is a skipped row (too_long)
    _, report = _regen(tiny_target_dir, qwen3_tokenizer, [json.dumps(SHAREGPT)], max_len=20)
    assert report["rows"]["skipped"] == {"too_long": 1}


def test_cli_writes_jsonl(tiny_target_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(SHAREGPT) + "\n" + json.dumps(OPENAI) + "\n")
    out = tmp_path / "out.jsonl"
    subprocess.run([sys.executable, "scripts/regenerate_data.py", "--target", str(tiny_target_dir), "--data", str(src),
                    "--out", str(out), "--max-new-tokens", "4", "--batch-size", "2", "--max-len", "256",
                    "--device", "cpu"], cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [("conversations" in r, "messages" in r) for r in rows] == [(True, False), (False, True)]
    assert not list(tmp_path.glob(".out.jsonl.tmp*"))  # the temp file was renamed away


def test_loop_metric():
    assert loop_period([5] * 40) == 1
    assert ends_in_loop(list(range(20)) + [1, 2, 3] * 11)  # period 3 over the last 32 tokens
    assert loop_period(list(range(8)) * 5) == 8
    assert not ends_in_loop(list(range(17)) * 2)  # period 17 > 16
    assert not ends_in_loop([1, 2] * 10)  # shorter than the 32-token window
    assert not ends_in_loop(list(range(100)))
    s = diversity_stats([[1, 2, 3, 4, 5, 9], [7] * 40 + [9]], eos_ids=[9])
    assert s["loops"] == 1 and s["loop_share"] == 0.5 and s["num_outputs"] == 2
    # 2-grams: 4 distinct of 4 in the first output, 1 distinct (7,7) of 39 in the second
    assert s["distinct_2"] == pytest.approx(5 / 43)
    assert s["distinct_2_mean"] == pytest.approx((1 + 1 / 39) / 2)


def test_make_demo_target_smoke(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "scripts/make_demo_target.py", "--out", str(out), "--smoke"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    info = json.loads((out / "demo_target.json").read_text())
    assert info["tokens_trained"] > 0 and info["heldout_loss"] > 0 and info["params"] > 0
    assert 0 <= info["diversity"]["loop_share"] <= 1 and info["diversity"]["num_outputs"] == 2
    assert (out / "heldout.jsonl").read_text().count("\n") == 4
    from model.target import FrozenTarget

    target = FrozenTarget.load(str(out))
    assert target.config.model_type == "qwen3_moe" and target.config.num_experts == 8
    from data.tokenizer import load_tokenizer

    assert load_tokenizer(str(out)).convert_tokens_to_ids("<|im_end|>") == 151645


def test_thinking_answers_are_split_and_kept():
    """A thinking answer splits at </think> as SGLang's qwen3 reasoning parser splits it; the
    row keeps the reasoning as reasoning_content, and later prompts carry it for the template."""
    from data.regenerate import output_row, plan_row, prompt_messages, split_reasoning

    assert split_reasoning("<think>\nstep 1\n</think>\n\nThe answer.") == ("step 1", "\n\nThe answer.")
    assert split_reasoning("no tags here") == (None, "no tags here")
    conv = plan_row(0, SHAREGPT, max_turns=None)
    first = conv.assistant_at[0]
    conv.new_text[first], conv.new_reasoning[first] = "\n\nnew one", "why"
    conv.done = 1
    assert prompt_messages(conv)[-2] == {"role": "assistant", "content": "\n\nnew one", "reasoning_content": "why"}
    conv.cut = "max_turns"
    row = output_row(conv)
    assert row["conversations"][2] == {"from": "gpt", "value": "\n\nnew one", "reasoning_content": "why"}


def test_sampling_and_thinking_settings_reach_the_engine(tiny_target_dir, qwen3_tokenizer, regenerated):
    from model.acceptance import SamplingParams

    raws = [json.dumps(SHAREGPT), json.dumps(OPENAI)]
    sp = SamplingParams(temperature=0.8, top_k=5)
    a, report = _regen(tiny_target_dir, qwen3_tokenizer, raws, sampling=sp, seed=1)
    b, _ = _regen(tiny_target_dir, qwen3_tokenizer, raws, sampling=sp, seed=1)
    assert a == b and a != regenerated[0]  # seeded sampling: reproducible, and not the greedy answers
    assert report["settings"]["sampling"] == sp.as_dict() and report["settings"]["thinking"] is None
    off, report = _regen(tiny_target_dir, qwen3_tokenizer, raws, thinking=False)
    assert off != regenerated[0] and report["settings"]["thinking"] is False  # another prompt, other answers
