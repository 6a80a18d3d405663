"""Export the MTP head as SGLang NEXTN draft weights, and read such weights back (design.md §2).

    python scripts/export_mtp.py --checkpoint runs/tiny/final --target artifacts/tiny-target \
        --out artifacts/tiny-mtp [--merge] [--dtype bf16|fp16|fp32] [--force]

    export_mtp(checkpoint, target, out)          # what training calls at its end
    state = load_mtp_state(path, target_config)   # head-layout state dict from any MTP weights
    load_into_head(head, path)                    # the same, loaded strictly into an MTPHead

Two layouts exist and ONE table, `NAME_MAP`, converts between them in both directions:
- the head's own `state_dict()` (training checkpoints: `head.safetensors`), with transformers'
  fused experts `layers.0.mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and
  `layers.0.mlp.experts.down_proj` [E, H, I];
- SGLang's names: `mtp.` + the head key, with experts split into per-expert 2-D tensors
  `mtp.layers.0.mlp.experts.{e}.gate_proj.weight` [I, H], `up_proj.weight` [I, H],
  `down_proj.weight` [H, I].

Footgun this module exists to close: SGLang's loader skips a name that matches no parameter
SILENTLY, leaving that parameter at its random init. So every export is checked against
`expected_mtp_tensors(config)` (names, shapes, dtype, finite values) before a byte is written.

Plain single-process code: no accelerate, no DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from model.head import head_param_shapes
from model.target import SUPPORTED_MODEL_TYPES, load_target_config

# Training checkpoints (train/ imports these two names from here).
HEAD_WEIGHTS_NAME = "head.safetensors"
RUN_CONFIG_NAME = "config.yaml"

EXPORT_INFO_NAME = "export_info.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"
MERGED_MTP_NAME = "model-mtp.safetensors"
MERGED_MTP_SHARD_NAME = "model-mtp-{i:05d}-of-{n:05d}.safetensors"
MTP_PREFIX = "mtp."
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Copied into the draft dir when the target has them; SGLang reads the tokenizer from the target,
# but a self-describing draft dir is easier to move around and inspect.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
    "generation_config.json",
)
# Files of a target that are hard-linked (not copied) into a merged dir.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# Chain drafting of 3 tokens, one candidate per step (design.md §2).
SGLANG_SPEC_STEPS = 3


class ExportError(ValueError):
    """A set of MTP tensors does not match what the target config expects."""


# ------------------------------------------------------------------------------ the name map
@dataclass(frozen=True)
class NameRule:
    """One row of the name map.

    `head` is a key of `MTPHead.state_dict()`. For a plain row, `exported` holds the one SGLang
    name. For a `per_expert` row the head tensor is transformers' fused [E, rows, cols] expert
    tensor: expert e's [rows, cols] slice is cut into len(exported) equal row blocks, block i
    being `exported[i].format(e=e)`; loading concatenates the blocks and stacks the experts.
    """

    head: str
    exported: tuple[str, ...]
    per_expert: bool = False


def _row(head: str, exported: str) -> NameRule:
    return NameRule(head, (exported,))


NAME_MAP: tuple[NameRule, ...] = (
    # fc [H, 2H]: columns [0:H] act on the embedding half, [H:2H] on the hidden half; the head
    # already stores it in SGLang's order, so no column swap.
    _row("fc.weight", "mtp.fc.weight"),
    _row("pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_embedding.weight"),
    _row("pre_fc_norm_hidden.weight", "mtp.pre_fc_norm_hidden.weight"),
    _row("layers.0.input_layernorm.weight", "mtp.layers.0.input_layernorm.weight"),
    _row("layers.0.self_attn.q_proj.weight", "mtp.layers.0.self_attn.q_proj.weight"),
    _row("layers.0.self_attn.k_proj.weight", "mtp.layers.0.self_attn.k_proj.weight"),
    _row("layers.0.self_attn.v_proj.weight", "mtp.layers.0.self_attn.v_proj.weight"),
    _row("layers.0.self_attn.o_proj.weight", "mtp.layers.0.self_attn.o_proj.weight"),
    _row("layers.0.self_attn.q_norm.weight", "mtp.layers.0.self_attn.q_norm.weight"),
    _row("layers.0.self_attn.k_norm.weight", "mtp.layers.0.self_attn.k_norm.weight"),
    _row("layers.0.post_attention_layernorm.weight", "mtp.layers.0.post_attention_layernorm.weight"),
    _row("layers.0.mlp.gate.weight", "mtp.layers.0.mlp.gate.weight"),  # router [E, H]
    # fused [E, 2I, H], gate rows [0:I] first, up rows [I:2I] second (transformers 5 layout)
    NameRule(
        "layers.0.mlp.experts.gate_up_proj",
        ("mtp.layers.0.mlp.experts.{e}.gate_proj.weight", "mtp.layers.0.mlp.experts.{e}.up_proj.weight"),
        per_expert=True,
    ),
    # fused [E, H, I]
    NameRule("layers.0.mlp.experts.down_proj", ("mtp.layers.0.mlp.experts.{e}.down_proj.weight",), per_expert=True),
    _row("norm.weight", "mtp.norm.weight"),
)


def num_experts(config) -> int:
    """Routed experts of a Qwen3-MoE config object or config.json dict.

    transformers 5 writes `num_local_experts` where the published configs say `num_experts`
    (design.md §2); either may be the one present.
    """
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
    value = get("num_experts")
    if value is None:
        value = get("num_local_experts")
    if value is None:
        raise ValueError("the target config has neither num_experts nor num_local_experts; is it a Qwen3-MoE config?")
    return int(value)


def _covered_head_shapes(config) -> dict[str, tuple[int, ...]]:
    """The head's parameter shapes, after checking that NAME_MAP covers every one of them."""
    shapes = head_param_shapes(config)
    uncovered = sorted(set(shapes) - {rule.head for rule in NAME_MAP})
    if uncovered:  # e.g. attention_bias=True adds q/k/v/o biases that SGLang names differently
        raise ValueError(f"the export name map has no row for head parameters {uncovered}; this target config is not supported")
    return shapes


