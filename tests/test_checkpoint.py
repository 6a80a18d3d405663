"""Checkpoints that are verified, resumes that check the config, pruning that keeps to its own run.

One short run (checkpoint-2 and checkpoint-4 of 6 steps) is trained once per module; each test
damages or resumes a copy of it. Checks in process where they can be (fast), and as a user runs
the trainer (a subprocess) where the whole path matters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import TRAIN, base_overrides, run, train_records
from train.checkpoint import (
    MANIFEST_NAME, TRAINER_STATE_NAME, check_resume, choose_checkpoint, prune_checkpoints, verify_checkpoint,
    write_manifest,
)
from train.config import load_config
from train.run_dir import read_run_id

SHORT = {"train.max_steps": 6, "train.save_every": 2}


@pytest.fixture(scope="module")
def trained(tiny_target_dir, chat_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **SHORT))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return out


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def cfg_for(out: Path, tiny_target_dir, chat_jsonl, **extra):
    return load_config(None, base_overrides(tiny_target_dir, chat_jsonl, out, **{**SHORT, **extra}))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated model.safetensors": ("model.safetensors", truncate),
    "truncated optimizer state": ("optimizer.bin", truncate),
    "empty trainer_state.json": (TRAINER_STATE_NAME, lambda p: p.write_text("")),
    "deleted head weights": ("head.safetensors", lambda p: p.unlink()),
    "deleted manifest": (MANIFEST_NAME, lambda p: p.unlink()),
}


def test_every_checkpoint_carries_a_manifest_that_verifies(trained):
    for ck in trained.glob("checkpoint-*"):
        manifest = json.loads((ck / MANIFEST_NAME).read_text())
        assert manifest["run_id"] == read_run_id(trained) and f"checkpoint-{manifest['step']}" == ck.name
        assert {"model.safetensors", "optimizer.bin", "head.safetensors", TRAINER_STATE_NAME} <= set(manifest["files"])
        assert verify_checkpoint(ck) is None


def test_a_flipped_byte_of_the_same_size_fails_the_checksum(copy):
    f = copy / "checkpoint-4" / "optimizer.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "optimizer.bin does not match its sha256" in verify_checkpoint(copy / "checkpoint-4")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_takes_the_newest_checkpoint_that_verifies(copy, tiny_target_dir, chat_jsonl, capsys, damage):
    name, hurt = DAMAGE[damage]
    hurt(copy / "checkpoint-4" / name)
    cfg = cfg_for(copy, tiny_target_dir, chat_jsonl)
    assert choose_checkpoint(cfg, copy, read_run_id(copy)) == copy / "checkpoint-2"
    warning = capsys.readouterr().out
    assert "does not verify" in warning and str(copy / "checkpoint-4" / name) in warning


def test_resume_skips_a_truncated_checkpoint_and_finishes(copy, tiny_target_dir, chat_jsonl):
    truncate(copy / "checkpoint-4" / "model.safetensors")
    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, copy, **SHORT))
    log = p.stdout + p.stderr
    assert f"{copy / 'checkpoint-4' / 'model.safetensors'} is " in log and "resumed from" in log
    assert f"{copy / 'checkpoint-2'} at step 2" in log
    assert [r["step"] for r in train_records(copy)] == list(range(1, 7)) and (copy / "final").exists()


def test_no_checkpoint_verifies_is_one_clear_line(copy, tiny_target_dir, chat_jsonl):
    for ck in ("checkpoint-2", "checkpoint-4"):
        (copy / ck / TRAINER_STATE_NAME).write_text("")
    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, copy, **SHORT), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train.resume=auto: no checkpoint in") and "verifies" in last
    assert f"{copy / 'checkpoint-4' / TRAINER_STATE_NAME} is 0 bytes" in last


@pytest.mark.parametrize("override, key", [
    ({"train.lr": 0.5}, "train.lr"),
    ({"train.micro_batch_size": 3}, "train.micro_batch_size"),
    ({"head.num_steps": 3}, "head.num_steps"),
    ({"train.seed": 7}, "train.seed"),
    ({"data.max_length": 80}, "data.max_length"),
    ({"train.warmup_steps": 0}, "train.warmup_steps"),
])
def test_resume_refuses_a_key_that_changes_the_trajectory(trained, tiny_target_dir, chat_jsonl, override, key):
    cfg = cfg_for(trained, tiny_target_dir, chat_jsonl, **override)
    saved = yaml.safe_load((trained / "checkpoint-4" / "config.yaml").read_text())
    old = saved[key.split(".")[0]][key.split(".")[1]]
    with pytest.raises(ValueError, match="changed config") as e:
        check_resume(cfg, trained / "checkpoint-4", num_processes=1)
    assert f"{key}: {old!r} in the checkpoint, {next(iter(override.values()))!r} now" in str(e.value)


def test_resume_allows_safe_keys(trained, tiny_target_dir, chat_jsonl):
    cfg = cfg_for(trained, tiny_target_dir, chat_jsonl, **{
        "train.max_steps": 50, "train.log_every": 3, "train.save_every": 7, "train.keep_checkpoints": 5,
        "eval.num_prompts": 3, "export.enabled": "true", "train.output_dir": "/elsewhere"})
    assert check_resume(cfg, trained / "checkpoint-4", num_processes=1).step == 4


def test_resume_refuses_fewer_steps_than_done_and_another_process_count(trained, tiny_target_dir, chat_jsonl):
    with pytest.raises(ValueError, match=r"train.max_steps=3 is below the step of .*checkpoint-4 \(4\)"):
        check_resume(cfg_for(trained, tiny_target_dir, chat_jsonl, **{"train.max_steps": 3}), trained / "checkpoint-4", 1)
    assert check_resume(cfg_for(trained, tiny_target_dir, chat_jsonl, **{"train.max_steps": 4}), trained / "checkpoint-4", 1)
    with pytest.raises(ValueError, match="written by 1 process"):
        check_resume(cfg_for(trained, tiny_target_dir, chat_jsonl), trained / "checkpoint-4", 2)


def test_changed_config_is_refused_before_anything_is_written(copy, tiny_target_dir, chat_jsonl):
    before = (copy / "config.yaml").read_text()
    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, copy, **SHORT, **{"train.lr": 0.5}), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "train.lr: 0.01 in the checkpoint, 0.5 now" in p.stderr
    assert (copy / "config.yaml").read_text() == before


def test_extending_max_steps_resumes_and_the_saved_config_says_so(copy, tiny_target_dir, chat_jsonl):
    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, copy, **{**SHORT, "train.max_steps": 7}))
    assert "resumed from" in p.stdout + p.stderr
    assert [r["step"] for r in train_records(copy)] == list(range(1, 8))
    for cfg_file in (copy / "config.yaml", copy / "final" / "config.yaml"):
        assert yaml.safe_load(cfg_file.read_text())["train"]["max_steps"] == 7


def make_checkpoint(out: Path, step: int, run_id: str) -> Path:
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    for name in (TRAINER_STATE_NAME, "head.safetensors", "config.yaml"):
        (ck / name).write_text("{}")
    write_manifest(ck, run_id, step)
    return ck


def test_pruning_removes_only_the_current_runs_checkpoints(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step, "old")
    (tmp_path / "checkpoint-25").mkdir()  # no manifest: nobody's, never pruned
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step, "new")
    removed = prune_checkpoints(tmp_path, "new", 3, keep=2)
    assert [p.name for p in removed] == ["checkpoint-1"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-10", "checkpoint-2", "checkpoint-20", "checkpoint-25", "checkpoint-3", "checkpoint-30"]
