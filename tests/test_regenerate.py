"""scripts/regenerate_data.py on a tiny random target (the built-in engine path; the server path
is tests/test_regenerate_server.py): rows, resuming, safe outputs, errors; make_demo_target.py
--smoke, and the diversity/loop metric (model/diversity.py). CPU, no downloads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT

from data.regenerate import EngineBackend, RegenSettings, regenerate, regenerate_to_file
from model.diversity import diversity_stats, ends_in_loop, loop_period

pytestmark = pytest.mark.usefixtures("one_thread")

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
ONE_TURN = {"id": "oa2", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Why?\n"},
                                      {"role": "assistant", "content": "because"}]}


def chat(i: int) -> dict:
    """A two-turn OpenAI row whose first prompt grows with i."""
    return {"id": f"c{i}", "messages": [{"role": "user", "content": f"Question {i}?" + " more" * i},
                                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "Again?"},
                                        {"role": "assistant", "content": "b"}]}


BAD = [
    '{"conversations": "not a list"}',  # wrong_type
    '{"nothing": 1}',  # missing_field
    '{"messages": [{"role": "user", "content": "only a question"}]}',  # no_assistant_turn
    "{not json",  # bad_json
]


# chunks of 3 rows: [SHAREGPT, OPENAI, bad] [ONE_TURN, c0, c1] [c2, c3, bad]; batches of 2
ROWS = [json.dumps(SHAREGPT), json.dumps(OPENAI), BAD[0], json.dumps(ONE_TURN), *(json.dumps(chat(i)) for i in range(4)),
        BAD[3]]
SETTINGS = RegenSettings(max_new_tokens=6, max_len=256, thinking=False)
MAX_LEN = 256


def to_file(target_dir, tok, out, rows=ROWS, settings=SETTINGS, **kw):
    """The built-in engine path into a file, batches of 2, chunks of 3 rows, the state saved at every row."""
    args = dict(force=False, progress=False, state_every_s=0)
    args.update(kw)
    return regenerate_to_file(EngineBackend(target_dir, "cpu", 2, 3), tok, rows, settings, out, **args)


@pytest.fixture(scope="module")
def uninterrupted(tiny_target_dir, qwen3_tokenizer, tmp_path_factory):
    """(bytes of the output, report) of an uninterrupted run over ROWS."""
    out = tmp_path_factory.mktemp("regen") / "full.jsonl"
    report = to_file(tiny_target_dir, qwen3_tokenizer, out)
    return out.read_bytes(), report


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
    from helpers import run

    cmd = [sys.executable, "scripts/regenerate_data.py", "--target", str(tiny_target_dir), "--data", str(src),
           "--out", str(out), "--max-new-tokens", "4", "--batch-size", "2", "--max-len", "256", "--device", "cpu"]
    p = run(cmd)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [("conversations" in r, "messages" in r) for r in rows] == [(True, False), (False, True)]
    assert not list(tmp_path.glob(".out.jsonl.tmp*"))  # the partial file was renamed to --out
    assert json.loads((tmp_path / "out.jsonl.regen-state").read_text())["complete"]
    assert "row/s" in p.stderr and "tok/s" in p.stderr  # the progress bar
    assert "kept 2 of 2 rows" in p.stdout
    again = run(cmd)  # the same command again: the run is complete, nothing is done
    assert "already complete" in again.stdout and out.read_text().count("\n") == 2


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
    # the 5-token output is too short for the loop test: counted, so a target that stops early shows
    assert s["short_outputs"] == 1 and s["mean_output_tokens"] == 22.5 and s["median_output_tokens"] == 40


def test_make_demo_target_smoke(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "scripts/make_demo_target.py", "--out", str(out), "--smoke",
                           "--unlikelihood", "0.5", "--unlikelihood-window", "16", "--seq-unlikelihood-s", "1"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    info = json.loads((out / "demo_target.json").read_text())
    assert info["tokens_trained"] > 0 and info["heldout_loss"] > 0 and info["params"] > 0
    assert info["recipe"]["unlikelihood"] == 0.5 and info["recipe"]["unlikelihood_window"] == 16
    assert info["train_unlikelihood_last20"] > 0 and "unlikelihood" in proc.stdout
    seq = info["recipe"]["seq_unlikelihood"]
    assert seq["updates"] >= 1 and seq["generated_tokens"] > 0 and "sequence unlikelihood round 1" in proc.stdout
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


# ------------------------------------------------------------------------------ output, resume
def test_file_output_has_the_rows_in_input_order(uninterrupted, tiny_target_dir, qwen3_tokenizer):
    data, report = uninterrupted
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert [r["id"] for r in rows] == ["sg1", "oa1", "oa2", "c0", "c1", "c2", "c3"]
    assert report["rows"]["total"] == 9 and report["rows"]["skipped"] == {"bad_json": 1, "wrong_type": 1}
    # the in-memory API, with the same chunks, gives the same rows
    same, _ = _regen(tiny_target_dir, qwen3_tokenizer, ROWS, thinking=False, chunk_rows=3)
    assert same == rows


def test_a_stopped_run_resumes_and_equals_an_uninterrupted_run(tiny_target_dir, qwen3_tokenizer, uninterrupted,
                                                               tmp_path, monkeypatch):
    """Stopped in the middle of chunk 2 (its one-turn row written, its two-turn rows not): the
    rerun makes that chunk again whole (the same batches), writes only the rows not written,
    skips the finished chunk, and the file equals an uninterrupted run's byte for byte."""
    from data.regen_output import partial_path, state_path
    from model.engine import Engine

    calls = []
    real = Engine.generate

    def generate(self, prompts, speculative=True):
        calls.append(len(prompts))
        if stop_at and len(calls) == stop_at:
            raise KeyboardInterrupt  # as Ctrl-C would
        return real(self, prompts, speculative)

    monkeypatch.setattr(Engine, "generate", generate)
    out = tmp_path / "out.jsonl"
    # generate calls: chunk 1 rounds 1, 2; chunk 2 round 1 (3 prompts: 2 calls), round 2 (2 prompts: call 5)
    stop_at = 5
    with pytest.raises(KeyboardInterrupt):
        to_file(tiny_target_dir, qwen3_tokenizer, out)
    state = json.loads(state_path(out).read_text())
    assert state["rows_done"] == 4 and not state["complete"] and not out.exists()
    assert partial_path(out).read_text().count("\n") == 3  # sg1, oa1, oa2
    # a row cut off by a kill after the last state: cut away on resume
    with open(partial_path(out), "ab") as f:
        f.write(b'{"id": "c0", "messa')
    calls.clear()
    stop_at = None
    report = to_file(tiny_target_dir, qwen3_tokenizer, out)
    assert out.read_bytes() == uninterrupted[0]
    assert report["resumed_from_row"] == 4 and report["rows"] == uninterrupted[1]["rows"]
    assert report["turns_regenerated"] == uninterrupted[1]["turns_regenerated"]
    assert calls == [2, 1, 2, 2, 2]  # chunk 2 again (3 batches), chunk 3 (2); chunk 1 not