def expected_mtp_tensors(config) -> dict[str, tuple[int, ...]]:
    """Every exported `mtp.*` name with its shape, from the target config alone (meta device,
    nothing allocated). 397 names for Qwen3-30B-A3B."""
    head_shapes = _covered_head_shapes(config)
    experts = num_experts(config)
    expected: dict[str, tuple[int, ...]] = {}
    for rule in NAME_MAP:
        shape = head_shapes[rule.head]
        if not rule.per_expert:
            expected[rule.exported[0]] = shape
            continue
        n_experts, rows, *rest = shape
        assert n_experts == experts and rows % len(rule.exported) == 0, (rule.head, shape)
        block = (rows // len(rule.exported), *rest)
        for e in range(n_experts):
            for pattern in rule.exported:
                expected[pattern.format(e=e)] = block
    return expected


def head_to_mtp(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head layout -> SGLang names (export direction). Returns views; callers copy."""
    out: dict[str, torch.Tensor] = {}
    for rule in NAME_MAP:
        tensor = state[rule.head]
        if not rule.per_expert:
            out[rule.exported[0]] = tensor
            continue
        for e in range(tensor.shape[0]):
            for pattern, block in zip(rule.exported, tensor[e].chunk(len(rule.exported), dim=0)):
                out[pattern.format(e=e)] = block
    return out


def mtp_to_head(tensors: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """SGLang names -> head layout (load direction): per-expert blocks are concatenated along
    rows and stacked into transformers' fused [E, ...] tensors. Names must already be checked."""
    experts = num_experts(config)
    state: dict[str, torch.Tensor] = {}
    for rule in NAME_MAP:
        if not rule.per_expert:
            state[rule.head] = tensors[rule.exported[0]]
            continue
        state[rule.head] = torch.stack(
            [torch.cat([tensors[pattern.format(e=e)] for pattern in rule.exported], dim=0) for e in range(experts)]
        )
    return state


# ------------------------------------------------------------------------------ validation
def _describe_config(config) -> str:
    return (
        f"hidden_size={config.hidden_size}, num_experts={num_experts(config)}, "
        f"moe_intermediate_size={config.moe_intermediate_size}, "
        f"heads={config.num_attention_heads}/{config.num_key_value_heads}x{config.head_dim}"
    )


def _listing(label: str, items: list[str], limit: int = 20) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"  {label} ({len(items)}): " + ", ".join(items[:limit]) + more


def _check_tensor_set(
    found: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    config,
    dtype: torch.dtype | None = None,
    check_finite: bool = False,
) -> None:
    """Raise ExportError listing missing / unexpected / wrong-shape (/ wrong-dtype / non-finite)
    tensors; silent when `found` is exactly what `expected` says."""
    problems = []
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong_shape = [
        f"{n} got {tuple(t.shape)} expected {expected[n]}"
        for n, t in found.items()
        if n in expected and tuple(t.shape) != tuple(expected[n])
    ]
    if missing:
        problems.append(_listing("missing", missing))
    if unexpected:
        problems.append(_listing("unexpected", unexpected))
    if wrong_shape:
        problems.append(_listing("wrong shape", wrong_shape))
    if dtype is not None:
        wrong_dtype = [f"{n} is {t.dtype}" for n, t in found.items() if t.dtype != dtype]
        if wrong_dtype:
            problems.append(_listing(f"not {dtype}", wrong_dtype))
    if check_finite:
        bad = [n for n, t in found.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            problems.append(_listing("non-finite values (NaN/inf)", bad))
    if problems:
        raise ExportError(
            f"{what} do not fit the target config ({_describe_config(config)}):\n" + "\n".join(problems)
            + "\nCheck that --target is the model the head was trained for."
        )


def check_mtp_tensors(tensors: Mapping[str, torch.Tensor], config, dtype: torch.dtype | None = None) -> None:
    """The gate before writing: `tensors` must be exactly `expected_mtp_tensors(config)`
    (names and shapes), of `dtype` if given, with finite values. Raises ExportError."""
    _check_tensor_set(tensors, expected_mtp_tensors(config), "exported MTP tensors", config, dtype, check_finite=True)


# ------------------------------------------------------------------------------ reading
def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, byte offsets), without
    reading any tensor data."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > os.path.getsize(path) - 8:
                raise ValueError("header length exceeds the file size")
            header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as exc:
        raise ValueError(f"cannot read safetensors file '{path}': {exc} (truncated or not a safetensors file?)") from exc
    header.pop("__metadata__", None)
    return header


def _header_bytes(header: dict) -> int:
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())


def _load_tensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors `names` (all if None) of one safetensors file, with errors that name the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys()) if names is None else names
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, RuntimeError) as exc:  # the library's text says what broke
        raise ValueError(f"cannot read safetensors file '{path}': {exc} (truncated or not a safetensors file?)") from exc


