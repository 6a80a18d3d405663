"""A run dir belongs to one run: ownership, the lock, writability, the export's owner, and the
one-line errors of train_mtp.py. Refusals come before the target loads, so those runs are short."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from helpers import TRAIN, base_overrides, env, run, train_records
from train.run_dir import LOCK_NAME, RunLock, export_is_ours, read_run_id


def refused(p) -> str:
    """The one `error:` line of a refused run (exit 2, no traceback)."""
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-4000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), p.stderr[-2000:]
    return last


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_fresh_run_in_a_dir_of_another_run_is_refused(tiny_target_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{"train.max_steps": 4, "train.save_every": 2}))
    before = sorted(p.name for p in out.iterdir())
    owner = read_run_id(out)
    for resume in ("none", "auto"):  # auto: the old run has checkpoint-2, but here it is asked for afresh
        if resume == "auto":
            shutil.rmtree(out / "checkpoint-2")  # only final/ of the old run left: nothing to resume
        p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{"train.resume": resume}), check=False)
        line = refused(p)
        assert f"train.output_dir={out} holds another run's outputs" in line
        assert "train.resume=auto" in line and "another train.output_dir" in line
    assert sorted(p.name for p in out.iterdir()) == [n for n in before if n != "checkpoint-2"]
    assert read_run_id(out) == owner


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tiny_target_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    line = refused(run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out), check=False))
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started 2026-01-01T00:00:00+00:00" in line
    assert json.loads((out / LOCK_NAME).read_text()) == holder  # not taken


def test_a_stale_lock_is_taken_over_and_released_at_exit(tiny_target_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "then"}))
    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{"train.max_steps": 2}))
    assert "warning: took over the lock" in p.stdout and "that is gone" in p.stdout
    assert len(train_records(out)) == 2 and not (out / LOCK_NAME).exists()


def test_lock_in_process(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(ValueError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # a lock of another host cannot be checked: refused, with the way out
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "started": "x"}))
    with pytest.raises(ValueError, match="if that run is gone, delete"):
        RunLock(tmp_path).acquire()
    # the same pid started at another time (a reused pid) is not the holder
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "pid_start": "1"}))
    RunLock(tmp_path).acquire().release()


def test_unwritable_output_dir_is_found_before_the_target_loads(chat_jsonl, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    p = run(TRAIN + base_overrides(tmp_path / "no_such_target", chat_jsonl, blocker / "run"), check=False)
    line = refused(p)
    assert f"train.output_dir={blocker / 'run'} is not writable" in line


@pytest.mark.parametrize("override, message", [
    ({"train.lr": -1}, "error: train.lr: must be > 0"),
    ({"target.path": "/nonexistent/target"}, "error: target '/nonexistent/target' does not exist"),
    ({"data.train": "/nonexistent/chats.jsonl"}, "error: /nonexistent/chats.jsonl does not exist"),
])
def test_user_errors_are_one_line_and_debug_shows_the_traceback(tiny_target_dir, chat_jsonl, tmp_path, override, message):
    cmd = TRAIN + base_overrides(tiny_target_dir, chat_jsonl, tmp_path / "run", **override)
    assert refused(run(cmd, check=False)).startswith(message)
    if "train.lr" in override:
        p = subprocess.run(cmd, env={**env(), "MTP_DEBUG": "1"}, capture_output=True, text=True, timeout=300, check=False)
        assert p.returncode != 0 and "Traceback" in p.stderr
        p = run(cmd[:2] + ["--debug"] + cmd[2:], check=False)
        assert p.returncode != 0 and "Traceback" in p.stderr


def test_export_never_replaces_a_dir_the_run_did_not_make(tiny_target_dir, chat_jsonl, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    out = tmp_path / "run"
    line = refused(run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{
        "export.enabled": "true", "export.out": foreign}), check=False))
    assert f"export.out={foreign} exists, is not empty and was not written by this run" in line
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    # a resume of the run that wrote an export replaces it (its export_info.json names the run)
    over = {"train.max_steps": 3, "train.save_every": 2, "export.enabled": "true", "export.dtype": "fp32"}
    run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **over))
    info = json.loads((out / "export" / "export_info.json").read_text())
    assert info["run_id"] == read_run_id(out)
    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, out, **{**over, "train.max_steps": 4}))
    assert "resumed from" in p.stdout + p.stderr
    again = json.loads((out / "export" / "export_info.json").read_text())
    assert again["run_id"] == info["run_id"] and again["training_config"]["train"]["max_steps"] == 4


def test_export_is_ours(tmp_path):
    assert export_is_ours(tmp_path / "absent", "r1") is False
    (tmp_path / "empty").mkdir()
    assert export_is_ours(tmp_path / "empty", "r1") is False
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "export_info.json").write_text(json.dumps({"run_id": "r1"}))
    assert export_is_ours(tmp_path / "ours", "r1") is True
    with pytest.raises(ValueError, match="not written by this run"):
        export_is_ours(tmp_path / "ours", "r2")
