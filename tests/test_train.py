"""The training entry point end to end on CPU: outputs, ZeRO-2/ZeRO-3 with 2 processes,
kill-and-resume, fine-tuning from an export, and clear errors.

Every run is a subprocess (`python train/train_mtp.py` or `accelerate launch`), exactly as a user
runs it; the tiny target and 24 real ShareGPT chats come from fixtures in conftest.py.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import LAUNCH, ROOT, TRAIN, base_overrides, env, metrics, run, train_records
from train.common import MetricsWriter


def mean(xs):
    return sum(xs) / len(xs)


def test_single_process_run_writes_metrics_checkpoints_and_final(tiny_target_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{"train.save_every": 3, "data.holdout": 4,
                                                                     "train.profile_step": 2}))
    recs = train_records(out)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs:
        for key in ("step", "loss", "acc", "simulated_acceptance_length", "lr", "tokens_per_s", "data_wait_frac"):
            assert key in r, key
        assert len(r["acc"]) == 2 and r["simulated_acceptance_length"] >= 1.0 and r["tokens_per_s"] > 0
        assert 0.0 <= r["data_wait_frac"] < 1.0
    # train.profile_step=2: a profile table of optimizer steps 2..4
    profile = (out / "profile-step2.txt").read_text()
    assert profile.startswith("# optimizer steps 2..4:") and "self_cpu_time_total" in profile
    assert "GPU timeline:" in profile and (out / "profile-step2.json.gz").exists()  # the trace beside it
    # keep_checkpoints=2 of checkpoint-3, checkpoint-6; no temporary dirs left behind
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not list(out.glob(".tmp-*"))
    ck = out / "checkpoint-6"
    assert (ck / "head.safetensors").exists() and (ck / "config.yaml").exists()
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["batch_in_epoch"] > 0
    final = out / "final"
    cfg = (final / "config.yaml").read_text()
    assert str(tiny_target_dir) in cfg
    weights = load_file(final / "head.safetensors")
    assert "fc.weight" in weights and not any("lm_head" in k or "embed_tokens" in k for k in weights)
    summary = json.loads((final / "metrics.json").read_text())
    assert "heldout_simulated_acceptance_length" in summary


def test_heldout_every_writes_a_training_curve(tiny_target_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{
        "train.heldout_every": 3, "data.holdout": 4, "train.log_every": 4}))
    recs = metrics(out)
    held = [r for r in recs if r.get("kind") == "heldout"]
    # steps 3 and 6 periodically, 8 (the last) by the final evaluation only
    assert [r["step"] for r in held] == [3, 6, 8]
    train = {r["step"]: r for r in train_records(out)}
    for r in held:
        assert {"heldout_loss", "heldout_acc", "heldout_simulated_acceptance_length", "heldout_rows"} <= set(r)
        assert 1.0 <= r["heldout_replayed_acceptance_length"] <= 3.0  # K = 2: at most K + 1 a step
        assert r["heldout_rows"] == 4 and len(r["heldout_acc"]) == 2
        # a held-out step closes the logging window: tokens_seen is the training record's of that step
        assert r["tokens_seen"] == train[r["step"]]["tokens_seen"] > 0
    assert sorted(train) == [3, 4, 6, 8]
    assert held[-1]["heldout_loss"] == json.loads((out / "final" / "metrics.json").read_text())["heldout_loss"]


def test_resume_keeps_heldout_records_up_to_its_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 1, "loss": 1.0}, {"kind": "heldout", "step": 2, "heldout_loss": 2.0}, {"step": 2, "loss": 0.9},
            {"step": 3, "loss": 0.8}, {"kind": "heldout", "step": 4, "heldout_loss": 1.5}, {"kind": "other", "step": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 5, "lo')  # a line cut by a crash
    MetricsWriter(path, enabled=True).truncate_after(2)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == recs[:3]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_run_loss_falls(tiny_target_dir, chat_jsonl, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    cmd = LAUNCH + ["--config_file", str(ROOT / f"configs/accelerate/cpu_zero{stage}.yaml"),
                    str(ROOT / "train/train_mtp.py"), "--config", str(ROOT / "configs/tiny.yaml")]
    run(cmd + base_overrides(tiny_target_dir, chat_jsonl, out, **{
        "train.max_steps": 24, "train.save_every": 12, "train.micro_batch_size": 1,
        # k=2 under ZeRO-2; ZeRO-3 trains k=1 (k > 1 is refused there) with a checkpointed layer
        "head.num_steps": 2 if stage == 2 else 1,
        "head.activation_checkpointing": "true" if stage == 3 else "false"}), timeout=1200)
    recs = train_records(out)
    assert len(recs) == 24
    first, last = mean([r["loss"] for r in recs[:4]]), mean([r["loss"] for r in recs[-4:]])
    assert last < first - 0.5, (first, last)
    # the DeepSpeed engine state and the gathered head weights are in the checkpoint
    ck = out / "checkpoint-12"
    assert (ck / "head.safetensors").exists()
    assert any(ck.rglob("*optim_states*")), sorted(str(p) for p in ck.rglob("*"))
    head = load_file(out / "final" / "head.safetensors")
    assert head["fc.weight"].shape == (64, 128) and head["fc.weight"].numel() > 0


def wait_for_step(out: Path, step: int, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return
        if (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in train_records(out)):
            return
        time.sleep(0.2)
    raise AssertionError("training never reached the step to interrupt")


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(tiny_target_dir, chat_jsonl, tmp_path):
    extra = {"train.max_steps": 12}
    ref = tmp_path / "ref"
    run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, ref, **extra))

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **extra), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(out, 4, proc)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "stopped by signal" in log
    stopped = [p for p in out.glob("checkpoint-*")]
    assert len(stopped) == 1 and not (out / "final").exists()
    stop_step = int(stopped[0].name.split("-")[1])
    assert 4 <= stop_step < 12

    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **extra, **{"train.resume": "auto"}))
    assert "resumed from" in p.stdout + p.stderr
    a, b = train_records(ref), train_records(out)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-4, (ra["step"], ra["loss"], rb["loss"])
        assert ra["acc"] == pytest.approx(rb["acc"], abs=1e-6) and ra["lr"] == pytest.approx(rb["lr"])
    wa, wb = load_file(ref / "final/head.safetensors"), load_file(out / "final/head.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_finetune_from_export_continues_from_its_weights(tiny_target_dir, chat_jsonl, tmp_path):
    first = tmp_path / "first"
    run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, first, **{
        "train.max_steps": 16, "export.enabled": "true", "export.dtype": "fp32"}))
    export = first / "export"
    assert (export / "model.safetensors").exists()
    trained = mean([r["loss"] for r in train_records(first)[-4:]])
    fresh_first = train_records(first)[0]["loss"]

    tuned = tmp_path / "tuned"
    run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, tuned, **{
        "head.init": export, "train.max_steps": 2, "train.lr": 1e-7, "train.warmup_steps": 0}))
    start = train_records(tuned)[0]["loss"]
    # the fine-tune starts where the first run ended, not at a fresh head's loss
    assert abs(start - trained) < abs(start - fresh_first), (start, trained, fresh_first)


@pytest.mark.parametrize("override, message", [
    ({"data.max_length": 4}, "max_length"),
    ({"data.train": "/nonexistent/chats.jsonl"}, "nonexistent"),
    ({"train.micro_batch_size": 64}, "micro_batch_size"),
    ({"head.init": "/nonexistent/mtp"}, "nonexistent"),
])
def test_clear_errors(tiny_target_dir, chat_jsonl, tmp_path, override, message):
    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, tmp_path / "bad", **override), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr  # one `error:` line (--debug shows the traceback)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


@pytest.mark.slow
def test_zero3_from_accelerates_own_flags_trains_and_saves(tiny_target_dir, chat_jsonl, tmp_path):
    """`--use_deepspeed --zero_stage 3` and no project DeepSpeed config: accelerate leaves
    stage3_gather_16bit_weights_on_model_save off, yet the head's weights must reach the checkpoint."""
    out = tmp_path / "z3flags"
    cmd = LAUNCH + ["--use_deepspeed", "--zero_stage", "3", "--num_processes", "2", str(ROOT / "train/train_mtp.py"),
                    "--config", str(ROOT / "configs/tiny.yaml")]
    run(cmd + base_overrides(tiny_target_dir, chat_jsonl, out, **{
        "train.max_steps": 4, "train.save_every": 2, "train.micro_batch_size": 1, "head.num_steps": 1}), timeout=900)
    assert len(train_records(out)) == 4
    from train.checkpoint import verify_checkpoint

    assert verify_checkpoint(out / "checkpoint-2") is None
    for weights in (out / "checkpoint-2" / "head.safetensors", out / "final" / "head.safetensors"):
        assert load_file(weights)["fc.weight"].shape == (64, 128)


