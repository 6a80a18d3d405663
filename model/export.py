"""Write a trained MTP head as SGLang NEXTN draft weights: a draft dir, or a merged target.

    python scripts/export_mtp.py --checkpoint runs/tiny/final --target artifacts/tiny-target \
        --out artifacts/tiny-mtp [--merge] [--dtype bf16|fp16|fp32] [--quantize fp8] [--force]

    export_mtp(checkpoint, target, out)          # what training calls at its end

The names, their checks and the readers are model/mtp_weights.py; this module only writes.
Everything is loaded and checked before a byte is written (`check_mtp_tensors`: exactly the
names and shapes SGLang loads, finite values), then the output is built in a temp dir and
renamed into place (model/atomic.py).

Block-FP8 targets (docs/export.md, "FP8 targets"): SGLang builds the draft's MTP layer from the
draft dir's own config.json, so that config must say exactly what the tensors are. Default: a
bf16 draft whose config.json has the target's quantization removed, served with
`--speculative-draft-model-quantization unquant`. `quantize="fp8"`: the MTP layer's attention and
experts quantized to the target's block scheme, the target's quantization_config kept (the only
form `merge` accepts for an FP8 target: a merged dir has one config.json for both).

Plain single-process code: no accelerate, no DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors.torch import save_file

from model.atomic import atomic_dir
from model.fp8 import QUANTIZATION_KEYS, QUANTIZED_WEIGHT, SCALE_SUFFIX, TargetQuantization, quantization_of
from model.mtp_weights import (
    MTP_PREFIX, RUN_CONFIG_NAME, SGLANG_ROUTER_MODULE, check_export_quantization, check_mtp_tensors, head_to_mtp,
    load_mtp_state, quantize_mtp, sglang_router_listed,
)
from model.safetensors_io import INDEX_NAME, SINGLE_WEIGHTS_NAME, header_bytes, read_header, read_index, weight_map
from model.target import SUPPORTED_MODEL_TYPES, load_target_config
from model.token_map import load_token_map, token_map_info

EXPORT_INFO_NAME = "export_info.json"
TOKEN_MAP_NAME = "hot_token_map.pt"  # an export's draft vocabulary (--token-map): SGLang's --speculative-token-map
SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"
MERGED_MTP_NAME = "model-mtp.safetensors"
MERGED_MTP_SHARD_NAME = "model-mtp-{i:05d}-of-{n:05d}.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZE = ("none", "fp8")  # --quantize: none = a plain draft; fp8 = the target's block-FP8 scheme
# Copied into the draft dir when the target has them; SGLang reads the tokenizer from the target,
# but a self-describing draft dir is easier to move around and inspect.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
    "generation_config.json",
)
# Files of a target that are hard-linked (not copied) into a merged dir.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# Chain drafting of 3 tokens, one candidate per step: the serve command printed with every export.
SGLANG_SPEC_STEPS = 3


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


def draft_quantization_config(target_quant: TargetQuantization) -> dict:
    """An FP8 export's quantization_config: the target's as written (its ignore list names no
    quantized module of the MTP layer, which SGLang calls `model.layers.0.*` like the target's
    first layer: `check_export_quantization` verifies it), plus the MTP router when the list
    does not name it exactly (module docstring of model/mtp_weights.py's quantization section)."""
    qc = dict(target_quant.config)
    if not sglang_router_listed(target_quant.not_converted):
        key = "ignored_layers" if "ignored_layers" in qc and "modules_to_not_convert" not in qc else "modules_to_not_convert"
        qc[key] = list(qc.get(key) or []) + [SGLANG_ROUTER_MODULE]
    return qc


def draft_config_text(target_text: dict, quantization: dict | None = None) -> dict:
    """The target's config.json with the keys SGLang's NEXTN draft needs added; nothing renamed,
    the architecture unchanged (SGLang maps Qwen3MoeForCausalLM to its MTP class itself). The
    target's quantization keys are removed, and `quantization` (an FP8 export's
    quantization_config) put in their place when given."""
    text = {k: v for k, v in target_text.items() if k not in QUANTIZATION_KEYS}
    if quantization is not None:
        text["quantization_config"] = quantization
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


def _write_draft(tmp: Path, target: Path, draft_text: dict, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> None:
    _write_json(tmp / "config.json", draft_text)
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
        index = read_index(target / INDEX_NAME)
        weight_map = index["weight_map"]
        total = (index.get("metadata") or {}).get("total_size")
        if total is None:  # not every writer records it; the shard headers have the sizes
            total = sum(header_bytes(read_header(target / shard)) for shard in set(weight_map.values()))
        target_bytes = int(total)
    elif (target / SINGLE_WEIGHTS_NAME).is_file():
        header = read_header(target / SINGLE_WEIGHTS_NAME)
        weight_map = {name: SINGLE_WEIGHTS_NAME for name in header}
        target_bytes = header_bytes(header)
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
    tmp: Path, target: Path, draft_text: dict, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int, plan: _MergePlan
) -> None:
    # The target's tensors are never opened: its files are linked or copied byte for byte.
    _copy_tree(target, tmp, skip={"config.json", INDEX_NAME, EXPORT_INFO_NAME})
    _write_json(tmp / "config.json", draft_text)
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


def sglang_command(model_path: str | Path, draft_path: str | Path, unquantized_draft: bool = False,
                   token_map: str | Path | None = None) -> str:
    """The SGLang launch command for a target (or merged dir) and a draft dir (docs/export.md).
    `unquantized_draft`: a bf16 draft for a quantized target; the draft would otherwise inherit the
    target's `--quantization` (or, on sm100, the quantization SGLang reads from the target's config).
    `token_map`: a draft vocabulary file (model/token_map.py) for --speculative-token-map."""
    model = shlex.quote(str(Path(model_path).resolve()))
    draft = shlex.quote(str(Path(draft_path).resolve()))
    unquant = " --speculative-draft-model-quantization unquant" if unquantized_draft else ""
    hot = f" --speculative-token-map {shlex.quote(str(Path(token_map).resolve()))}" if token_map else ""
    return (
        f"python -m sglang.launch_server --model-path {model} --speculative-algorithm NEXTN "
        f"--speculative-draft-model-path {draft} --speculative-num-steps {SGLANG_SPEC_STEPS} "
        f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {SGLANG_SPEC_STEPS + 1}{unquant}{hot}"
    )


def _check_fp8_scheme(target: Path) -> None:
    """--quantize fp8 writes the Qwen3 FP8 releases' scheme for the MTP layer (attention and experts
    quantized, router, norms and fc bf16); refuse a target whose own layers are quantized otherwise."""
    names = set(weight_map(target))
    scaled = {n[: -len(SCALE_SUFFIX)] for n in names if n.endswith(SCALE_SUFFIX)}
    quantizable = {n for n in names if QUANTIZED_WEIGHT.match(n)}
    differ = sorted(scaled ^ quantizable)
    if differ:
        state = "quantized" if differ[0] in scaled else "not quantized"
        raise ValueError(
            f"--quantize fp8 writes the Qwen3 FP8 scheme (attention q/k/v/o and experts block-FP8; router, norms "
            f"and fc bf16), but --target '{target}' quantizes its layers differently ({differ[0]} is {state}, "
            f"{len(differ)} such weights); export a bf16 draft (without --quantize) instead"
        )


@dataclass
class ExportPlan:
    """What an export will write for a target, decided from its config before any weight is read."""

    target_quantization: TargetQuantization | None  # the target's block-FP8 scheme, None for bf16
    quantize: bool  # True: the MTP layer's attention and experts block-FP8 (--quantize fp8)

    def draft_quantization(self) -> dict | None:
        return draft_quantization_config(self.target_quantization) if self.quantize else None


def plan_export(target: str | Path, merge: bool = False, quantize: str | None = None) -> ExportPlan:
    """Check the export settings against the target (train/train_mtp.py calls this before training,
    so a setting that cannot work fails in seconds, not after the run). ValueError with the fix."""
    target = Path(target)
    quantize = quantize or "none"
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {QUANTIZE}")
    quant = quantization_of(read_target_config_text(target))
    if quantize == "fp8":
        if quant is None:
            raise ValueError(f"--quantize fp8 quantizes the MTP layer to the target's block-FP8 scheme, and --target "
                             f"'{target}' has no quantization_config; export a bf16 draft (without --quantize)")
        _check_fp8_scheme(target)
    elif merge and quant is not None:
        raise ValueError(
            f"--merge into the block-FP8 target '{target}' needs --quantize fp8: a merged dir has one config.json, and "
            "with the target's fp8 quantization_config SGLang would build a bf16 MTP layer as FP8 and load it wrongly "
            "(silently). Pass --quantize fp8, or export a bf16 draft dir (without --merge)"
        )
    return ExportPlan(target_quantization=quant, quantize=quantize == "fp8")


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
    quantize: str | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    acceptance_length: float | None = None,
    train_config: Any = None,
    run_id: str | None = None,
    token_map: str | Path | None = None,
) -> Path:
    """Write MTP weights from `checkpoint` as an SGLang NEXTN draft dir (default) or, with
    `merge`, as a copy of the target with an added `mtp` shard. Returns `out`.

    checkpoint: training `checkpoint-<step>/` or `final/`, an earlier export, or a .safetensors file.
    target: the local Qwen3-MoE dir the head was trained for (its config.json and tokenizer).
    quantize: None/"none" (every tensor in `dtype`; a block-FP8 target's quantization_config is
    removed from the draft's config.json) or "fp8" (the MTP layer's attention and experts in the
    target's block-FP8 scheme from the checkpoint's own precision, the rest in `dtype`; the
    target's quantization_config kept). `plan_export` says which settings a target accepts.
    Everything is loaded and checked before anything is written; the output is built in a temp
    dir next to `out` and renamed into place. A non-empty `out` needs `force`.
    `train_config` (a dict or dataclass) and `acceptance_length` go into export_info.json; when
    not given they are taken from the run's config.yaml / an earlier export_info.json. `run_id`
    (training's export) is recorded too, so a rerun of the same run recognises its own export.
    `token_map`: a draft vocabulary file (scripts/build_token_map.py), checked against the target's
    vocabulary and copied into `out` as TOKEN_MAP_NAME; the SGLang command passes it.
    """
    checkpoint, target, out = Path(checkpoint), Path(target), Path(out)
    torch_dtype = _parse_dtype(dtype)
    target_text = read_target_config_text(target)
    config = load_target_config(str(target))
    export_plan = plan_export(target, merge, quantize)
    _check_out(out, target, checkpoint, force, merge)
    plan = _plan_merge(target) if merge else None
    hot = None if token_map is None else load_token_map(token_map, config.vocab_size)

    state = load_mtp_state(checkpoint, config)
    mtp = head_to_mtp(state)
    check_mtp_tensors(mtp, config)  # names, shapes and finite values of the source, before any rounding
    draft_quantization = export_plan.draft_quantization()
    block = export_plan.target_quantization.block if export_plan.quantize else None
    if block is not None:  # quantized from the checkpoint's own precision, not from a `dtype` copy
        mtp = quantize_mtp(mtp, config, block)
    # fp8 weights and their scales are new tensors already; copy=True for the rest: per-expert
    # blocks are views into the fused tensors, and each must own its storage
    scales = [n for n in mtp if n.endswith(SCALE_SUFFIX)]
    as_stored = set(scales) | {n[: -len(SCALE_SUFFIX)] for n in scales}
    tensors = {name: t if name in as_stored else t.to(dtype=torch_dtype, copy=True).contiguous()
               for name, t in mtp.items()}
    del state, mtp
    check_mtp_tensors(tensors, config, torch_dtype, block)
    draft_text = draft_config_text(target_text, draft_quantization)
    # what SGLang will make of it: config and tensors agree, the ignore list spares the fp8 modules
    check_export_quantization(draft_text, tensors, config, "the export")

    found_config, found_al = _source_metadata(checkpoint)
    if dataclasses.is_dataclass(train_config) and not isinstance(train_config, type):
        train_config = dataclasses.asdict(train_config)
    unquantized_draft = export_plan.target_quantization is not None and not export_plan.quantize
    command = sglang_command(out if merge else target, out, unquantized_draft=unquantized_draft,
                             token_map=out / TOKEN_MAP_NAME if hot is not None else None)
    training_config = train_config if train_config is not None else found_config
    info = {
        "format": "merged-target" if merge else "sglang-nextn-draft",
        "source_checkpoint": str(checkpoint.resolve()),
        "target": str(target.resolve()),
        "training_config": training_config,
        "acceptance_length": acceptance_length if acceptance_length is not None else found_al,
        "num_tensors": len(tensors),
        "num_parameters": sum(t.numel() for name, t in tensors.items() if not name.endswith(SCALE_SUFFIX)),
        "dtype": _dtype_name(torch_dtype),
        # how the training rows were rendered (data.enable_thinking; null = the template's default):
        # the head fits a server that renders requests the same way
        "thinking": ((training_config or {}).get("data") or {}).get("enable_thinking"),
        "quantization": export_plan.target_quantization.describe() if export_plan.quantize else None,
        "target_quantization": export_plan.target_quantization.describe() if export_plan.target_quantization else None,
        "sglang_command": command,
        "token_map": None if hot is None else {**token_map_info(token_map, hot), "path": TOKEN_MAP_NAME,
                                               "source": str(Path(token_map).resolve())},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "toolkit_version": _toolkit_version(),
        **({"run_id": run_id} if run_id else {}),
    }

    with atomic_dir(out) as tmp:  # a crash leaves the old export or the new one, never half
        if merge:
            _write_merged(tmp, target, draft_text, tensors, max_shard_bytes, plan)
        else:
            _write_draft(tmp, target, draft_text, tensors, max_shard_bytes)
        if hot is not None:
            shutil.copyfile(token_map, tmp / TOKEN_MAP_NAME)  # the bytes the recorded sha256 names
        _write_json(tmp / EXPORT_INFO_NAME, info)
    return out