def test_a_rerun_with_other_settings_is_refused_unless_force(tiny_target_dir, qwen3_tokenizer, uninterrupted,
                                                            tmp_path, monkeypatch):
    from dataclasses import replace

    out = tmp_path / "out.jsonl"
    rows = ROWS[:3]
    to_file(tiny_target_dir, qwen3_tokenizer, out, rows)
    first = out.read_bytes()
    for other, key in [(replace(SETTINGS, max_new_tokens=5), "max_new_tokens: 6 then, 5 now"),
                       (replace(SETTINGS, thinking=None), "thinking: false then, null now")]:
        with pytest.raises(ValueError, match=key):
            to_file(tiny_target_dir, qwen3_tokenizer, out, rows, other)
    with pytest.raises(ValueError, match="data.sha256"):  # other input rows
        to_file(tiny_target_dir, qwen3_tokenizer, out, ROWS[:2])
    with pytest.raises(ValueError, match="backend.batch_size: 2 then, 1 now"):
        regenerate_to_file(EngineBackend(tiny_target_dir, "cpu", 1, 3), qwen3_tokenizer, rows, SETTINGS, out,
                           progress=False)
    assert out.read_bytes() == first
    # the same settings again: nothing to do (the engine is not even started)
    monkeypatch.setattr(EngineBackend, "rows", lambda *a, **k: pytest.fail("regenerated a complete run"))
    assert to_file(tiny_target_dir, qwen3_tokenizer, out, rows)["already_complete"]
    monkeypatch.undo()
    report = to_file(tiny_target_dir, qwen3_tokenizer, out, rows, replace(SETTINGS, max_new_tokens=5), force=True)
    assert report["settings"]["max_new_tokens"] == 5 and out.read_bytes() != first