def _read_index(path: Path) -> dict:
    """A `model.safetensors.index.json` as a dict, checked to have a `weight_map` object."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the weight index '{path}': {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ValueError(f"the weight index '{path}' has no weight_map object")
    return index


def _read_mtp_from_index(index_path: Path) -> dict[str, torch.Tensor]:
    """Only the `mtp.*` tensors of an indexed checkpoint, opening only the shards that hold them
    (a merged 235B target has dozens of shards; the MTP layer lives in one or two)."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in _read_index(index_path)["weight_map"].items():
        if name.startswith(MTP_PREFIX):
            by_shard.setdefault(shard, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for shard, names in by_shard.items():
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise ValueError(f"'{index_path}' maps {len(names)} mtp.* tensors to '{shard}', which does not exist")
        tensors.update(_load_tensors(shard_path, names))
    return tensors


def _read_weights(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """('head' | 'mtp', tensors) from any place MTP weights may live."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"'{path}' is not a .safetensors file; MTP weights are read with safetensors only")
        names = list(_safetensors_header(path))
        mtp_names = [n for n in names if n.startswith(MTP_PREFIX)]
        if mtp_names:  # an export, or a merged single-file target: keep only the head's share
            return "mtp", _load_tensors(path, mtp_names)
        return "head", _load_tensors(path)
    if path.is_dir():
        if (path / HEAD_WEIGHTS_NAME).is_file():  # training checkpoint-<step>/ or final/
            return "head", _load_tensors(path / HEAD_WEIGHTS_NAME)
        if (path / INDEX_NAME).is_file():  # sharded export, or a merged target
            tensors = _read_mtp_from_index(path / INDEX_NAME)
        elif (path / SINGLE_WEIGHTS_NAME).is_file():
            file = path / SINGLE_WEIGHTS_NAME
            tensors = _load_tensors(file, [n for n in _safetensors_header(file) if n.startswith(MTP_PREFIX)])
        else:
            raise ValueError(
                f"'{path}' holds no MTP weights: expected {HEAD_WEIGHTS_NAME} (training checkpoint), "
                f"{INDEX_NAME} or {SINGLE_WEIGHTS_NAME} (export or merged target)"
            )
        if not tensors:
            raise ValueError(f"'{path}' has no mtp.* tensors; is it the target model itself rather than an MTP export?")
        return "mtp", tensors
    raise ValueError(f"MTP weights path '{path}' does not exist")


def load_mtp_state(path: str | Path, target_config) -> dict[str, torch.Tensor]:
    """MTP weights as a state dict in the HEAD's layout (fused experts), checked against the
    target config.

    `path` may be an exported draft dir (single file or index), a merged target dir (only the
    `mtp.*` shards are opened), a training `checkpoint-<step>/` or `final/` dir
    (`head.safetensors`), or a single `.safetensors` file in either layout. Tensors keep their
    stored dtype. Raises ValueError (ExportError for a tensor set that does not fit the config).
    """
    path = Path(path)
    layout, tensors = _read_weights(path)
    if layout == "head":
        _check_tensor_set(tensors, _covered_head_shapes(target_config), f"head tensors in '{path}'", target_config)
        return tensors
    _check_tensor_set(tensors, expected_mtp_tensors(target_config), f"mtp.* tensors in '{path}'", target_config)
    return mtp_to_head(tensors, target_config)


def verify_export(path: str | Path, target_config) -> int:
    """Check an existing export (draft dir or merged dir) against the target config: its `mtp.*`
    tensor set must equal the expected names and shapes, all finite. Returns the tensor count;
    raises ExportError listing the differences (what SGLang would silently skip or leave unset)."""
    layout, tensors = _read_weights(Path(path))
    if layout != "mtp":
        raise ExportError(f"'{path}' is a training checkpoint, not an export (no mtp.* names); export it first")
    check_mtp_tensors(tensors, target_config)
    return len(tensors)


def load_into_head(head: nn.Module, path: str | Path) -> nn.Module:
    """Load MTP weights from `path` (any form `load_mtp_state` accepts) into an `MTPHead`,
    strictly, casting to the head's dtype and device. Returns the head."""
    head.load_state_dict(load_mtp_state(path, head.config), strict=True)
    return head


# ------------------------------------------------------------------------------ writing
def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def read_target_config_text(target: Path) -> dict:
    """The target's config.json as its authors wrote it, after checking it is Qwen3-MoE."""
    file = target / "config.json"
    if not file.is_file():
        raise ValueError(f"--target '{target}' has no config.json; point it at the local Qwen3-MoE model dir the head was trained for")
    try:
        with open(file, encoding="utf-8") as f:
            text = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read '{file}': {exc}") from exc
    if text.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"--target '{target}' is model_type={text.get('model_type')!r}; SGLang's Qwen3MoeForCausalLMMTP "
            f"serves {SUPPORTED_MODEL_TYPES} targets only"
        )
    return text


def draft_config_text(target_text: dict) -> dict:
    """The target's config.json with the keys SGLang's NEXTN draft needs added; nothing renamed,
    the architecture unchanged (SGLang maps Qwen3MoeForCausalLM to its MTP class itself)."""
    text = dict(target_text)
    text["num_nextn_predict_layers"] = 1
    if "num_experts" not in text and "num_local_experts" in text:
        # A target re-saved by transformers 5 says only num_local_experts; SGLang's Qwen3-MoE
        # code reads config.num_experts, and older readers would silently default it to 128.
        text["num_experts"] = text["num_local_experts"]
    return text


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _split_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in map order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_shards(
    out_dir: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int, single_name: str, shard_name: str
) -> dict[str, str]:
    """Write `tensors` as one file or as numbered shards; returns the weight map name -> file."""
    shards = _split_shards(tensors, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = single_name if len(shards) == 1 else shard_name.format(i=i, n=len(shards))
        save_file(dict(shard), str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    return weight_map


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _write_draft(tmp: Path, target: Path, target_text: dict, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> None:
    _write_json(tmp / "config.json", draft_config_text(target_text))
    for name in TOKENIZER_FILES:
        if (target / name).is_file():
            shutil.copy2(target / name, tmp / name)
    weight_map = _write_shards(tmp, tensors, max_shard_bytes, SINGLE_WEIGHTS_NAME, SHARD_NAME)
    if len(set(weight_map.values())) > 1:
        _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": _nbytes(tensors)}, "weight_map": weight_map})


@dataclass
class _MergePlan:
    """What a merge will write, worked out (and checked) before anything is written."""

    index: dict  # the target's index JSON, or a new one covering its single file
    target_bytes: int


def _plan_merge(target: Path) -> _MergePlan:
    if (target / INDEX_NAME).is_file():
        index = _read_index(target / INDEX_NAME)
        weight_map = index["weight_map"]
        total = (index.get("metadata") or {}).get("total_size")
        if total is None:  # not every writer records it; the shard headers have the sizes
            total = sum(_header_bytes(_safetensors_header(target / shard)) for shard in set(weight_map.values()))
        target_bytes = int(total)
    elif (target / SINGLE_WEIGHTS_NAME).is_file():
        header = _safetensors_header(target / SINGLE_WEIGHTS_NAME)
        weight_map = {name: SINGLE_WEIGHTS_NAME for name in header}
        target_bytes = _header_bytes(header)
        index = {"metadata": {"total_size": target_bytes}, "weight_map": weight_map}
    else:
        raise ValueError(f"--merge needs a target with safetensors weights; '{target}' has neither {INDEX_NAME} nor {SINGLE_WEIGHTS_NAME}")
    already = sorted(n for n in weight_map if n.startswith(MTP_PREFIX))
    if already:
        raise ValueError(f"--target '{target}' already holds {len(already)} mtp.* tensors (e.g. {already[0]}); merge into the original target instead")
    clash = sorted(p.name for p in target.glob("model-mtp*.safetensors"))
    if clash:
        raise ValueError(f"--target '{target}' already has {clash}; merge into the original target instead")
    return _MergePlan(index=index, target_bytes=target_bytes)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk for a 60 GB target) where the filesystem allows, else copy.
    os.link follows a symlinked source (hub cache snapshots), so the link is to the real blob."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    for entry in sorted(src.iterdir()):
        if entry.name in skip or entry.name.startswith("."):  # .cache/.git of hub downloads
            continue
        if entry.is_dir():
            (dst / entry.name).mkdir()
            _copy_tree(entry, dst / entry.name, skip=set())
        elif entry.name.endswith(WEIGHT_SUFFIXES):
            _link_or_copy(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)


def _write_merged(
    tmp: Path, target: Path, target_text: dict, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int, plan: _MergePlan
) -> None:
    # The target's tensors are never opened: its files are linked or copied byte for byte.
    _copy_tree(target, tmp, skip={"config.json", INDEX_NAME, EXPORT_INFO_NAME})
    _write_json(tmp / "config.json", draft_config_text(target_text))
    mtp_map = _write_shards(tmp, tensors, max_shard_bytes, MERGED_MTP_NAME, MERGED_MTP_SHARD_NAME)
    index = dict(plan.index)
    index["metadata"] = dict(index.get("metadata", {}), total_size=plan.target_bytes + _nbytes(tensors))
    # SGLang reads only the shards named in the index, so the mtp shard MUST be listed here.
    index["weight_map"] = {**index["weight_map"], **mtp_map}
    _write_json(tmp / INDEX_NAME, index)


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _check_out(out: Path, target: Path, checkpoint: Path, force: bool, merge: bool) -> None:
    """Refuse an --out that would clobber work or its own inputs."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out '{out}' exists and is not empty; pass --force to replace it")
    out_r = out.resolve()
    for name, src in (("--target", target), ("--checkpoint", checkpoint)):
        if _is_within(src.resolve(), out_r):
            raise ValueError(f"--out '{out}' would replace {name} '{src}'; write the export somewhere else")
    if merge and _is_within(out_r, target.resolve()):
        raise ValueError(f"--out '{out}' lies inside --target '{target}'; a merged copy must be written outside it")


def _fresh_temp_dir(out: Path) -> Path:
    """A temp dir next to `out` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():  # left by a crashed run of this same pid number
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`: old `out` aside, rename, then delete the old one, so a
    crash leaves either the old or the new export in place, never half of one."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)


def sglang_command(model_path: str | Path, draft_path: str | Path) -> str:
    """The SGLang launch command for a target (or merged dir) and a draft dir (design.md §2)."""
    model = shlex.quote(str(Path(model_path).resolve()))
    draft = shlex.quote(str(Path(draft_path).resolve()))
    return (
        f"python -m sglang.launch_server --model-path {model} --speculative-algorithm NEXTN "
        f"--speculative-draft-model-path {draft} --speculative-num-steps {SGLANG_SPEC_STEPS} "
        f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {SGLANG_SPEC_STEPS + 1}"
    )


def _toolkit_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("qwen3-moe-mtp")
    except importlib.metadata.PackageNotFoundError:  # running from a source checkout
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib  # Python 3.11+

        with open(pyproject, "rb") as f:
            return tomllib.load(f)["project"]["version"]
    except (ImportError, OSError, KeyError):
        return "unknown"


def _source_metadata(checkpoint: Path) -> tuple[dict | None, float | None]:
    """(training config, acceptance length) recorded next to the source weights, if any: the
    run's config.yaml for a training checkpoint, export_info.json for an earlier export."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if (folder / RUN_CONFIG_NAME).is_file():
        with open(folder / RUN_CONFIG_NAME, encoding="utf-8") as f:
            return yaml.safe_load(f), None
    if (folder / EXPORT_INFO_NAME).is_file():
        with open(folder / EXPORT_INFO_NAME, encoding="utf-8") as f:
            info = json.load(f)
        return info.get("training_config"), info.get("acceptance_length")
    return None, None


def export_mtp(
    checkpoint: str | Path,
    target: str | Path,
    out: str | Path,
    merge: bool = False,
    dtype: str = "bf16",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    acceptance_length: float | None = None,
    train_config: Any = None,
) -> Path:
    """Write MTP weights from `checkpoint` as an SGLang NEXTN draft dir (default) or, with
    `merge`, as a copy of the target with an added `mtp` shard. Returns `out`.

    checkpoint: training `checkpoint-<step>/` or `final/`, an earlier export, or a .safetensors file.
    target: the local Qwen3-MoE dir the head was trained for (its config.json and tokenizer).
    Everything is loaded and checked before anything is written; the output is built in a temp
    dir next to `out` and renamed into place. A non-empty `out` needs `force`.
    `train_config` (a dict or dataclass) and `acceptance_length` go into export_info.json; when
    not given they are taken from the run's config.yaml / an earlier export_info.json.
    """
    checkpoint, target, out = Path(checkpoint), Path(target), Path(out)
    torch_dtype = _parse_dtype(dtype)
    target_text = read_target_config_text(target)
    config = load_target_config(str(target))
    _check_out(out, target, checkpoint, force, merge)
    plan = _plan_merge(target) if merge else None

    state = load_mtp_state(checkpoint, config)
    # copy=True: per-expert blocks are views into the fused tensors; each must own its storage
    tensors = {name: t.to(dtype=torch_dtype, copy=True).contiguous() for name, t in head_to_mtp(state).items()}
    del state
    check_mtp_tensors(tensors, config, torch_dtype)

    found_config, found_al = _source_metadata(checkpoint)
    if dataclasses.is_dataclass(train_config) and not isinstance(train_config, type):
        train_config = dataclasses.asdict(train_config)
    command = sglang_command(out if merge else target, out)
    info = {
        "format": "merged-target" if merge else "sglang-nextn-draft",
        "source_checkpoint": str(checkpoint.resolve()),
        "target": str(target.resolve()),
        "training_config": train_config if train_config is not None else found_config,
        "acceptance_length": acceptance_length if acceptance_length is not None else found_al,
        "num_tensors": len(tensors),
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "dtype": _dtype_name(torch_dtype),
        "sglang_command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "toolkit_version": _toolkit_version(),
    }

    tmp = _fresh_temp_dir(out)
    try:
        if merge:
            _write_merged(tmp, target, target_text, tensors, max_shard_bytes, plan)
        else:
            _write_draft(tmp, target, target_text, tensors, max_shard_bytes)
        _write_json(tmp / EXPORT_INFO_NAME, info)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