@pytest.mark.slow
@pytest.mark.parametrize("override", [{"head.num_steps": 2}, {"head.compile": "true"}])
def test_zero3_refuses_recursive_steps_and_a_compiled_head(tiny_target_dir, chat_jsonl, tmp_path, override):
    cmd = LAUNCH + ["--config_file", str(ROOT / "configs/accelerate/cpu_zero3.yaml"),
                    str(ROOT / "train/train_mtp.py"), "--config", str(ROOT / "configs/tiny.yaml")]
    p = run(cmd + base_overrides(tiny_target_dir, chat_jsonl, tmp_path / "z3", **override), check=False, timeout=600)
    assert p.returncode != 0 and "not supported under DeepSpeed ZeRO-3" in p.stdout + p.stderr


def test_target_that_is_not_qwen3_moe_is_refused(chat_jsonl, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dense = tmp_path / "dense"
    Qwen3ForCausalLM(Qwen3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(dense)
    p = run(TRAIN + base_overrides(dense, chat_jsonl, tmp_path / "bad"), check=False)
    assert p.returncode != 0 and "qwen3_moe" in p.stderr[-3000:]


def test_empty_data_file_is_an_error(tiny_target_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = run(TRAIN + base_overrides(tiny_target_dir, empty, tmp_path / "bad"), check=False)
    assert p.returncode != 0 and "empty.jsonl" in p.stderr[-3000:]


@pytest.mark.parametrize("backend, pattern", [("wandb", "wandb/offline-run-*"), ("tensorboard", "**/events.out.tfevents.*")])
def test_logging_backends_work_offline(tiny_target_dir, chat_jsonl, tmp_path, backend, pattern):
    """wandb with no API key logs offline without prompting; tensorboard writes event files."""
    out = tmp_path / backend
    p = subprocess.run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{"train.max_steps": 2, "log.backend": backend}),
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    assert list(out.glob(pattern)), sorted(str(x) for x in out.rglob("*"))[:20]


@pytest.mark.slow
def test_eval_after_training_gates_the_export(tiny_target_dir, chat_jsonl, tmp_path):
    """eval.enabled runs the evaluator on the held-out slice, logs its acceptance length, and
    eval.min_acceptance_length keeps a head that does not reach it from being exported."""
    out = tmp_path / "gated"
    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{
        "train.max_steps": 2, "data.holdout": 4, "eval.enabled": "true", "eval.num_prompts": 2,
        "eval.max_new_tokens": 4, "eval.steps": 2, "eval.batch_size": 2, "export.enabled": "true",
        "eval.min_acceptance_length": 4.5}))
    report = json.loads((out / "eval.json").read_text())
    assert report["steps"] == 2 and report["num_prompts"] == 2 and 1.0 <= report["acceptance_length"] <= 3.0
    summary = json.loads((out / "final" / "metrics.json").read_text())
    assert summary["eval_acceptance_length"] == report["acceptance_length"]
    assert not (out / "export").exists()
    assert "export skipped" in p.stdout + p.stderr


