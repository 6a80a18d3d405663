"""Reading parts of safetensors checkpoints: headers, tensor subsets, weight indexes.

    header = read_header(path)                    # names, dtypes, shapes; no tensor data read
    files = weight_map(model_dir)                 # tensor name -> file, single file or indexed
    tensors = read_tensors(files, names)          # only `names`, each file opened once
    tensors = load_tensors(path, names)           # a subset of one file

Every reader of weights in the project goes through this module (the MTP weight loader, the
offline target's embedding and lm_head, the fingerprints of a target), so every failure names
the file and says what is wrong with it. Weights are only ever read as safetensors.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def read_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file ({name: {dtype, shape, data_offsets}}, metadata
    removed), without reading tensor data. ValueError naming the file if it is not one."""
    path = Path(path)
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


def header_bytes(header: dict) -> int:
    """Bytes of tensor data a header describes."""
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())


def load_tensors(path: str | Path, names: list[str] | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors `names` (all if None) of one safetensors file, with errors that name the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = list(f.keys()) if names is None else names
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, RuntimeError) as exc:  # the library's text says what broke
        raise ValueError(f"cannot read safetensors file '{path}': {exc} (truncated or not a safetensors file?)") from exc


def read_index(path: str | Path) -> dict:
    """A `model.safetensors.index.json` as a dict, checked to have a `weight_map` object."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the weight index '{path}': {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ValueError(f"the weight index '{path}' has no weight_map object")
    return index


def local_model_dir(path: str | Path) -> Path:
    """`path` as a local model directory (a path to its config.json is accepted too)."""
    p = Path(path)
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if not (p / "config.json").is_file():
        raise ValueError(
            f"'{path}' is not a local model directory with config.json; this step reads the target "
            "from disk (download it once and point the path at the directory)"
        )
    return p


def weight_map(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a single-file or indexed checkpoint."""
    model_dir = local_model_dir(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        return {name: model_dir / file for name, file in read_index(index)["weight_map"].items()}
    single = model_dir / SINGLE_WEIGHTS_NAME
    if single.is_file():
        return {name: single for name in read_header(single)}
    raise ValueError(
        f"'{model_dir}' has neither {INDEX_NAME} nor {SINGLE_WEIGHTS_NAME}; the target must be a "
        "safetensors checkpoint (save it with save_pretrained)"
    )


def read_tensors(files: dict[str, Path], names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors `names` only, from a `weight_map`, opening each file that holds one of them once."""
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        if not file.is_file():
            raise ValueError(f"the weight index maps {file_names[:3]} to '{file}', which does not exist")
        out.update(load_tensors(file, file_names, device))
    return out


def sample_rows(path: str | Path, name: str, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """(shape, tensors): `n` evenly spaced rows of a 2-D tensor (the whole tensor if 1-D), read
    without loading the rest; what a weights fingerprint hashes."""
    try:
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice(name)
            shape = list(sl.get_shape())
            if len(shape) < 2:
                return shape, [sl[:]]
            rows = sorted({int(r) for r in np.linspace(0, shape[0] - 1, n)})
            return shape, [sl[r: r + 1] for r in rows]
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"cannot read '{name}' from safetensors file '{path}': {exc}") from exc
