"""MTP weight names, their checks, and reading MTP weights from any place they are kept.

    expected = expected_mtp_tensors(target_config)   # every SGLang `mtp.*` name with its shape
    state = load_mtp_state(path, target_config)      # head-layout state dict from any MTP weights
    head = load_head(path, target_config, device, dtype)
    verify_export(export_dir, target_config)          # what `export_mtp.py --check` runs

Two layouts exist and ONE table, `NAME_MAP`, converts between them in both directions:
- the head's own `state_dict()` (training checkpoints: `head.safetensors`), with transformers'
  fused experts `layers.0.mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and
  `layers.0.mlp.experts.down_proj` [E, H, I];
- SGLang's names: `mtp.` + the head key, with experts split into per-expert 2-D tensors
  `mtp.layers.0.mlp.experts.{e}.gate_proj.weight` [I, H], `up_proj.weight` [I, H],
  `down_proj.weight` [H, I].

Footgun this module exists to close: SGLang's loader skips a name that matches no parameter
SILENTLY, leaving that parameter at its random init. So every set of MTP tensors, written or
read, is checked against `expected_mtp_tensors(config)` (names, shapes; finite values and the
dtype before writing). The writers of export layouts are model/export.py.

Places MTP weights are read from (`load_mtp_state`): a training `checkpoint-<step>/` or
`final/` dir (`head.safetensors`, head layout), an exported draft dir (single file or index),
a merged target (only its `mtp.*` shards are opened), or one `.safetensors` file of either
layout.

FP8 exports (`--quantize fp8`, docs/export.md): the rows of `NAME_MAP` marked `fp8` (attention
q/k/v/o, every expert's gate/up/down) are stored float8_e4m3fn with a float32
`<name>.weight_scale_inv` (model/fp8.py); everything else stays as the target keeps it. Which form
a dir holds is said by its config.json `quantization_config`, and SGLang builds the MTP layer from
that config alone, so `check_export_quantization` refuses a dir whose config and tensors disagree
(both directions load silently wrong in SGLang) and an ignore list that SGLang would apply to a
quantized MTP module. Reading an FP8 export dequantizes it to float32.

Plain single-process code: no accelerate, no DeepSpeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from model.fp8 import (
    FP8_DTYPE, SCALE_SUFFIX, TargetQuantization, dequantize_tensors, fp8_round, quantization_of, quantize_block,
    scale_name, scale_shape,
)
from model.head import MTPHead, head_param_shapes
from model.safetensors_io import INDEX_NAME, SINGLE_WEIGHTS_NAME, load_tensors, read_header, read_index

# What a training checkpoint dir holds (train/checkpoint.py writes them, this module reads them).
HEAD_WEIGHTS_NAME = "head.safetensors"
RUN_CONFIG_NAME = "config.yaml"
MTP_PREFIX = "mtp."


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
    `fp8`: an FP8 export stores these names block-quantized, as the Qwen3 FP8 releases store the
    same weights of the target's layers (module docstring).
    """

    head: str
    exported: tuple[str, ...]
    per_expert: bool = False
    fp8: bool = False


def _row(head: str, exported: str, fp8: bool = False) -> NameRule:
    return NameRule(head, (exported,), fp8=fp8)


NAME_MAP: tuple[NameRule, ...] = (
    # fc [H, 2H]: columns [0:H] act on the embedding half, [H:2H] on the hidden half; the head
    # already stores it in SGLang's order, so no column swap.
    _row("fc.weight", "mtp.fc.weight"),
    _row("pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_embedding.weight"),
    _row("pre_fc_norm_hidden.weight", "mtp.pre_fc_norm_hidden.weight"),
    _row("layers.0.input_layernorm.weight", "mtp.layers.0.input_layernorm.weight"),
    _row("layers.0.self_attn.q_proj.weight", "mtp.layers.0.self_attn.q_proj.weight", fp8=True),
    _row("layers.0.self_attn.k_proj.weight", "mtp.layers.0.self_attn.k_proj.weight", fp8=True),
    _row("layers.0.self_attn.v_proj.weight", "mtp.layers.0.self_attn.v_proj.weight", fp8=True),
    _row("layers.0.self_attn.o_proj.weight", "mtp.layers.0.self_attn.o_proj.weight", fp8=True),
    _row("layers.0.self_attn.q_norm.weight", "mtp.layers.0.self_attn.q_norm.weight"),
    _row("layers.0.self_attn.k_norm.weight", "mtp.layers.0.self_attn.k_norm.weight"),
    _row("layers.0.post_attention_layernorm.weight", "mtp.layers.0.post_attention_layernorm.weight"),
    _row("layers.0.mlp.gate.weight", "mtp.layers.0.mlp.gate.weight"),  # router [E, H]
    # fused [E, 2I, H], gate rows [0:I] first, up rows [I:2I] second (transformers 5 layout)
    NameRule(
        "layers.0.mlp.experts.gate_up_proj",
        ("mtp.layers.0.mlp.experts.{e}.gate_proj.weight", "mtp.layers.0.mlp.experts.{e}.up_proj.weight"),
        per_expert=True,
        fp8=True,
    ),
    # fused [E, H, I]
    NameRule("layers.0.mlp.experts.down_proj", ("mtp.layers.0.mlp.experts.{e}.down_proj.weight",), per_expert=True,
             fp8=True),
    _row("norm.weight", "mtp.norm.weight"),
)


