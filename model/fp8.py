"""Block-wise FP8 (e4m3) weights as the Qwen3 FP8 releases store them: recognise, quantize, dequantize.

    quant = quantization_of(config)                    # TargetQuantization, or None for a bf16 target
    q_fp8, scale = quantize_block(w, quant.block)      # float8_e4m3fn weight + float32 multipliers
    w = dequantize_block(q_fp8, scale, quant.block, torch.bfloat16)
    plain = dequantize_tensors(tensors, quant.block)   # weight + weight_scale_inv pairs -> weights
    quantize_checkpoint(src, out, block=(128, 128))    # scripts/make_fp8_target.py

The format (Qwen/Qwen3-30B-A3B-FP8, Qwen3-235B-A22B-FP8 and their siblings; DeepSeek-V3's
convention):
- config.json carries `quantization_config = {quant_method: "fp8", fmt: "e4m3",
  activation_scheme: "dynamic", weight_block_size: [128, 128], modules_to_not_convert: [...]}`;
- a quantized linear stores `<name>.weight` as float8_e4m3fn next to `<name>.weight_scale_inv`
  of shape [ceil(out/b0), ceil(in/b1)]. Despite its name the scale is the MULTIPLIER of its
  b0 x b1 block: W ~= float(q) * s (the quantizer divided by it). Qwen3 releases store it in
  bf16, so it is read in whatever dtype it has and cast to float32 before any arithmetic;
- quantized: attention q/k/v/o and every expert's gate/up/down (`QUANTIZED_WEIGHT` below);
  kept bf16: embed_tokens, lm_head, every norm (q_norm/k_norm too) and the router `mlp.gate`.

Quantizing (`quantize_block`): s = amax(|block|) / 448 (e4m3's largest finite value), computed in
float32 and stored as float32 (or the dtype asked for, then used as stored); q = clamp(W / s,
±448) rounded to e4m3. An all-zero block gets s = 1 (any multiplier reproduces zeros, and 0
would be a trap for kernels that take log2 of scales). A last block the dimensions do not fill
(ragged) covers the elements it has.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_SUFFIX = "_scale_inv"  # "<module>.weight" -> "<module>.weight_scale_inv"
QUANTIZATION_KEYS = ("quantization_config", "compression_config")  # where a config.json says it is quantized

# The target weights the Qwen3 FP8 releases quantize: attention projections, routed experts and
# the dense MLP of any `mlp_only_layers`; not the router `mlp.gate`, not norms, not embeddings.
QUANTIZED_WEIGHT = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj|mlp\.(gate|up|down)_proj)\.weight$"
)

_SUPPORTED = ("block-wise FP8: quant_method fp8, fmt e4m3, a weight_block_size, dynamic activations "
              "(the Qwen/Qwen3-*-FP8 releases)")


def scale_name(weight_name: str) -> str:
    """`<module>.weight` -> `<module>.weight_scale_inv`."""
    assert weight_name.endswith(".weight"), weight_name
    return weight_name + SCALE_SUFFIX


def scale_shape(weight_shape, block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of a weight: [..., ceil(out/b0), ceil(in/b1)]."""
    *lead, rows, cols = weight_shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


# ------------------------------------------------------------------------------ recognising
@dataclass(frozen=True)
class TargetQuantization:
    """A block-FP8 checkpoint's scheme, read from its config.json `quantization_config`."""

    block: tuple[int, int]  # weight_block_size: (rows, cols) of one scale's block
    not_converted: tuple[str, ...]  # modules_to_not_convert (or ignored_layers), as written
    config: dict  # the quantization_config exactly as written

    def describe(self) -> str:
        return f"block-FP8 (e4m3, {self.block[0]}x{self.block[1]} blocks)"


def _raw_quantization(config) -> tuple[str | None, object]:
    """(key, value) of the first quantization entry of a config object or config.json dict."""
    for key in QUANTIZATION_KEYS:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if value is not None:
            return key, value
    return None, None


