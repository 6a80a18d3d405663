"""Block-FP8 Qwen3-MoE targets (model/fp8.py): recognising and loading them, training against one,
and exporting for one in both modes (bf16 draft, --quantize fp8), on CPU.

The FP8 target is the tiny target quantized by scripts/make_fp8_target.py: real float8_e4m3fn
weights, bf16 `weight_scale_inv` tensors (as the Qwen3 releases ship them) and a Qwen-style
`quantization_config`, in 32x32 blocks, which tile the tiny dimensions (64, 32) with several
blocks per matrix; other tests cover 128x128 (one partial block) and ragged 24x40 blocks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TRAIN, base_overrides, load_script, run

from model.export import export_mtp, plan_export, sglang_command
from model.fp8 import (
    check_checkpoint, dequantize_block, fp8_round_model_, quantization_of, quantize_block, quantize_checkpoint,
    scale_shape,
)
from model.mtp_weights import (
    NAME_MAP, ExportError, expected_mtp_tensors, fp8_names, head_to_mtp, load_mtp_state, round_to_fp8, verify_export,
)
from model.safetensors_io import INDEX_NAME, read_header, weight_map
from model.target import FrozenTarget, fp8_load_kwargs, load_target_config, loading_note

BLOCK = (32, 32)
F8 = torch.float8_e4m3fn
FP8_HEAD_KEYS = {rule.head for rule in NAME_MAP if rule.fp8}  # attention q/k/v/o, the experts


def as_exported(state: dict) -> dict:
    """A head state as a bf16 --quantize fp8 export holds it: the fp8 keys as given, the rest bf16."""
    return {k: v if k in FP8_HEAD_KEYS else v.to(torch.bfloat16).float() for k, v in state.items()}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_round(w: torch.Tensor, block) -> torch.Tensor:
    """quantize -> dequantize written out block by block: s = amax/448 (1 for a zero block),
    q = e4m3(clamp(w/s)), w' = q*s. An independent check of model/fp8.py."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for r in range(0, w.shape[0], block[0]):
        for c in range(0, w.shape[1], block[1]):
            blk = w[r: r + block[0], c: c + block[1]].float()
            amax = blk.abs().max()
            s = amax / 448 if amax > 0 else torch.tensor(1.0)
            out[r: r + block[0], c: c + block[1]] = (blk / s).clamp(-448, 448).to(F8).float() * s
    return out