@pytest.mark.slow
def test_eval_token_map_drafts_with_it_and_the_export_ships_it(tiny_target_dir, chat_jsonl, tmp_path):
    """eval.token_map: the end-of-run evaluation drafts among the map's ids and the export carries
    the map, with --speculative-token-map in its SGLang command."""
    from model.export import EXPORT_INFO_NAME, TOKEN_MAP_NAME
    from model.token_map import save_token_map

    save_token_map(torch.arange(0, 151936, 3), tmp_path / "hot.pt")
    out = tmp_path / "mapped"
    run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{
        "train.max_steps": 2, "data.holdout": 4, "eval.enabled": "true", "eval.num_prompts": 2,
        "eval.max_new_tokens": 4, "eval.steps": 2, "eval.batch_size": 2, "export.enabled": "true",
        "eval.token_map": tmp_path / "hot.pt"}))
    report = json.loads((out / "eval.json").read_text())
    assert report["token_map"]["size"] == len(range(0, 151936, 3)) and report["lossless"] is True
    info = json.loads((out / "export" / EXPORT_INFO_NAME).read_text())
    assert (out / "export" / TOKEN_MAP_NAME).is_file() and info["token_map"]["size"] == report["token_map"]["size"]
    assert "--speculative-token-map" in info["sglang_command"]