def quantization_of(config) -> TargetQuantization | None:
    """The block-FP8 scheme of a Qwen3-MoE config (a transformers config or config.json dict), or
    None when it carries no quantization. ValueError naming the key for any other scheme."""
    key, qc = _raw_quantization(config)
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not isinstance(qc, Mapping):
        raise ValueError(f"config.json {key} is {qc!r}, not an object; supported: {_SUPPORTED}")
    method = qc.get("quant_method")
    if key != "quantization_config" or method != "fp8":
        raise ValueError(
            f"the target is quantized with {key}.quant_method={method!r}; this toolkit supports {_SUPPORTED}. "
            "Use the model's bf16 release, or dequantize the checkpoint first"
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt={fmt!r} is not supported; supported: {_SUPPORTED}")
    block = qc.get("weight_block_size")
    if block is None:
        raise ValueError("quantization_config has quant_method fp8 but no weight_block_size (per-tensor FP8, "
                         f"weight_scale tensors) which is not supported; supported: {_SUPPORTED}")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size={block!r} must be two positive integers, e.g. [128, 128]")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme={scheme!r} is not supported (static FP8 ships "
                         f"activation scales); supported: {_SUPPORTED}")
    scale_fmt = qc.get("scale_fmt", "float")
    if scale_fmt not in (None, "float"):
        raise ValueError(f"quantization_config.scale_fmt={scale_fmt!r} is not supported; supported: {_SUPPORTED}")
    not_converted = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ()
    return TargetQuantization(block=(int(block[0]), int(block[1])), not_converted=tuple(not_converted), config=dict(qc))


# ------------------------------------------------------------------------------ the math
def quantize_block(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): a weight [..., out, in] as float8_e4m3fn plus its block multipliers
    [..., ceil(out/b0), ceil(in/b1)] in `scale_dtype` (module docstring); leading dims (stacked
    experts) are independent matrices. The division uses `s` as stored, so dequantizing what was
    written gives exactly what this function meant."""
    assert w.ndim >= 2, f"quantize_block takes a weight of 2 or more dims, got {tuple(w.shape)}"
    *lead, rows, cols = w.shape
    b0, b1 = block
    n_r, n_c = math.ceil(rows / b0), math.ceil(cols / b1)
    padded = F.pad(w.float(), (0, n_c * b1 - cols, 0, n_r * b0 - rows))  # zeros do not change an amax
    blocks = padded.reshape(*lead, n_r, b0, n_c, b1)
    amax = blocks.abs().amax(dim=(-3, -1))
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = (blocks / s.float()[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(*lead, n_r * b0, n_c * b1)[..., :rows, :cols].contiguous(), s


def dequantize_block(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32,
                     ) -> torch.Tensor:
    """float(q) * s blockwise, computed in float32 and cast to `dtype`. `q` is [..., out, in], `s`
    [..., ceil(out/b0), ceil(in/b1)] in any float dtype; ValueError when the grid does not fit."""
    rows, cols = q.shape[-2:]
    if tuple(s.shape) != scale_shape(q.shape, block):
        raise ValueError(f"a weight of shape {tuple(q.shape)} with {block[0]}x{block[1]} blocks needs a scale of shape "
                         f"{scale_shape(q.shape, block)}, got {tuple(s.shape)}")
    s_full = s.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)[..., :rows, :cols]
    return (q.float() * s_full).to(dtype)


def fp8_round(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What a weight becomes after quantizing and dequantizing, in its own dtype."""
    q, s = quantize_block(w, block, scale_dtype)
    return dequantize_block(q, s, block, w.dtype)