def num_experts(config) -> int:
    """Routed experts of a Qwen3-MoE config object or config.json dict.

    transformers 5 writes `num_local_experts` where the published configs say `num_experts`
    (docs/export.md); either may be the one present.
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


def _exported(config) -> list[tuple[str, tuple[int, ...], NameRule]]:
    """(name, shape, rule) of every exported weight, in NAME_MAP order."""
    head_shapes = _covered_head_shapes(config)
    experts = num_experts(config)
    out = []
    for rule in NAME_MAP:
        shape = head_shapes[rule.head]
        if not rule.per_expert:
            out.append((rule.exported[0], shape, rule))
            continue
        n_experts, rows, *rest = shape
        assert n_experts == experts and rows % len(rule.exported) == 0, (rule.head, shape)
        part = (rows // len(rule.exported), *rest)
        out += [(pattern.format(e=e), part, rule) for e in range(n_experts) for pattern in rule.exported]
    return out


def expected_mtp_tensors(config, block: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Every exported `mtp.*` name with its shape, from the target config alone (meta device,
    nothing allocated). 397 names for Qwen3-30B-A3B; with an FP8 `block`, each `fp8` weight is
    followed by its `weight_scale_inv` (785 names for Qwen3-30B-A3B)."""
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape, rule in _exported(config):
        expected[name] = shape
        if block is not None and rule.fp8:
            expected[scale_name(name)] = scale_shape(shape, block)
    return expected


def fp8_names(config) -> list[str]:
    """The exported names an FP8 export stores block-quantized (NameRule.fp8)."""
    return [name for name, _, rule in _exported(config) if rule.fp8]


def expected_mtp_dtypes(config, dtype: torch.dtype | None, block: tuple[int, int] | None) -> dict[str, torch.dtype]:
    """name -> the dtype an export must store: `dtype` for every tensor (none if None); with an FP8
    `block`, float8_e4m3fn for the quantized weights and float32 for their scales."""
    expected = {n: dtype for n in expected_mtp_tensors(config)} if dtype is not None else {}
    if block is not None:
        for name in fp8_names(config):
            expected[name] = FP8_DTYPE
            expected[scale_name(name)] = torch.float32
    return expected


