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

Plain single-process code: no accelerate, no DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

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