def dequantize_tensors(tensors: Mapping[str, torch.Tensor], block: tuple[int, int],
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`tensors` with every fp8 `<m>.weight` replaced by its dequantized value (in `dtype`) and
    every `<m>.weight_scale_inv` dropped; other tensors pass through unchanged. ValueError for an
    fp8 weight without its scale, a scale without its weight, or a scale beside a non-fp8 weight."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            weight = name[: -len(SCALE_SUFFIX)]
            if weight not in tensors:
                raise ValueError(f"{name} has no {weight} beside it; the checkpoint is incomplete")
            if tensors[weight].dtype != FP8_DTYPE:
                raise ValueError(f"{weight} is {tensors[weight].dtype} but has a {name}; a scale belongs to a "
                                 "float8_e4m3fn weight (the checkpoint mixes formats)")
            continue
        if t.dtype == FP8_DTYPE:
            scale = scale_name(name)
            if scale not in tensors:
                raise ValueError(f"{name} is float8_e4m3fn but {scale} is missing; without it the weight cannot be "
                                 "dequantized")
            try:
                out[name] = dequantize_block(t, tensors[scale], block, dtype)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        elif t.dtype.is_floating_point and t.element_size() == 1:
            raise ValueError(f"{name} is {t.dtype}; only float8_e4m3fn weights are supported")
        else:
            out[name] = t
    return out


# ------------------------------------------------------------------------------ a model in memory
# transformers' in-memory names of what the Qwen3 FP8 releases quantize; the experts are fused
# (`gate_up_proj` [E, 2I, H] holds each expert's gate rows then its up rows: two matrices)
_IN_MEMORY_QUANTIZED = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj\.weight|mlp\.experts\.(gate_up_proj|down_proj)|mlp\.(gate|up|down)_proj\.weight)$"
)


@torch.no_grad()
def fp8_round_model_(model: torch.nn.Module, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32) -> int:
    """Round, in place, every weight of a `Qwen3MoeForCausalLM` that the Qwen3 FP8 releases
    quantize to what quantize -> dequantize gives (scales rounded to `scale_dtype` as a checkpoint
    would store them): the model then holds what loading a block-FP8 copy of it dequantizes to
    (scripts/bench_decode.py --fp8, tests). Returns how many tensors changed."""
    count = 0
    for name, p in model.named_parameters():
        if not _IN_MEMORY_QUANTIZED.match(name):
            continue
        if name.endswith("gate_up_proj"):
            half = p.shape[-2] // 2
            p[..., :half, :] = fp8_round(p[..., :half, :], block, scale_dtype)
            p[..., half:, :] = fp8_round(p[..., half:, :], block, scale_dtype)
        else:
            p.copy_(fp8_round(p, block, scale_dtype))
        count += 1
    return count


def check_checkpoint(files: Mapping[str, Path], quant: TargetQuantization) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the float8_e4m3fn weights of a block-FP8 checkpoint (`files`: name -> safetensors file,
    model/safetensors_io.weight_map), after checking its headers (no tensor data is read): every
    fp8 weight has its `weight_scale_inv` of the block grid's shape, every scale its fp8 weight.
    ValueError listing the first problems."""
    from model.safetensors_io import read_header

    header: dict[str, dict] = {}
    for file in sorted(set(files.values())):
        header.update({n: h for n, h in read_header(file).items() if n in files})
    problems = []
    fp8 = sorted(n for n, h in header.items() if h["dtype"] == "F8_E4M3")
    for name, h in header.items():
        if h["dtype"].startswith("F8_") and h["dtype"] != "F8_E4M3":
            problems.append(f"{name} is {h['dtype']} (only F8_E4M3 is supported)")
        elif name.endswith(SCALE_SUFFIX):
            weight = name[: -len(SCALE_SUFFIX)]
            if header.get(weight, {}).get("dtype") != "F8_E4M3":
                problems.append(f"{name} has no F8_E4M3 {weight} beside it")
    for name in fp8:
        scale = header.get(scale_name(name)) if name.endswith(".weight") else None
        want = scale_shape(header[name]["shape"], quant.block)
        if scale is None:
            problems.append(f"{name} is F8_E4M3 but has no {name}{SCALE_SUFFIX}")
        elif tuple(scale["shape"]) != want:
            problems.append(f"{name}{SCALE_SUFFIX} has shape {tuple(scale['shape'])}; a {tuple(header[name]['shape'])} "
                            f"weight in {quant.block[0]}x{quant.block[1]} blocks needs {want}")
    if not fp8:
        problems.append("config.json says quant_method fp8 but no weight is F8_E4M3")
    if problems:
        more = f" ... ({len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("the block-FP8 checkpoint does not match its quantization_config: " + "; ".join(problems[:5]) + more)
    return {n: tuple(header[n]["shape"]) for n in fp8}


# ------------------------------------------------------------------------------ a checkpoint
def qwen_fp8_quantization_config(num_layers: int, block: tuple[int, int]) -> dict:
    """A `quantization_config` laid out like the Qwen3 FP8 releases' (keys sorted; lm_head and each
    layer's norms and router listed as not converted)."""
    skipped = ["lm_head"]
    for i in range(num_layers):
        skipped += [f"model.layers.{i}.input_layernorm", f"model.layers.{i}.mlp.gate",
                    f"model.layers.{i}.post_attention_layernorm"]
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "modules_to_not_convert": skipped,
            "quant_method": "fp8", "weight_block_size": list(block)}