def quantize_mtp(tensors: Mapping[str, torch.Tensor], config, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """SGLang-named tensors with every `fp8` weight replaced by its float8_e4m3fn value followed by
    its float32 `weight_scale_inv` (model/fp8.quantize_block, from the tensors' own precision)."""
    quantized = set(fp8_names(config))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in quantized:
            out[name], out[scale_name(name)] = quantize_block(t, block)
        else:
            out[name] = t
    return out


def round_to_fp8(state: Mapping[str, torch.Tensor], config, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A head-layout state with every weight an FP8 export quantizes replaced by what quantize ->
    dequantize gives (per exported matrix, so gate and up are rounded apart): the head an FP8
    export of `state` serves. Each tensor keeps its dtype."""
    quantized = set(fp8_names(config))
    mtp = {n: fp8_round(t, block) if n in quantized else t for n, t in head_to_mtp(state).items()}
    return mtp_to_head(mtp, config)


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
    dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    check_finite: bool = False,
) -> None:
    """Raise ExportError listing missing / unexpected / wrong-shape (/ wrong-dtype / non-finite)
    tensors; silent when `found` is exactly what `expected` says. `dtype`: one for all tensors,
    or name -> dtype for the names it lists."""
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
        want = dtype if isinstance(dtype, Mapping) else {n: dtype for n in found}
        wrong_dtype = [f"{n} is {t.dtype}, expected {want[n]}" for n, t in found.items() if n in want and t.dtype != want[n]]
        if wrong_dtype:
            problems.append(_listing("wrong dtype", wrong_dtype))
    if check_finite:  # float8 has no isfinite kernel; its values are finite exactly when their float32 copies are
        bad = [n for n, t in found.items()
               if t.is_floating_point() and not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())]
        if bad:
            problems.append(_listing("non-finite values (NaN/inf)", bad))
    if problems:
        raise ExportError(
            f"{what} do not fit the target config ({_describe_config(config)}):\n" + "\n".join(problems)
            + "\nCheck that --target is the model the head was trained for."
        )


def check_mtp_tensors(tensors: Mapping[str, torch.Tensor], config, dtype: torch.dtype | None = None,
                      block: tuple[int, int] | None = None) -> None:
    """The gate before writing: `tensors` must be exactly `expected_mtp_tensors(config, block)`
    (names and shapes), of `dtype` if given (with an FP8 `block`: fp8 weights float8_e4m3fn, scales
    float32, whatever `dtype` says), with finite values. Raises ExportError."""
    _check_tensor_set(tensors, expected_mtp_tensors(config, block), "exported MTP tensors", config,
                      expected_mtp_dtypes(config, dtype, block), check_finite=True)


# ------------------------------------------------------------------------------ quantization
# SGLang's Qwen3MoeForCausalLMMTP names its one layer `model.layers.0` (checkpoint names have
# "mtp" replaced by "model"). Of its modules, these are built with the draft config's quant
# method (LinearBase / FusedMoE): the fused q/k/v (checked shard by shard), o_proj, the experts.
SGLANG_QUANTIZED_MODULES = (
    "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.experts",
)
# The router is a LinearBase too. Recent SGLang builds it unquantized whatever the config says;
# a version that passes it the quant config keeps it bf16 only when the ignore list names it.
# fc (a plain nn.Linear), the norms and lm_head (replaced by the target's) are never quantized.
SGLANG_ROUTER_MODULE = "model.layers.0.mlp.gate"


def sglang_may_skip(entry: str, module: str) -> bool:
    """Whether some SGLang version leaves `module` unquantized for the ignore-list `entry`: exact
    name, dotted prefix or dotted segment (since PR #23467), plain substring (before it); entries
    count with and without a leading "model.". Substring covers all of them."""
    entry = entry.rstrip(".")
    return bool(entry) and any(form and form in module for form in (entry, entry.removeprefix("model.")))


def sglang_router_listed(not_converted) -> bool:
    """Whether every SGLang version keeps the MTP router bf16 under this ignore list (an exact entry)."""
    return any(e.removeprefix("model.") == SGLANG_ROUTER_MODULE.removeprefix("model.") for e in not_converted)


def _stored_fp8(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, t in tensors.items() if t.dtype == FP8_DTYPE or n.endswith(SCALE_SUFFIX))


def read_export_config(path: str | Path) -> dict | None:
    """The config.json beside MTP weights (in a dir, or next to a .safetensors file), or None."""
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read '{file}': {exc}") from exc


def check_export_quantization(config_text: Mapping | None, tensors: Mapping[str, torch.Tensor], target_config,
                              where: str = "the export") -> TargetQuantization | None:
    """What SGLang makes of an export: its config.json alone decides how the MTP layer is built
    (even `--speculative-draft-model-quantization unquant` does not override it), and a mismatch
    loads without an error and drafts garbage. Checks, raising ExportError:
    - no quantization in config.json: no tensor may be fp8 or a scale;
    - an fp8 quantization_config: every `fp8` weight float8_e4m3fn with its float32 scale of the
      block grid's shape, every other tensor as `expected_mtp_tensors` says; an ignore list that
      skips no quantized MTP module and names the router;
    - the tensor set itself (`expected_mtp_tensors`), finite values.
    Returns the export's quantization (None for a plain export)."""
    try:
        quant = quantization_of(config_text) if config_text is not None else None
    except ValueError as exc:
        raise ExportError(f"{where}: {exc}") from None
    stored = _stored_fp8(tensors)
    if quant is None:
        if stored:
            raise ExportError(
                f"{where} holds {len(stored)} fp8 tensors or scales (e.g. {stored[0]}) but its config.json has no fp8 "
                "quantization_config: SGLang would copy the fp8 values into bf16 parameters unscaled and skip every "
                "weight_scale_inv silently. Export it again (scripts/export_mtp.py, --quantize fp8 keeps the config)"
            )
        check_mtp_tensors(tensors, target_config)
        return None
    plain = [n for n in fp8_names(target_config) if n in tensors and tensors[n].dtype != FP8_DTYPE]
    if plain:
        raise ExportError(
            f"{where}: config.json says quant_method fp8 but {len(plain)} weights SGLang quantizes are stored "
            f"{tensors[plain[0]].dtype} (e.g. {plain[0]}): SGLang would cast them to e4m3 unscaled, with unset scales, "
            "and draft garbage (acceptance near 1). Export it again: the default writes a bf16 draft without "
            "quantization_config, --quantize fp8 a quantized one"
        )
    check_mtp_tensors(tensors, target_config, block=quant.block)
    skipped = [f"{m} (by '{e}')" for m in SGLANG_QUANTIZED_MODULES for e in quant.not_converted if sglang_may_skip(e, m)]
    if skipped:
        raise ExportError(f"{where}: its quantization_config's ignore list makes SGLang build {skipped[0]} unquantized, "
                          "and its fp8 weights would load unscaled; export a bf16 draft (without --quantize) instead")
    if not sglang_router_listed(quant.not_converted):
        raise ExportError(f"{where}: its quantization_config does not list {SGLANG_ROUTER_MODULE} as not converted, so "
                          "an SGLang version that quantizes the router would expect a scale for the bf16 router weight")
    return quant


# ------------------------------------------------------------------------------ reading
def _read_mtp_from_index(index_path: Path) -> dict[str, torch.Tensor]:
    """Only the `mtp.*` tensors of an indexed checkpoint, opening only the shards that hold them
    (a merged 235B target has dozens of shards; the MTP layer lives in one or two)."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in read_index(index_path)["weight_map"].items():
        if name.startswith(MTP_PREFIX):
            by_shard.setdefault(shard, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for shard, names in by_shard.items():
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise ValueError(f"'{index_path}' maps {len(names)} mtp.* tensors to '{shard}', which does not exist")
        tensors.update(load_tensors(shard_path, names))
    return tensors


def _read_weights(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """('head' | 'mtp', tensors) from any place MTP weights may live."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"'{path}' is not a .safetensors file; MTP weights are read with safetensors only")
        names = list(read_header(path))
        mtp_names = [n for n in names if n.startswith(MTP_PREFIX)]
        if mtp_names:  # an export, or a merged single-file target: keep only the head's share
            return "mtp", load_tensors(path, mtp_names)
        return "head", load_tensors(path)
    if path.is_dir():
        if (path / HEAD_WEIGHTS_NAME).is_file():  # training checkpoint-<step>/ or final/
            return "head", load_tensors(path / HEAD_WEIGHTS_NAME)
        if (path / INDEX_NAME).is_file():  # sharded export, or a merged target
            tensors = _read_mtp_from_index(path / INDEX_NAME)
        elif (path / SINGLE_WEIGHTS_NAME).is_file():
            file = path / SINGLE_WEIGHTS_NAME
            tensors = load_tensors(file, [n for n in read_header(file) if n.startswith(MTP_PREFIX)])
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
    stored dtype, except an FP8 export's quantized weights, which are dequantized to float32 with
    the block size of the config.json beside them. Raises ValueError (ExportError for a tensor set
    that does not fit the config).
    """
    path = Path(path)
    layout, tensors = _read_weights(path)
    if layout == "head":
        _check_tensor_set(tensors, _covered_head_shapes(target_config), f"head tensors in '{path}'", target_config)
        return tensors
    where = f"mtp.* tensors in '{path}'"
    if not _stored_fp8(tensors):  # a plain export; one whose config wrongly says fp8 still reads (verify_export refuses it)
        _check_tensor_set(tensors, expected_mtp_tensors(target_config), where, target_config)
        return mtp_to_head(tensors, target_config)
    quant = check_export_quantization(read_export_config(path), tensors, target_config, where)
    return mtp_to_head(dequantize_tensors(tensors, quant.block, torch.float32), target_config)


def verify_export(path: str | Path, target_config) -> int:
    """Check an existing export (draft dir or merged dir) against the target config: its `mtp.*`
    tensor set must equal the expected names and shapes, all finite, and agree with the
    quantization its config.json declares (`check_export_quantization`). Returns the tensor
    count; raises ExportError listing the differences (what SGLang would silently skip, leave
    unset or load wrongly)."""
    layout, tensors = _read_weights(Path(path))
    if layout != "mtp":
        raise ExportError(f"'{path}' is a training checkpoint, not an export (no mtp.* names); export it first")
    check_export_quantization(read_export_config(path), tensors, target_config, f"'{path}'")
    return len(tensors)


def load_into_head(head: nn.Module, path: str | Path) -> nn.Module:
    """Load MTP weights from `path` (any form `load_mtp_state` accepts) into an `MTPHead`,
    strictly, casting to the head's dtype and device. Returns the head."""
    head.load_state_dict(load_mtp_state(path, head.config), strict=True)
    return head


def load_head(path: str | Path, target_config, device, dtype) -> MTPHead:
    """An `MTPHead` on `device` in `dtype` with the weights at `path` (any form
    `load_mtp_state` accepts); ValueError when they are missing or do not fit the config."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"head weights '{path}' do not exist; pass a checkpoint-*/ or final/ dir, "
                         "an exported draft dir or a .safetensors file")
    state = load_mtp_state(path, target_config)
    with torch.device(device):
        head = MTPHead(target_config)
    head.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return head.to(dtype).eval()
