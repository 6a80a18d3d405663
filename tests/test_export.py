"""Export / load of MTP weights (model/mtp_weights.py, model/export.py, scripts/export_mtp.py). CPU, no downloads.

    python -m pytest tests/test_export.py -q

Targets are tiny Qwen3-MoE models saved with `save_pretrained`; training checkpoints are faked as
`head.safetensors` + `config.yaml`, the layout train/ writes.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

from helpers import load_script

from model.configs import make_config
from model.export import EXPORT_INFO_NAME, MERGED_MTP_NAME, export_mtp
from model.mtp_weights import (
    HEAD_WEIGHTS_NAME,
    RUN_CONFIG_NAME,
    ExportError,
    check_mtp_tensors,
    expected_mtp_tensors,
    head_to_mtp,
    load_into_head,
    load_mtp_state,
    mtp_to_head,
    num_experts,
)
from model.safetensors_io import INDEX_NAME, SINGLE_WEIGHTS_NAME
from model.head import MTPHead
from model.target import load_target_config, set_experts_implementation

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_STUBS = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": "{}", "chat_template.jinja": "{{ x }}"}


def tiny_config(**overrides):
    cfg = make_config("tiny", vocab_size=512, **overrides)
    set_experts_implementation(cfg, "cpu")
    # Pinned: building a Qwen3MoeForCausalLM from a config sets this on it, and the head with
    # attention_mask=None is causal under sdpa but not under eager, so heads built before and
    # after that would differ.
    cfg._attn_implementation = "sdpa"
    return cfg


def save_target(path: Path, cfg, **save_kwargs) -> Path:
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).save_pretrained(path, **save_kwargs)
    for name, text in TOKENIZER_STUBS.items():
        (path / name).write_text(text)
    return path


def random_head(cfg, seed: int = 0) -> MTPHead:
    """Every parameter random (norms near 1), so a swapped gate/up or fc half cannot pass."""
    head = MTPHead(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=gen))
    return head


def fake_checkpoint(path: Path, state: dict, target: Path) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / HEAD_WEIGHTS_NAME))
    with open(path / RUN_CONFIG_NAME, "w") as f:
        yaml.safe_dump({"target": {"path": str(target)}, "data": {"enable_thinking": False}, "train": {"max_steps": 3}}, f)
    return path


def header(path: Path) -> dict:
    """name -> (dtype, shape, raw bytes) of every tensor of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])
    meta.pop("__metadata__", None)
    body = raw[8 + n :]
    return {k: (v["dtype"], tuple(v["shape"]), body[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in meta.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensors_of(folder: Path) -> dict[str, str]:
    """name -> file for every tensor in every .safetensors file of a folder."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name in header(file):
            assert name not in found, f"{name} is stored twice"
            found[name] = file.name
    return found


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def target(tmp_path_factory, cfg):
    return save_target(tmp_path_factory.mktemp("target") / "tiny-target", cfg)


@pytest.fixture(scope="module")
def sharded_target(tmp_path_factory, cfg):
    path = save_target(tmp_path_factory.mktemp("target") / "tiny-sharded", cfg, max_shard_size="100KB")
    assert (path / INDEX_NAME).is_file() and not (path / SINGLE_WEIGHTS_NAME).exists()
    return path


@pytest.fixture(scope="module")
def head(cfg):
    return random_head(cfg)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, head, target):
    return fake_checkpoint(tmp_path_factory.mktemp("run") / "final", head.state_dict(), target)


@pytest.fixture(scope="module")
def draft(tmp_path_factory, checkpoint, target):
    return export_mtp(checkpoint, target, tmp_path_factory.mktemp("export") / "draft", dtype="fp32")


# ------------------------------------------------------------------ 1. expected set from config
# docs/export.md's table, Qwen3-30B-A3B: H=2048, 32 q / 4 kv heads of 128, E=128, I=768
DESIGN_30B = {
    "mtp.fc.weight": (2048, 4096),
    "mtp.pre_fc_norm_embedding.weight": (2048,),
    "mtp.pre_fc_norm_hidden.weight": (2048,),
    "mtp.norm.weight": (2048,),
    "mtp.layers.0.input_layernorm.weight": (2048,),
    "mtp.layers.0.post_attention_layernorm.weight": (2048,),
    "mtp.layers.0.self_attn.q_proj.weight": (4096, 2048),
    "mtp.layers.0.self_attn.k_proj.weight": (512, 2048),
    "mtp.layers.0.self_attn.v_proj.weight": (512, 2048),
    "mtp.layers.0.self_attn.o_proj.weight": (2048, 4096),
    "mtp.layers.0.self_attn.q_norm.weight": (128,),
    "mtp.layers.0.self_attn.k_norm.weight": (128,),
    "mtp.layers.0.mlp.gate.weight": (128, 2048),
    **{f"mtp.layers.0.mlp.experts.{e}.{p}.weight": (768, 2048) for e in range(128) for p in ("gate_proj", "up_proj")},
    **{f"mtp.layers.0.mlp.experts.{e}.down_proj.weight": (2048, 768) for e in range(128)},
}


def test_expected_set_for_qwen3_30b_a3b_matches_design_table():
    expected = expected_mtp_tensors(make_config("qwen3-30b-a3b"))  # meta device: nothing allocated
    assert len(expected) == 397
    assert expected == DESIGN_30B
    assert 0.62e9 < sum(torch.Size(s).numel() for s in expected.values()) < 0.64e9  # "about 0.63 B"


def test_expected_set_for_qwen3_235b():
    expected = expected_mtp_tensors(make_config("qwen3-235b-a22b"))
    assert len(expected) == 397
    assert expected["mtp.fc.weight"] == (4096, 8192)
    assert expected["mtp.layers.0.mlp.experts.127.up_proj.weight"] == (1536, 4096)


def test_exported_tiny_set_equals_expected(draft, cfg):
    on_disk = {name: shape for name, (_, shape, _) in header(draft / SINGLE_WEIGHTS_NAME).items()}
    assert on_disk == expected_mtp_tensors(cfg)
    assert len(on_disk) == 13 + 3 * 8
    assert not any("embed_tokens" in n or "lm_head" in n for n in on_disk)


def test_num_experts_reads_either_key(target, cfg):
    assert num_experts({"num_experts": 8}) == num_experts({"num_local_experts": 8}) == 8
    # transformers 5 writes num_local_experts; the config object answers to both names
    assert "num_local_experts" in json.loads((target / "config.json").read_text())
    assert num_experts(load_target_config(str(target))) == 8
    assert expected_mtp_tensors(load_target_config(str(target))) == expected_mtp_tensors(cfg)


# ------------------------------------------------------------------ 2. SGLang's loading rules
# A re-statement (not a copy) of what SGLang does with a NEXTN draft checkpoint, read from
# sgl-project/sglang:
#   python/sglang/srt/models/qwen3_moe.py        Qwen3MoeForCausalLM.load_weights(weights, is_mtp=True)
#   python/sglang/srt/models/qwen3_moe_mtp.py    Qwen3MoeForCausalLMMTP: fc, pre_fc_norm_embedding,
#                                                pre_fc_norm_hidden, model (Qwen3MoeModel, 1 layer), lm_head
#   python/sglang/srt/layers/moe/fused_moe_triton/layer.py   FusedMoE.make_expert_params_mapping
#   python/sglang/srt/layers/utils.py            get_layer_id: re.search(r"layers\.(\d+)\.", name)
# A name that reaches no parameter is skipped silently there; here it maps to None.
SGLANG_STACKED = [
    ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
]
SGLANG_UNPREFIXED = ("mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight")
SGLANG_SHARED = ("model.embed_tokens.weight", "lm_head.weight")  # replaced by set_embed_and_head


def sglang_expert_mapping(n_experts: int):
    return [
        ("experts.w13_" if w in ("gate_proj", "up_proj") else "experts.w2_", f"experts.{e}.{w}.", e, shard)
        for e in range(n_experts)
        for shard, w in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))
    ]


def sglang_mtp_params(cfg) -> dict[str, tuple[int, ...]]:
    """Parameters of SGLang's Qwen3MoeForCausalLMMTP (num_hidden_layers forced to 1)."""
    H, E, I, hd = cfg.hidden_size, num_experts(cfg), cfg.moe_intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    L = "model.layers.0."
    return {
        "fc.weight": (H, 2 * H), "pre_fc_norm_embedding.weight": (H,), "pre_fc_norm_hidden.weight": (H,),
        "model.embed_tokens.weight": (cfg.vocab_size, H), "lm_head.weight": (cfg.vocab_size, H),
        L + "self_attn.qkv_proj.weight": (q + 2 * kv, H), L + "self_attn.o_proj.weight": (H, q),
        L + "self_attn.q_norm.weight": (hd,), L + "self_attn.k_norm.weight": (hd,),
        L + "mlp.gate.weight": (E, H),
        L + "mlp.experts.w13_weight": (E, 2 * I, H), L + "mlp.experts.w2_weight": (E, H, I),
        L + "input_layernorm.weight": (H,), L + "post_attention_layernorm.weight": (H,),
        "model.norm.weight": (H,),
    }


def sglang_shard_shape(cfg, param: str, shard) -> tuple[int, ...]:
    """Shape one checkpoint tensor must have to fill `shard` of `param`."""
    H, I, hd = cfg.hidden_size, cfg.moe_intermediate_size, cfg.head_dim
    if param.endswith("qkv_proj.weight"):
        heads = cfg.num_attention_heads if shard == "q" else cfg.num_key_value_heads
        return (heads * hd, H)
    if param.endswith("w13_weight"):
        return (I, H)
    if param.endswith("w2_weight"):
        return (H, I)
    return sglang_mtp_params(cfg)[param]


def sglang_load_mtp(weights: dict[str, tuple[int, ...]], cfg) -> dict[str, tuple | None]:
    """checkpoint name -> (param, shard_id, expert_id) it loads into, or None if skipped.
    Same control flow as SGLang's load_weights(is_mtp=True), including its `continue`s."""
    params = sglang_mtp_params(cfg)
    expert_mapping = sglang_expert_mapping(num_experts(cfg))
    landed: dict[str, tuple | None] = {}
    for original, shape in weights.items():
        landed[original] = None
        name = original
        if "mtp" not in name:
            continue
        name = name.replace("mtp.", "") if name in SGLANG_UNPREFIXED else name.replace("mtp", "model")
        match = re.search(r"layers\.(\d+)\.", name)
        if match and not 0 <= int(match.group(1)) < 1:  # the MTP model has layers [0, 1)
            continue
        if "rotary_emb.inv_freq" in name:
            continue
        for param_name, weight_name, shard_id in SGLANG_STACKED:
            if weight_name not in name or "mlp.experts" in name:
                continue
            name = name.replace(weight_name, param_name)
            if name not in params:
                continue
            landed[original] = (name, shard_id, None)
            break
        else:
            is_expert = False
            for param_name, weight_name, expert_id, shard_id in expert_mapping:
                if weight_name not in name:
                    continue
                is_expert = True
                name = name.replace(weight_name, param_name)
                if name not in params:
                    continue
                landed[original] = (name, shard_id, expert_id)
                break
            else:
                if not is_expert and name in params:
                    landed[original] = (name, None, None)
        if landed[original] is not None:  # SGLang's weight loaders assert the shard shape
            param, shard, _ = landed[original]
            assert tuple(shape) == sglang_shard_shape(cfg, param, shard), (original, shape, param, shard)
    return landed


def test_every_exported_tensor_lands_and_every_sglang_parameter_is_filled(draft, cfg):
    weights = {name: shape for name, (_, shape, _) in header(draft / SINGLE_WEIGHTS_NAME).items()}
    landed = sglang_load_mtp(weights, cfg)
    assert [n for n, hit in landed.items() if hit is None] == []
    hits = set(landed.values())
    E = num_experts(cfg)
    filled = {param for param, _, _ in hits}
    assert filled == set(sglang_mtp_params(cfg)) - set(SGLANG_SHARED)
    L = "model.layers.0."
    assert {(s, e) for p, s, e in hits if p == L + "self_attn.qkv_proj.weight"} == {("q", None), ("k", None), ("v", None)}
    assert {(s, e) for p, s, e in hits if p == L + "mlp.experts.w13_weight"} == {(s, e) for e in range(E) for s in ("w1", "w3")}
    assert {(s, e) for p, s, e in hits if p == L + "mlp.experts.w2_weight"} == {("w2", e) for e in range(E)}
    assert len(hits) == len(landed)  # no two checkpoint tensors fill the same shard


@pytest.mark.parametrize(
    "rename",
    [
        "fused_experts",  # transformers' 3-D gate_up_proj / down_proj instead of per-expert names
        "model_prefix",  # mtp.model.layers... (a state dict of a wrapper module)
        "drop_norm",  # mtp.norm.weight missing: SGLang would keep its init
    ],
)
def test_wrong_names_are_skipped_by_sglang_and_refused_by_the_validator(head, cfg, rename):
    state = {k: v.clone() for k, v in head.state_dict().items()}
    tensors = head_to_mtp(state)
    if rename == "fused_experts":
        tensors = {k: v for k, v in tensors.items() if ".experts." not in k}
        tensors["mtp.layers.0.mlp.experts.gate_up_proj"] = state["layers.0.mlp.experts.gate_up_proj"]
        tensors["mtp.layers.0.mlp.experts.down_proj"] = state["layers.0.mlp.experts.down_proj"]
    elif rename == "model_prefix":
        tensors = {k.replace("mtp.layers.", "mtp.model.layers."): v for k, v in tensors.items()}
    else:
        del tensors["mtp.norm.weight"]
    landed = sglang_load_mtp({k: tuple(v.shape) for k, v in tensors.items()}, cfg)
    filled = {hit[0] for hit in landed.values() if hit is not None}
    unfilled = set(sglang_mtp_params(cfg)) - set(SGLANG_SHARED) - filled
    assert unfilled, "the simulation should show parameters left at their init"
    with pytest.raises(ExportError):
        check_mtp_tensors(tensors, cfg)


# ------------------------------------------------------------------ 3. round trip
def test_name_map_round_trip_in_memory(head, cfg):
    state = head.state_dict()
    back = mtp_to_head(head_to_mtp(state), cfg)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_gate_rows_come_first(head, cfg):
    fused = head.state_dict()["layers.0.mlp.experts.gate_up_proj"]  # [E, 2I, H]
    I = cfg.moe_intermediate_size
    tensors = head_to_mtp(head.state_dict())
    assert torch.equal(tensors["mtp.layers.0.mlp.experts.3.gate_proj.weight"], fused[3, :I])
    assert torch.equal(tensors["mtp.layers.0.mlp.experts.3.up_proj.weight"], fused[3, I:])


def test_export_then_load_gives_identical_head(draft, head, cfg):
    fresh = MTPHead(cfg)
    load_into_head(fresh, draft)
    for k, v in head.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    gen = torch.Generator().manual_seed(1)
    B, T, H = 2, 5, cfg.hidden_size
    embeds, hidden = torch.randn(B, T, H, generator=gen), torch.randn(B, T, H, generator=gen)
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        assert torch.equal(fresh(embeds, hidden, pos), head(embeds, hidden, pos))


def test_bf16_export_loads_as_the_rounded_head(tmp_path, checkpoint, target, head, cfg):
    out = export_mtp(checkpoint, target, tmp_path / "bf16")
    assert {d for d, _, _ in header(out / SINGLE_WEIGHTS_NAME).values()} == {"BF16"}
    state = load_mtp_state(out, cfg)
    for k, v in head.state_dict().items():
        assert state[k].dtype == torch.bfloat16 and torch.equal(state[k], v.to(torch.bfloat16)), k


def test_load_accepts_every_source_form(tmp_path, draft, checkpoint, head, cfg):
    reference = head.state_dict()
    single_head_file = checkpoint / HEAD_WEIGHTS_NAME
    single_mtp_file = draft / SINGLE_WEIGHTS_NAME
    for source in (draft, checkpoint, single_head_file, single_mtp_file):
        state = load_mtp_state(source, cfg)
        assert all(torch.equal(state[k], reference[k]) for k in reference), source


def test_draft_dir_files(draft, target, checkpoint):
    target_text = json.loads((target / "config.json").read_text())
    config = json.loads((draft / "config.json").read_text())
    added = {k: v for k, v in config.items() if k not in target_text}
    assert added == {"num_nextn_predict_layers": 1, "num_experts": 8}
    assert {k: config[k] for k in target_text} == target_text  # nothing renamed or changed
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    for name in (*TOKENIZER_STUBS, "generation_config.json"):
        assert (draft / name).read_bytes() == (target / name).read_bytes()
    assert not (draft / INDEX_NAME).exists()
    info = json.loads((draft / EXPORT_INFO_NAME).read_text())
    assert info["num_tensors"] == 37 and info["dtype"] == "fp32"
    assert info["source_checkpoint"] == str(checkpoint.resolve())
    assert info["training_config"]["target"]["path"] == str(target)
    assert info["thinking"] is False  # the run's data.enable_thinking
    assert "--speculative-algorithm NEXTN" in info["sglang_command"]
    assert f"--speculative-draft-model-path {draft.resolve()}" in info["sglang_command"]
    assert f"--model-path {target.resolve()}" in info["sglang_command"]
    assert not [p for p in draft.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_export_of_an_export_keeps_its_metadata(tmp_path, draft, target, head, cfg):
    out = export_mtp(draft, target, tmp_path / "again", dtype="fp32", acceptance_length=None)
    info = json.loads((out / EXPORT_INFO_NAME).read_text())
    assert info["training_config"] == json.loads((draft / EXPORT_INFO_NAME).read_text())["training_config"]
    out2 = export_mtp(draft, target, tmp_path / "with-al", dtype="fp32", acceptance_length=2.5, train_config={"a": 1})
    info2 = json.loads((out2 / EXPORT_INFO_NAME).read_text())
    assert info2["acceptance_length"] == 2.5 and info2["training_config"] == {"a": 1}


# ------------------------------------------------------------------ 4. --merge
def check_index_consistent(folder: Path) -> dict[str, str]:
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    assert tensors_of(folder) == weight_map  # every mapped name is in its shard, and vice versa
    return weight_map


@pytest.mark.parametrize("which", ["single_file", "sharded"])
def test_merge_leaves_target_tensors_byte_identical(tmp_path, which, target, sharded_target, checkpoint, cfg, head):
    src = target if which == "single_file" else sharded_target
    before = {p.name: sha256(p) for p in src.iterdir() if p.is_file()}
    out = export_mtp(checkpoint, src, tmp_path / "merged", merge=True, dtype="fp32")
    assert {p.name: sha256(p) for p in src.iterdir() if p.is_file()} == before  # target untouched

    src_tensors = tensors_of(src)
    weight_map = check_index_consistent(out)
    assert {k: v for k, v in weight_map.items() if not k.startswith("mtp.")} == src_tensors
    assert {k for k in weight_map if k.startswith("mtp.")} == set(expected_mtp_tensors(cfg))
    assert {v for k, v in weight_map.items() if k.startswith("mtp.")} == {MERGED_MTP_NAME}
    for file in set(src_tensors.values()):  # raw bytes of every target tensor
        assert header(out / file) == header(src / file), file
        assert (out / file).stat().st_ino == (src / file).stat().st_ino, f"{file} was copied, not hard-linked"
    index = json.loads((out / INDEX_NAME).read_text())
    sizes = sum(len(raw) for f in set(weight_map.values()) for _, _, raw in header(out / f).values())
    assert index["metadata"]["total_size"] == sizes

    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["architectures"] == ["Qwen3MoeForCausalLM"]
    state = load_mtp_state(out, cfg)  # reads only the mtp shard via the index
    assert all(torch.equal(state[k], v) for k, v in head.state_dict().items())
    info = json.loads((out / EXPORT_INFO_NAME).read_text())
    assert f"--model-path {out.resolve()}" in info["sglang_command"]


def test_merge_refuses_a_target_that_already_has_mtp(tmp_path, target, checkpoint):
    merged = export_mtp(checkpoint, target, tmp_path / "merged", merge=True)
    with pytest.raises(ValueError, match="already holds"):
        export_mtp(checkpoint, merged, tmp_path / "twice", merge=True)
    assert not (tmp_path / "twice").exists()


# ------------------------------------------------------------------ 5. sharding
def test_sharded_export_index_matches_shards_and_loads_back(tmp_path, checkpoint, target, head, cfg):
    out = export_mtp(checkpoint, target, tmp_path / "sharded", dtype="fp32", max_shard_bytes=20_000)
    assert not (out / SINGLE_WEIGHTS_NAME).exists()
    weight_map = check_index_consistent(out)
    files = sorted(set(weight_map.values()))
    assert len(files) > 2 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    assert set(weight_map) == set(expected_mtp_tensors(cfg))
    state = load_mtp_state(out, cfg)
    assert all(torch.equal(state[k], v) for k, v in head.state_dict().items())


# ------------------------------------------------------------------ 6. refusals
def test_truncated_file_is_refused_naming_it(tmp_path, checkpoint, cfg):
    bad = tmp_path / "final"
    bad.mkdir()
    raw = (checkpoint / HEAD_WEIGHTS_NAME).read_bytes()
    (bad / HEAD_WEIGHTS_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=re.escape(str(bad / HEAD_WEIGHTS_NAME))):
        load_mtp_state(bad, cfg)
    (bad / HEAD_WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_mtp_state(bad / HEAD_WEIGHTS_NAME, cfg)


def test_head_of_another_config_is_refused_with_shapes(tmp_path, target):
    other = random_head(tiny_config(hidden_size=32, head_dim=8))
    ckpt = fake_checkpoint(tmp_path / "final", other.state_dict(), target)
    with pytest.raises(ExportError) as err:
        export_mtp(ckpt, target, tmp_path / "out")
    assert "fc.weight got (32, 64) expected (64, 128)" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_and_extra_tensors_are_refused(tmp_path, head, target):
    state = dict(head.state_dict())
    del state["norm.weight"]
    with pytest.raises(ExportError, match=r"missing \(1\): norm.weight"):
        export_mtp(fake_checkpoint(tmp_path / "a", state, target), target, tmp_path / "out")
    state = dict(head.state_dict(), **{"embed_tokens.weight": torch.zeros(512, 64)})
    with pytest.raises(ExportError, match=r"unexpected \(1\): embed_tokens.weight"):
        export_mtp(fake_checkpoint(tmp_path / "b", state, target), target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_values_are_refused(tmp_path, head, target):
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["fc.weight"][0, 0] = float("nan")
    with pytest.raises(ExportError, match="non-finite.*mtp.fc.weight"):
        export_mtp(fake_checkpoint(tmp_path / "nan", state, target), target, tmp_path / "out")


def test_non_empty_out_needs_force_and_is_replaced(tmp_path, checkpoint, target):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="--force"):
        export_mtp(checkpoint, target, out)
    assert (out / "old.txt").exists()
    export_mtp(checkpoint, target, out, force=True)
    assert not (out / "old.txt").exists() and (out / SINGLE_WEIGHTS_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left


def test_out_may_not_replace_its_inputs(tmp_path, checkpoint, target):
    with pytest.raises(ValueError, match="would replace --checkpoint"):
        export_mtp(checkpoint, target, checkpoint, force=True)
    with pytest.raises(ValueError, match="would replace --target"):
        export_mtp(checkpoint, target, target.parent, force=True)
    assert (checkpoint / HEAD_WEIGHTS_NAME).is_file() and (target / "config.json").is_file()


def test_target_that_is_not_qwen3_moe_is_refused(tmp_path, checkpoint, target):
    llama = tmp_path / "llama"
    llama.mkdir()
    text = json.loads((target / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps(dict(text, model_type="llama", architectures=["LlamaForCausalLM"])))
    with pytest.raises(ValueError, match="model_type='llama'"):
        export_mtp(checkpoint, llama, tmp_path / "out")
    with pytest.raises(ValueError, match="no config.json"):
        export_mtp(checkpoint, tmp_path, tmp_path / "out")


def test_target_dir_without_mtp_is_not_mistaken_for_an_export(target, cfg):
    with pytest.raises(ValueError, match="no mtp.* tensors"):
        load_mtp_state(target, cfg)


def test_unsupported_dtype(tmp_path, checkpoint, target):
    with pytest.raises(ValueError, match="dtype"):
        export_mtp(checkpoint, target, tmp_path / "out", dtype="int8")


# ------------------------------------------------------------------ 7. CLI
def test_cli_prints_the_sglang_command(tmp_path, checkpoint, target):
    out = tmp_path / "cli-draft"
    cmd = [sys.executable, "scripts/export_mtp.py", "--checkpoint", str(checkpoint), "--target", str(target), "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (
        f"python -m sglang.launch_server --model-path {target.resolve()} --speculative-algorithm NEXTN "
        f"--speculative-draft-model-path {out.resolve()} --speculative-num-steps 3 "
        "--speculative-eagle-topk 1 --speculative-num-draft-tokens 4"
    ) in run.stdout


def test_token_map_is_checked_copied_and_passed_to_sglang(tmp_path, checkpoint, target, cfg):
    from model.export import TOKEN_MAP_NAME
    from model.mtp_weights import verify_export
    from model.token_map import load_token_map, save_token_map

    save_token_map(torch.arange(0, cfg.vocab_size, 4), tmp_path / "hot.pt")
    cli = load_script("export_mtp")
    out = tmp_path / "mapped"
    cli.main(["--checkpoint", str(checkpoint), "--target", str(target), "--out", str(out),
              "--token-map", str(tmp_path / "hot.pt")])
    info = json.loads((out / EXPORT_INFO_NAME).read_text())
    assert load_token_map(out / TOKEN_MAP_NAME, cfg.vocab_size).tolist() == list(range(0, cfg.vocab_size, 4))
    assert info["token_map"]["size"] == cfg.vocab_size // 4 and info["token_map"]["path"] == TOKEN_MAP_NAME
    assert info["sglang_command"].endswith(f"--speculative-token-map {(out / TOKEN_MAP_NAME).resolve()}")
    assert verify_export(out, cfg) > 0  # the map beside the weights changes nothing SGLang loads
    save_token_map(torch.tensor([0, cfg.vocab_size]), tmp_path / "big.pt")  # another tokenizer's map
    with pytest.raises(SystemExit, match="error: .*outside the vocabulary"):
        cli.main(["--checkpoint", str(checkpoint), "--target", str(target), "--out", str(tmp_path / "bad"),
                  "--token-map", str(tmp_path / "big.pt")])
    assert not (tmp_path / "bad").exists()


def test_cli_errors_are_one_line_messages(tmp_path, checkpoint, target):
    # in-process: a second interpreter start costs ~10 s of imports
    cli = load_script("export_mtp")
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    with pytest.raises(SystemExit, match="error: .*pass --force"):
        cli.main(["--checkpoint", str(checkpoint), "--target", str(target), "--out", str(out)])


def test_check_cli_verifies_an_export_and_refuses_a_checkpoint(tmp_path):
    """`export_mtp.py --check` passes a fresh export and refuses a training checkpoint dir."""
    import subprocess
    import sys as _sys

    from model.configs import build_random_target

    model = build_random_target("tiny", vocab_size=512, bos_token_id=0, eos_token_id=1)
    target = tmp_path / "target"
    model.save_pretrained(target)
    ck = tmp_path / "final"
    ck.mkdir()
    head = MTPHead(model.config)
    head.init_random(seed=0)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(ck / "head.safetensors"))
    out = export_mtp(ck, target, tmp_path / "export", dtype="fp32")
    script = Path(__file__).resolve().parent.parent / "scripts" / "export_mtp.py"
    ok = subprocess.run([_sys.executable, str(script), "--check", str(out), "--target", str(target)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "names and shapes match" in ok.stdout
    bad = subprocess.run([_sys.executable, str(script), "--check", str(ck), "--target", str(target)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not an export" in bad.stderr
