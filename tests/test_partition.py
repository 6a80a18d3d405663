"""target.partition=zero3: the frozen target's decoder layers split across 2 CPU ranks by a DeepSpeed
ZeRO-3 inference engine while the head trains under ZeRO-2 (configs/accelerate/cpu_zero2.yaml).

Each rank must hold only part of the decoder layers, and training must be the same as with the
whole target on every rank: same per-step losses and the same final head weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import LAUNCH, ROOT, TRAIN, base_overrides, run, train_records


def launch(target, chats, out, partition: str):
    cmd = LAUNCH + ["--config_file", str(ROOT / "configs/accelerate/cpu_zero2.yaml"),
                    str(ROOT / "train/train_mtp.py"), "--config", str(ROOT / "configs/tiny.yaml")]
    # few steps, one row per rank: the test is about equality, not about learning; the held-out
    # rows make every rank run the target in the final evaluation too
    return run(cmd + base_overrides(target, chats, out, **{
        "train.max_steps": 3, "train.micro_batch_size": 1, "data.holdout": 2, "target.partition": partition}),
        timeout=900)


@pytest.mark.slow
def test_zero3_partitioned_target_trains_like_the_whole_target(tiny_target_dir, chat_jsonl, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    launch(tiny_target_dir, chat_jsonl, whole, "none")
    p = launch(tiny_target_dir, chat_jsonl, split, "zero3")

    # (a) each of the 2 ranks stores about half of the decoder-layer elements (the norm weights,
    # a few hundred elements, are kept whole), and the two halves cover them all
    part = json.loads((split / "final" / "metrics.json").read_text())["target_partition"]
    total, held = part["decoder_layer_elements"], part["held_per_rank"]
    assert len(held) == 2 and total > 0
    for h in held:
        assert total / 2 <= h < 0.55 * total, (h, total)
    assert "target partition: holds" in p.stdout + p.stderr

    # (b) the same training: per-step losses and accuracies, and the final head weights
    a, b = train_records(whole), train_records(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-5), (ra["step"], ra["loss"], rb["loss"])
        assert rb["acc"] == pytest.approx(ra["acc"], abs=1e-6)
    sa, sb = (json.loads((d / "final" / "metrics.json").read_text()) for d in (whole, split))
    assert sb["heldout_loss"] == pytest.approx(sa["heldout_loss"], rel=1e-5)
    assert "target_partition" not in sa
    wa, wb = load_file(whole / "final/head.safetensors"), load_file(split / "final/head.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ({"target.partition": "zero2"}, "target.partition: must be none or zero3"),
    ({"target.partition": "zero3", "eval.enabled": True, "data.holdout": 4}, "eval.enabled"),
    ({"target.partition": "zero3", "data.hidden_states": "/tmp/dump"}, "target.partition"),
])
def test_partition_config_errors(override, message):
    from train.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs/tiny.yaml", [f"{k}={v}" for k, v in override.items()])


def test_partition_without_deepspeed_launch_is_an_error(tiny_target_dir, chat_jsonl, tmp_path):
    p = run(TRAIN + base_overrides(tiny_target_dir, chat_jsonl, tmp_path / "single", **{"target.partition": "zero3"}),
            check=False)
    assert p.returncode != 0 and "needs a DeepSpeed launch" in p.stderr[-3000:]