def test_outputs_never_replace_what_the_run_did_not_make(tmp_path):
    from data.regen_output import RegenOutput, check_out_path, partial_path, state_path

    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps(SHAREGPT) + "\n")
    with pytest.raises(ValueError, match="is the --data source"):
        check_out_path(src, str(src))
    with pytest.raises(ValueError, match="is inside the --data source"):
        check_out_path(tmp_path / "sub" / "regen.jsonl", str(tmp_path))
    with pytest.raises(ValueError, match="is a directory"):
        check_out_path(tmp_path, "elsewhere.jsonl")
    check_out_path(tmp_path / "regen.jsonl", str(src))  # a sibling is fine
    settings = {"a": 1}
    with pytest.raises(ValueError, match="exists and is not the output of this regeneration"):
        RegenOutput.open(src, settings)
    # with force the run goes on, and the existing file stays until the new one is complete
    output = RegenOutput.open(src, settings, force=True)
    assert src.read_text() == json.dumps(SHAREGPT) + "\n" and partial_path(src).exists()
    with pytest.raises(ValueError, match="another regeneration is writing"):  # one writer at a time
        RegenOutput.open(src, settings)
    output.close()
    again = RegenOutput.open(src, settings)  # the lock went with the first writer: this run continues
    assert again.rows_done == 0 and not again.complete
    again.close()
    partial_path(src).write_bytes(b"")
    state = json.loads(state_path(src).read_text())
    state_path(src).write_text(json.dumps({**state, "bytes": 10}))  # the state counts rows the file lacks
    with pytest.raises(ValueError, match="fewer than the 10 its state"):
        RegenOutput.open(src, settings)
    state_path(src).write_text("{not json")
    with pytest.raises(ValueError, match="not a regeneration state file"):
        RegenOutput.open(src, settings)


def test_no_surviving_row_is_an_error_and_writes_nothing(tiny_target_dir, qwen3_tokenizer, tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"no row survived .*kept 0 of 4 rows; skipped: bad_json=1, missing_field=1"):
        to_file(tiny_target_dir, qwen3_tokenizer, out, BAD)
    assert list(tmp_path.iterdir()) == []


def test_bad_utf8_rows_are_counted_and_regeneration_goes_on(tiny_target_dir, tmp_path, capsys):
    from helpers import load_script

    src = tmp_path / "in.jsonl"
    src.write_bytes(json.dumps(OPENAI).encode() + b"\n" + b'{"messages": "caf\xe9"}\n' + json.dumps(ONE_TURN).encode() + b"\n")
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert load_script("regenerate_data").main(
        ["--target", str(tiny_target_dir), "--data", str(src), "--out", str(out), "--max-new-tokens", "4",
         "--max-len", str(MAX_LEN), "--device", "cpu", "--no-progress", "--report", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert rows["kept"] == 2 and rows["skipped"] == {"bad_encoding": 1} and rows["where"] == {"bad_encoding": [f"{src}:2"]}
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["oa1", "oa2"]


def test_user_errors_are_one_line(tiny_target_dir, tmp_path, capsys, monkeypatch):
    from helpers import load_script

    script = load_script("regenerate_data")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(SHAREGPT) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(BAD) + "\n")
    base = ["--target", str(tiny_target_dir), "--max-new-tokens", "4", "--max-len", str(MAX_LEN), "--no-progress"]
    cases = [  # (arguments, the error line's start, found before the target loads)
        (["--data", str(src), "--out", str(src)], f"error: --out '{src}' is the --data source", True),
        (["--data", str(tmp_path), "--out", str(tmp_path / "o.jsonl")], "error: --out", True),
        (["--data", str(src), "--out", str(tmp_path / "o.jsonl"), "--target", str(tmp_path / "nope")], "error: --target", True),
        (["--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")], "error: ", True),
        (["--data", str(src), "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "0"], "error: --max-new-tokens", True),
        (["--data", str(src), "--out", str(tmp_path / "o.jsonl"), "--server", "http://127.0.0.1:9", "--attempts", "1"],
         "error: http://127.0.0.1:9/v1/models: no answer after 1 attempts", True),
        (["--data", str(bad), "--out", str(tmp_path / "o.jsonl"), "--device", "cpu"], "error: no row survived", False),
    ]
    monkeypatch.delenv("MTP_DEBUG", raising=False)
    for extra, start, early in cases:
        assert script.main(base + extra) == 1, extra
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith(start) and "Traceback" not in err, err
        assert ("Loading weights" not in err) == early, err
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(SystemExit) as exit_:  # a flag of the other path: argparse's usage error
        script.main(base + ["--data", str(src), "--out", str(tmp_path / "o.jsonl"), "--server", "http://x", "--batch-size", "2"])
    assert exit_.value.code == 2 and "--batch-size applies to the built-in engine" in capsys.readouterr().err
    monkeypatch.setenv("MTP_DEBUG", "1")  # the traceback on request
    with pytest.raises(ValueError, match="is the --data source"):
        script.main(base + ["--data", str(src), "--out", str(src)])
    monkeypatch.delenv("MTP_DEBUG")
    with pytest.raises(ValueError, match="is the --data source"):
        script.main(base + ["--data", str(src), "--out", str(src), "--debug"])