def raw_dequantize(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """float(q) * s, the scale expanded block by block (how SGLang and DeepSeek read a scale_inv)."""
    grid = s.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * grid[: q.shape[0], : q.shape[1]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fp8_dir(tiny_target_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "target"
    load_script("make_fp8_target").main(["--src", str(tiny_target_dir), "--out", str(out), "--block", *map(str, BLOCK),
                                         "--scale-dtype", "bf16"])
    return out


# ------------------------------------------------------------------------------ the format
def test_quantize_block_matches_the_reference_and_handles_ragged_and_zero_blocks():
    torch.manual_seed(0)
    w = torch.randn(70, 50) * 0.05
    w[32:64, :32] = 0  # an all-zero block
    q, s = quantize_block(w, BLOCK)
    assert q.dtype == F8 and s.dtype == torch.float32 and tuple(s.shape) == (3, 2) == scale_shape(w.shape, BLOCK)
    assert s[1, 0] == 1.0  # zero block: multiplier 1
    back = dequantize_block(q, s, BLOCK)
    assert torch.equal(back, reference_round(w, BLOCK)) and torch.equal(back, raw_dequantize(q, s, BLOCK))
    # e4m3 keeps 3 mantissa bits: within 1/16 relative of normal values, 2^-10 * s below that
    bound = torch.maximum(w.abs() / 16, s.repeat_interleave(32, 0).repeat_interleave(32, 1)[:70, :50] * 2**-10)
    assert bool(((back - w).abs() <= bound).all())
    assert float(q.float().abs().max()) == 448.0  # each block's amax maps to e4m3's largest value
    # stacked matrices (fused experts) are independent
    q3, s3 = quantize_block(torch.stack([w, 3 * w]), BLOCK)
    q_3w, s_3w = quantize_block(3 * w, BLOCK)
    assert torch.equal(q3[0], q) and torch.equal(s3[0], s) and torch.equal(q3[1], q_3w) and torch.equal(s3[1], s_3w)
    with pytest.raises(ValueError, match="needs a scale of shape"):
        dequantize_block(q, s[:2], BLOCK)


def test_quantization_config_is_recognised_and_other_schemes_refused(fp8_dir, tiny_target_dir):
    quant = quantization_of(load_target_config(str(fp8_dir)))
    assert quant.block == BLOCK and "model.layers.1.mlp.gate" in quant.not_converted and "lm_head" in quant.not_converted
    assert quantization_of(load_target_config(str(tiny_target_dir))) is None
    base = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    for bad, match in (({"quant_method": "compressed-tensors"}, "compressed-tensors"), ({"weight_block_size": None}, "per-tensor"),
                       ({"fmt": "e5m2"}, "fmt"), ({"activation_scheme": "static"}, "static"),
                       ({"weight_block_size": [128]}, "two positive integers")):
        with pytest.raises(ValueError, match=match):
            quantization_of({"quantization_config": {**base, **bad}})
    with pytest.raises(ValueError, match="compression_config"):
        quantization_of({"compression_config": {"quant_method": "compressed-tensors"}})


def test_make_fp8_target_writes_the_qwen_layout(fp8_dir, tiny_target_dir):
    header = {}
    for file in set(weight_map(fp8_dir).values()):
        header.update(read_header(file))
    q = "model.layers.1.self_attn.q_proj.weight"
    assert header[q]["dtype"] == "F8_E4M3" and header[q + "_scale_inv"] == {**header[q + "_scale_inv"], "dtype": "BF16", "shape": [2, 2]}
    assert header["model.layers.0.mlp.experts.7.down_proj.weight_scale_inv"]["shape"] == [2, 1]
    for kept in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.self_attn.q_norm.weight"):
        assert header[kept]["dtype"] == "F32" and kept + "_scale_inv" not in header
    assert len(check_checkpoint(weight_map(fp8_dir), quantization_of(load_target_config(str(fp8_dir))))) == 2 * (4 + 3 * 8)
    assert (fp8_dir / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(fp8_dir, fp8_dir.parent / "again")


def test_a_sharded_target_is_quantized_shard_by_shard_and_loads(tmp_path):
    from model.configs import build_random_target

    src = tmp_path / "sharded"
    build_random_target("tiny", seed=0, vocab_size=512, bos_token_id=0, eos_token_id=1).save_pretrained(
        src, max_shard_size="150KB")
    assert (src / INDEX_NAME).is_file()
    out = quantize_checkpoint(src, tmp_path / "fp8", BLOCK)
    src_map = json.loads((src / INDEX_NAME).read_text())["weight_map"]
    out_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    scale = "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv"
    assert out_map[scale] == src_map["model.layers.1.mlp.experts.5.up_proj.weight"] and set(out_map) - set(src_map) == {
        n + "_scale_inv" for n in src_map if "proj.weight" in n}
    rounded = FrozenTarget.load(str(src)).model
    fp8_round_model_(rounded, BLOCK)
    got = FrozenTarget.load(str(out)).model.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in rounded.state_dict().items())


def test_checkpoint_check_names_a_missing_or_misshapen_scale(fp8_dir, tmp_path):
    quant = quantization_of(load_target_config(str(fp8_dir)))
    files = weight_map(fp8_dir)
    (file,) = set(files.values())
    tensors = load_file(file)
    for edit, match in ((lambda t: t.pop("model.layers.0.self_attn.k_proj.weight_scale_inv"), "has no .*k_proj.weight_scale_inv"),
                        (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight_scale_inv": torch.ones(2, 2)}), "needs \\(1, 2\\)")):
        broken = dict(tensors)
        edit(broken)
        save_file(broken, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=match):
            check_checkpoint({n: tmp_path / "model.safetensors" for n in broken}, quant)


# ------------------------------------------------------------------------------ loading
def test_target_loads_dequantized_and_close_to_the_original(fp8_dir, tiny_target_dir):
    kwargs = fp8_load_kwargs(str(fp8_dir), load_target_config(str(fp8_dir)))
    assert kwargs["quantization_config"].dequantize is True  # explicit, not transformers' CPU fallback
    fp8 = FrozenTarget.load(str(fp8_dir))
    orig = FrozenTarget.load(str(tiny_target_dir))
    assert fp8.quantization.block == BLOCK and orig.quantization is None
    assert getattr(fp8.config, "quantization_config", None) is None  # it holds plain weights now
    assert "dequantized to float32" in loading_note(fp8.quantization, torch.float32)
    # exactly the original's weights rounded through block-FP8 (bf16 scales, as stored)
    rounded = copy.deepcopy(orig.model)
    assert fp8_round_model_(rounded, BLOCK, torch.bfloat16) == 2 * 6
    want, got = rounded.state_dict(), fp8.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert all(t.dtype == torch.float32 for t in got.values())
    # hidden states of the FP8 target against the fp32 target (docs/training.md reports these numbers)
    ids = torch.randint(0, 151_000, (2, 24), generator=torch.Generator().manual_seed(0))
    h_fp8, h = fp8.hidden(ids), orig.hidden(ids)
    diff = (h_fp8 - h).abs().max().item()
    rel = ((h_fp8 - h).norm() / h.norm()).item()
    print(f"hidden states, FP8 (32x32) vs fp32 tiny target: max |diff| {diff:.4f} (max |h| {h.abs().max().item():.2f}), relative {rel:.4f}")
    assert 0 < rel < 0.1


def test_ragged_blocks_load_offline_and_are_refused_by_the_transformers_path(tiny_target_dir, tmp_path):
    ragged = quantize_checkpoint(tiny_target_dir, tmp_path / "ragged", (24, 40))
    with pytest.raises(ValueError, match="not a whole number of 24x40 blocks"):
        FrozenTarget.load(str(ragged))
    from model.shared_weights import load_shared_weights

    shared = load_shared_weights(ragged, last_layer=True)  # our own dequantization reads ragged grids
    orig = load_shared_weights(tiny_target_dir, last_layer=True)
    got, want = shared.last_layer.state_dict(), orig.last_layer.state_dict()
    assert torch.equal(got["self_attn.k_proj.weight"], reference_round(want["self_attn.k_proj.weight"], (24, 40)))
    gate_e3 = want["mlp.experts.gate_up_proj"][3, :32]
    assert torch.equal(got["mlp.experts.gate_up_proj"][3, :32], reference_round(gate_e3, (24, 40)))
    assert torch.equal(got["mlp.gate.weight"], want["mlp.gate.weight"])  # the router stays as stored


def test_offline_weights_and_fingerprint_of_an_fp8_target(fp8_dir, tiny_target_dir):
    from data.fingerprints import target_fingerprint
    from model.shared_weights import load_shared_weights

    full = FrozenTarget.load(str(fp8_dir))
    shared = load_shared_weights(fp8_dir, last_layer=True)
    want, got = full.last_layer.state_dict(), shared.last_layer.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # the same dequantization as FrozenTarget.load
    assert torch.equal(shared.lm_head.weight, full.lm_head.weight) and torch.equal(shared.embed_tokens.weight, full.embed_tokens.weight)
    assert getattr(shared.config, "quantization_config", None) is None
    fp = target_fingerprint(fp8_dir)
    assert fp["hidden_size"] == 64 and fp["config_sha256"] != target_fingerprint(tiny_target_dir)["config_sha256"]


# ------------------------------------------------------------------------------ export settings
def test_export_settings_are_checked_against_the_target(fp8_dir, tiny_target_dir, tmp_path):
    with pytest.raises(ValueError, match="has no quantization_config"):
        plan_export(tiny_target_dir, quantize="fp8")
    with pytest.raises(ValueError, match="needs --quantize fp8"):
        plan_export(fp8_dir, merge=True)
    assert plan_export(fp8_dir, merge=True, quantize="fp8").quantize
    # a target that quantizes its router is not the scheme --quantize fp8 writes
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(fp8_dir / "config.json", odd / "config.json")
    q, s = quantize_block(torch.randn(8, 64), BLOCK)
    save_file({"model.layers.0.mlp.gate.weight": q, "model.layers.0.mlp.gate.weight_scale_inv": s}, str(odd / "model.safetensors"))
    with pytest.raises(ValueError, match="quantizes its layers differently"):
        plan_export(odd, quantize="fp8")
    assert "--speculative-draft-model-quantization unquant" in sglang_command("t", "d", unquantized_draft=True)
    assert "unquant" not in sglang_command("t", "d")


def test_training_refuses_an_export_setting_that_cannot_work_before_it_starts(fp8_dir, chat_jsonl, tmp_path):
    from train.train_mtp import run_training

    with pytest.raises(ValueError, match="needs --quantize fp8"):
        run_training("configs/tiny.yaml", base_overrides(fp8_dir, chat_jsonl, tmp_path / "run",
                                                         **{"export.enabled": "true", "export.merge": "true"}))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="export.quantize"):
        run_training("configs/tiny.yaml", ["export.quantize=int8"])


# ------------------------------------------------------------------------------ train -> eval -> export
@pytest.fixture(scope="module")
def trained(fp8_dir, chat_jsonl, tmp_path_factory):
    """8 steps against the FP8 target; training exports with export.quantize=fp8."""
    out = tmp_path_factory.mktemp("train_fp8") / "run"
    proc = run(TRAIN + base_overrides(fp8_dir, chat_jsonl, out, **{
        "export.enabled": "true", "export.quantize": "fp8", "export.dtype": "bf16"}))
    return out, proc.stdout


def test_training_against_an_fp8_target_exports_an_fp8_draft(trained, fp8_dir):
    out, stdout = trained
    assert "block-FP8 (e4m3, 32x32 blocks) checkpoint: weights dequantized to float32" in stdout
    export, head = out / "export", load_file(out / "final" / "head.safetensors")
    config = load_target_config(str(fp8_dir))
    assert verify_export(export, config) == len(expected_mtp_tensors(config, BLOCK)) == 37 + 28
    text = json.loads((export / "config.json").read_text())
    qc = text["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == list(BLOCK) and text["num_nextn_predict_layers"] == 1
    assert "model.layers.0.mlp.gate" in qc["modules_to_not_convert"]
    assert not any(e.startswith("model.layers.0.self_attn") or "experts" in e for e in qc["modules_to_not_convert"])
    info = json.loads((export / "export_info.json").read_text())
    assert info["quantization"] == "block-FP8 (e4m3, 32x32 blocks)" and "unquant" not in info["sglang_command"]

    stored = load_file(export / "model.safetensors")
    quantized = set(fp8_names(config))
    assert len(quantized) == 4 + 3 * 8
    for name, want in head_to_mtp(head).items():
        if name in quantized:
            q, s = stored[name], stored[name + "_scale_inv"]
            assert q.dtype == F8 and s.dtype == torch.float32 and tuple(s.shape) == scale_shape(want.shape, BLOCK)
            # the export dequantizes to exactly the head's weights rounded through FP8 ...
            assert torch.equal(raw_dequantize(q, s, BLOCK), reference_round(want, BLOCK)), name
            # ... which is the head within e4m3's rounding
            assert torch.allclose(raw_dequantize(q, s, BLOCK), want, rtol=1 / 16, atol=float(s.max()) * 2**-10), name
        else:  # fc, norms, q_norm/k_norm and the router as the target keeps them
            assert stored[name].dtype == torch.bfloat16 and name + "_scale_inv" not in stored
            assert torch.equal(stored[name], want.to(torch.bfloat16)), name
    # reading it back dequantizes; round_to_fp8 is the same rounding on the head's layout
    back, rounded = load_mtp_state(export, config), as_exported(round_to_fp8(head, config, BLOCK))
    assert back.keys() == rounded.keys() and all(torch.equal(back[k], rounded[k]) for k in back)


def test_export_modes_and_merge_for_an_fp8_target(trained, fp8_dir, tmp_path, capsys):
    out, _ = trained
    export_mtp_script = load_script("export_mtp")
    config = load_target_config(str(fp8_dir))
    # (a) the default: a bf16 draft with no quantization in its config, served with unquant
    export_mtp_script.main(["--checkpoint", str(out / "final"), "--target", str(fp8_dir), "--out", str(tmp_path / "bf16")])
    printed = capsys.readouterr().out
    assert "--speculative-draft-model-quantization unquant" in printed
    text = json.loads((tmp_path / "bf16" / "config.json").read_text())
    target_text = json.loads((fp8_dir / "config.json").read_text())
    added = {"num_nextn_predict_layers", "num_experts"}  # num_experts: copied from num_local_experts (docs/export.md)
    assert "quantization_config" not in text and {k: v for k, v in text.items() if k not in added} == \
        {k: v for k, v in target_text.items() if k != "quantization_config"}
    assert {h["dtype"] for h in read_header(tmp_path / "bf16" / "model.safetensors").values()} == {"BF16"}
    assert verify_export(tmp_path / "bf16", config) == 37
    # --merge into the FP8 target: refused without --quantize fp8 ...
    with pytest.raises(SystemExit, match="needs --quantize fp8"):
        export_mtp_script.main(["--checkpoint", str(out / "final"), "--target", str(fp8_dir), "--out",
                                str(tmp_path / "merged"), "--merge"])
    # ... and with it, the target's files byte-identical, the mtp shard listed in the index
    export_mtp(out / "final", fp8_dir, tmp_path / "merged", merge=True, quantize="fp8")
    merged = tmp_path / "merged"
    for f in fp8_dir.glob("*.safetensors"):
        assert sha256(merged / f.name) == sha256(f)
    index = json.loads((merged / INDEX_NAME).read_text())["weight_map"]
    assert index["mtp.layers.0.self_attn.o_proj.weight_scale_inv"] == "model-mtp.safetensors"
    assert json.loads((merged / "config.json").read_text())["quantization_config"]["weight_block_size"] == list(BLOCK)
    assert verify_export(merged, config) == 65
    assert torch.equal(load_mtp_state(merged, config)["layers.0.mlp.experts.down_proj"],
                       load_mtp_state(out / "export", config)["layers.0.mlp.experts.down_proj"])
    # an earlier FP8 export re-exported as a bf16 draft: dequantized, the config plain
    export_mtp(out / "export", fp8_dir, tmp_path / "again", dtype="fp32")
    assert verify_export(tmp_path / "again", config) == 37


def test_validation_refuses_config_and_tensors_that_disagree(trained, fp8_dir, tmp_path):
    out, _ = trained
    config = load_target_config(str(fp8_dir))
    target_qc = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]

    def copy_with(src: Path, name: str, edit) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        text = json.loads((dst / "config.json").read_text())
        edit(text)
        (dst / "config.json").write_text(json.dumps(text))
        return dst

    export_mtp(out / "final", fp8_dir, tmp_path / "bf16")
    # fp8 config over bf16 tensors: what the toolkit used to write (SGLang loads it as garbage)
    wrong = copy_with(tmp_path / "bf16", "fp8-config", lambda t: t.update(quantization_config=target_qc))
    with pytest.raises(ExportError, match="says quant_method fp8 but 28 weights"):
        verify_export(wrong, config)
    with pytest.raises(SystemExit, match="says quant_method fp8"):
        load_script("export_mtp").main(["--check", str(wrong), "--target", str(fp8_dir)])
    # fp8 tensors under a plain config: scales skipped, fp8 values copied unscaled
    plain = copy_with(out / "export", "plain-config", lambda t: t.pop("quantization_config"))
    for check in (verify_export, load_mtp_state):
        with pytest.raises(ExportError, match="no fp8 quantization_config"):
            check(plain, config)
    # an ignore list that would make SGLang build a quantized module unquantized, or not name the router
    skip_q = copy_with(out / "export", "skips-q", lambda t: t["quantization_config"]["modules_to_not_convert"].append(
        "model.layers.0.self_attn.q_proj"))
    with pytest.raises(ExportError, match="self_attn.q_proj .*unquantized"):
        verify_export(skip_q, config)
    no_router = copy_with(out / "export", "no-router", lambda t: t["quantization_config"].update(
        modules_to_not_convert=["lm_head"]))
    with pytest.raises(ExportError, match="does not list model.layers.0.mlp.gate"):
        verify_export(no_router, config)


def test_eval_of_the_fp8_export_equals_the_rounded_head(trained, fp8_dir, tmp_path, qwen3_tokenizer, capsys):
    """eval_acceptance.py on the FP8 export gives exactly the acceptance (and sampled tokens) of the
    trained head with its weights rounded through FP8 the same way, evaluated in process. Sampled
    (T=1) with p/q rejection sampling, because every accept decision then depends on the draft's
    probabilities: the unrounded head gives other numbers, so the comparison can fail. (At T=0
    this barely trained head drafts nothing the tiny target accepts.)"""
    from data.chat import chat_prompts
    from model.acceptance import SamplingParams, VerifyRule
    from model.evaluate import EvalSettings, evaluate
    from model.head import MTPHead

    out, _ = trained
    report = tmp_path / "eval.json"
    load_script("eval_acceptance").main([
        "--target", str(fp8_dir), "--mtp", str(out / "export"), "--prompts", "sharegpt-package", "--num-prompts", "8",
        "--device", "cpu", "--steps", "2", "--max-new-tokens", "16", "--batch-size", "4", "--temperature", "1",
        "--rejection-sampling", "--no-baseline", "--report", str(report)])
    from_export = json.loads(report.read_text())
    assert "checkpoint: weights dequantized to float32 on load" in capsys.readouterr().out

    target = FrozenTarget.load(str(fp8_dir))
    prompts = chat_prompts("sharegpt-package", qwen3_tokenizer, limit=8)
    trained_head = load_file(out / "final" / "head.safetensors")

    def evaluate_head(state):
        head = MTPHead(target.config)
        head.load_state_dict(state)
        rep = evaluate(target, head.eval(), qwen3_tokenizer, prompts, EvalSettings(
            steps=2, max_new_tokens=16, batch_size=4, sampling=SamplingParams(temperature=1.0),
            verify=VerifyRule("rejection"), baseline=False), progress=False)
        return rep["acceptance_length"], [(p["output_token_ids"], p["accept_histogram"]) for p in rep["per_prompt"]]

    # the same rounding in process: attention and experts through FP8, the rest through bf16 (export.dtype)
    rounded = evaluate_head(as_exported(round_to_fp8(trained_head, target.config, BLOCK)))
    got = (from_export["acceptance_length"], [(p["output_token_ids"], p["accept_histogram"]) for p in from_export["per_prompt"]])
    assert got == rounded and rounded[0] > 1
    assert evaluate_head(trained_head)[1] != rounded[1]  # the rounding shows: the check above can fail


@pytest.mark.slow
def test_partitioned_fp8_target_trains_like_the_whole_fp8_target(fp8_dir, chat_jsonl, tmp_path):
    """target.partition=zero3 loads the FP8 target through the same dequantizing loader (train/partition.py)."""
    from helpers import LAUNCH, ROOT, train_records

    def launch(out, partition):
        cmd = LAUNCH + ["--config_file", str(ROOT / "configs/accelerate/cpu_zero2.yaml"), str(ROOT / "train/train_mtp.py"),
                        "--config", str(ROOT / "configs/tiny.yaml")]
        return run(cmd + base_overrides(fp8_dir, chat_jsonl, out, **{
            "train.max_steps": 2, "train.micro_batch_size": 1, "target.partition": partition}), timeout=900)

    launch(tmp_path / "whole", "none")
    p = launch(tmp_path / "split", "zero3")
    assert "dequantized to float32" in p.stdout
    a, b = train_records(tmp_path / "whole"), train_records(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-5), (ra["step"], ra["loss"], rb["loss"])


def test_bench_decode_runs_an_fp8_target_as_the_engine_holds_it(tmp_path):
    """scripts/bench_decode.py --fp8: the random target's attention and experts rounded through
    block-FP8 and held dequantized, which is what the engine runs for an FP8 checkpoint."""
    out = tmp_path / "bench.json"
    rc = load_script("bench_decode").main(["--config", "tiny", "--device", "cpu", "--batch-sizes", "1", "--ks", "1",
                                           "--ctx", "8", "--iters", "2", "--skip-hf", "--fp8", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and not res["errors"] and res["fp8"]["tensors_rounded"] == 2 * 6
    assert res["lossless_check"]["torch"]["mismatching_rows"] == 0 and res["decode_tok_s"]["1"] > 0