def quantize_checkpoint(src: str | Path, out: str | Path, block: tuple[int, int] = (128, 128),
                        scale_dtype: torch.dtype = torch.float32, force: bool = False) -> Path:
    """Write a block-FP8 copy of the bf16/fp32 Qwen3-MoE dir `src` to `out`, laid out as the Qwen3
    FP8 releases: every `QUANTIZED_WEIGHT` becomes float8_e4m3fn plus a `weight_scale_inv` (in
    `scale_dtype`; the releases use bf16) in the same shard, everything else is copied unchanged,
    and config.json gains `qwen_fp8_quantization_config`. Shard by shard, so memory holds one
    shard at a time. Returns `out`."""
    from safetensors.torch import save_file

    from model.atomic import atomic_dir
    from model.safetensors_io import INDEX_NAME, load_tensors, local_model_dir, read_index, weight_map

    src, out = local_model_dir(src), Path(out)
    text = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if text.get("model_type") != "qwen3_moe":
        raise ValueError(f"'{src}' is model_type={text.get('model_type')!r}; quantize_checkpoint writes Qwen3-MoE targets")
    if quantization_of(text) is not None:
        raise ValueError(f"'{src}' is already quantized ({_raw_quantization(text)[0]} in config.json); pass a bf16/fp32 dir")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"'{out}' exists and is not empty; pass force=True (--force) to replace it")
    files = weight_map(src)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    new_map: dict[str, str] = {}
    total = 0
    with atomic_dir(out) as tmp:
        for file, names in sorted(by_file.items()):
            shard: dict[str, torch.Tensor] = {}
            for name, t in load_tensors(file, names).items():
                if QUANTIZED_WEIGHT.match(name):
                    shard[name], shard[scale_name(name)] = quantize_block(t, block, scale_dtype)
                else:
                    shard[name] = t.contiguous()
            save_file(shard, str(tmp / file.name), metadata={"format": "pt"})
            new_map.update({n: file.name for n in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        for entry in sorted(src.iterdir()):
            if entry.is_file() and entry.name not in {"config.json", INDEX_NAME} and entry.suffix != ".safetensors":
                shutil.copy2(entry, tmp / entry.name)
        if (src / INDEX_NAME).is_file():
            index = read_index(src / INDEX_NAME)
            index["metadata"] = dict(index.get("metadata") or {}, total_size=total)
            index["weight_map"] = dict(sorted(new_map.items()))
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        text["quantization_config"] = qwen_fp8_quantization_config(int(text["num_hidden_layers"]), block)
        (tmp / "config.json").write_text(json.dumps(text, indent=2) + "\n", encoding="utf-8")
    return out