def test_batches_read_ahead_never_make_a_resume_skip_or_repeat_one():
    """The GPU prefetcher reads one batch ahead of the step; `state` must still name the batches the
    steps consumed, so a run resumed from it continues with exactly the next batch (across an epoch
    end too)."""
    import datasets

    from data.collate import BucketBatchSampler
    from train.checkpoint import TrainerState
    from train.loop import iterate_batches

    rows = [{"input_ids": list(range(i + 1, i + 4 + i % 5)), "loss_mask": [1] * (3 + i % 5)} for i in range(10)]
    ds = datasets.Dataset.from_list(rows)
    lengths = [len(r["input_ids"]) for r in rows]

    def stream(state):
        sampler = BucketBatchSampler(lengths, 3, seed=0, num_replicas=1, rank=0, bucket_size_multiplier=2)
        return iterate_batches(sampler, ds, state, pad_id=0)

    def ids(batch):
        return batch["input_ids"].tolist()

    for b, _ in itertools.islice(stream(TrainerState()), 4):  # tokens counted on the CPU, before any copy
        assert b["num_tokens"] == int(b["attention_mask"].sum()) > 0
        assert b["input_ids"].shape[1] % 8 == 0  # padded to a multiple of 8 (one compiled graph per size range)
    reference = [ids(b) for b, _ in itertools.islice(stream(TrainerState()), 12)]  # 3 batches an epoch: 4 epochs
    for consumed in (2, 3, 5):
        state = TrainerState()
        it = stream(state)
        ahead = next(it)
        for _ in range(consumed):  # consume one batch while the next is already read (as the prefetcher does)
            (_, (state.epoch, state.batch_in_epoch)), ahead = ahead, next(it)
        resumed = [ids(b) for b, _ in itertools.islice(stream(state), 4)]
        assert resumed == reference[consumed:consumed + 4], consumed


def test_overlap_comm_is_dropped_for_one_process_only():
    """One process has no gradients to reduce, so DeepSpeed's overlap_comm would only add a device
    synchronize after every backward; with two or more it stays as configured."""
    import json

    from train.accelerator import drop_overlap_comm_for_one_process

    shipped = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    assert shipped["zero_optimization"]["overlap_comm"] is True
    one = json.loads(json.dumps(shipped))
    assert drop_overlap_comm_for_one_process(one, 1) and one["zero_optimization"]["overlap_comm"] is False
    two = json.loads(json.dumps(shipped))
    assert not drop_overlap_comm_for_one_process(two, 2) and two["zero_optimization"]["overlap_comm"] is True
    zero3 = {"zero_optimization": {"stage": 3, "overlap_comm": True}}  # ZeRO-3 prefetches with it: kept
    assert not drop_overlap_comm_for_one_process(zero3, 1) and zero3["zero_optimization"]["overlap_comm"]


def test_read_ahead_thread_keeps_order_and_raises_where_the_producer_failed():
    from train.loop import read_ahead_in_thread

    assert list(itertools.islice(read_ahead_in_thread(iter(range(100)), depth=2), 100)) == list(range(100))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad row 3")

    it = read_ahead_in_thread(failing())
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(ValueError, match="bad row 3"):
        next(it)
