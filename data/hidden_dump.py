"""Write a hidden-state dump: run the frozen target once over a chat dataset, store h_t.

    python scripts/dump_hidden_states.py --target artifacts/tiny-target --data sharegpt-package \
        --limit 600 --max-length 256 --out artifacts/tiny-hidden
    # several processes (one GPU each; on CPU add --multi_gpu, which only picks torchrun):
    accelerate launch --num_processes 8 scripts/dump_hidden_states.py ... --out /data/hidden

How it works, so that any number of processes writes the same dump and a killed one resumes:
- The shards are planned before any forward: shard i holds the rows [row_start, row_end) found by
  filling `shard_tokens` tokens in dataset order (`plan_shards`). A shard's rows are batched
  among themselves (sorted by length), so its bytes depend on the shard alone, not on which
  process computed it or what ran before.
- Everything is written into `.<out>.tmp-dump` next to `out`: `plan.json` (the settings the
  shards belong to), each shard atomically, then its sidecar `shard-*.safetensors.done.json`
  (size and sha256). A rerun with the same settings keeps every shard whose sidecar verifies and
  computes the rest; other settings are refused while the temp dir exists.
- The processes split the shards still to do round-robin; rank 0 writes `manifest.json` last,
  drops the sidecars and renames the temp dir to `out`.
- Before any forward, the disk the dump still needs is estimated, printed, and compared with the
  free space of `out`'s filesystem (refused if it does not fit, unless `disk_check=False`).

The layout, the reader and the compatibility check are data/hidden_states.py.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

from data.chat import build_chat_dataset
from data.fingerprints import RowsHasher, sha256_file, source_fingerprint, target_fingerprint, tokenizer_fingerprint
from data.hidden_states import (
    DEFAULT_SHARD_TOKENS, DTYPE_NAMES, FP8, FORMAT_NAME, MANIFEST_NAME, SHARD_NAME, STORAGE_BYTES, STORAGES,
    quantize_fp8, storage_version,
)
from model.atomic import atomic_write_bytes, atomic_write_text, replace_dir, temp_path

RESUME_TAG = "dump"  # the temp dir is `.<out>.tmp-dump`: a fixed name, so that a rerun finds it
PLAN_NAME = "plan.json"
DONE_SUFFIX = ".done.json"
TOKENIZED_DIR = "tokenized"  # rank 0 tokenizes once, the other ranks (and a resumed run) load


# ------------------------------------------------------------------------------ processes
def init_dump_processes(device: str) -> torch.device:
    """This process's device; under `accelerate launch` / torchrun (WORLD_SIZE > 1) it also joins
    the process group. The ranks exchange only small Python objects (the plan, an error) and wait
    at a few barriers, so the group is gloo on GPUs too: no GPU collective is needed, and gloo
    waits as long as rank 0 takes to tokenize the data."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    return dev


def close_dump_processes() -> None:
    """Leave the process group `init_dump_processes` joined (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Ranks:
    """Rank, world size and the two collectives the dump needs (no-ops in one process)."""

    def __init__(self):
        on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if on else 0
        self.world = dist.get_world_size() if on else 1

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_rank0(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def raise_if(self, error: str | None) -> None:
        """Rank 0 decided whether to stop; every rank raises the same ValueError (none hangs)."""
        error = self.from_rank0(error)
        if error:
            raise ValueError(error)


# ------------------------------------------------------------------------------ planning
def check_out(out: str | Path, force: bool) -> None:
    """Refuse an existing `out` without `force`, and an output location that cannot be written;
    cheap, so the script calls it before the target loads."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out '{out}' is a file; choose a directory path")
    if out.exists() and not force:
        raise ValueError(f"'{out}' exists; pass --force to replace it (once the new dump is complete) or choose another --out")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to '{parent}' (for --out '{out}'); choose a writable --out")


def plan_shards(lengths: list[int], shard_tokens: int) -> list[dict]:
    """Shard entries {file, row_start, row_end, tokens}: rows in dataset order, a shard closed as
    soon as it holds >= shard_tokens tokens."""
    shards, start, tokens = [], 0, 0
    for r, n in enumerate(lengths):
        tokens += n
        if tokens >= shard_tokens or r == len(lengths) - 1:
            shards.append({"file": SHARD_NAME.format(i=len(shards)), "row_start": start, "row_end": r + 1, "tokens": tokens})
            start, tokens = r + 1, 0
    return shards


def estimate_bytes(shards: list[dict], hidden_size: int, storage: str, topk: int, dtype: torch.dtype) -> int:
    """Bytes the shards take on disk: per token h_t (+ its fp8 scale), the id and the mask, the
    top-k ids and log-probs; per row an offset; per shard a safetensors header (<= 1 KiB)."""
    per_token = hidden_size * STORAGE_BYTES[storage] + (4 if storage == FP8 else 0) + 4 + 1
    per_token += topk * (4 + torch.finfo(dtype).bits // 8)
    rows = sum(s["row_end"] - s["row_start"] + 1 for s in shards)
    return sum(s["tokens"] for s in shards) * per_token + rows * 8 + len(shards) * 1024


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem holding `path` (tests replace it)."""
    return shutil.disk_usage(path).free


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ; the shard list only when nothing else explains it."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix + k)
    return [k for k in keys if k != "shards"] or keys


# ------------------------------------------------------------------------------ computing
@torch.no_grad()
def _topk_logprobs(lm_head, hidden_NH: torch.Tensor, k: int, chunk: int = 4096):
    """Top-k ids and log-probabilities of softmax(lm_head(h)) in fp32, chunked over tokens."""
    ids, lps = [], []
    for s in range(0, hidden_NH.shape[0], chunk):
        logp = F.log_softmax(lm_head(hidden_NH[s : s + chunk]).float(), dim=-1)
        v, i = logp.topk(k, dim=-1)
        ids.append(i.to(torch.int32))
        lps.append(v)
    return torch.cat(ids), torch.cat(lps)


@torch.no_grad()
def _shard_tensors(target, ds, shard: dict, *, batch_size: int, pad_id: int, dtype: torch.dtype, storage: str,
                   topk: int, on_rows: Callable[[int], None]) -> dict[str, torch.Tensor]:
    """The tensors of one shard (layout in data/hidden_states.py). Its rows are batched among
    themselves, longest first (less padding); right padding with a causal mask never changes a
    real token's h_t."""
    device = target.device
    idx = list(range(shard["row_start"], shard["row_end"]))
    rows = {i: ds[i] for i in idx}
    by_length = sorted(idx, key=lambda i: -len(rows[i]["input_ids"]))
    out: dict[int, dict] = {}
    for b in range(0, len(idx), batch_size):
        batch_idx = by_length[b : b + batch_size]
        T = len(rows[batch_idx[0]]["input_ids"])
        input_ids_BT = torch.full((len(batch_idx), T), pad_id, dtype=torch.long)
        attn_BT = torch.zeros((len(batch_idx), T), dtype=torch.long)
        for j, i in enumerate(batch_idx):
            n = len(rows[i]["input_ids"])
            input_ids_BT[j, :n] = torch.tensor(rows[i]["input_ids"])
            attn_BT[j, :n] = 1
        hidden_BTH = target.hidden(input_ids_BT.to(device), attn_BT.to(device))
        for j, i in enumerate(batch_idx):
            h_TH = hidden_BTH[j, : len(rows[i]["input_ids"])]
            row = {}
            if storage == FP8:
                codes, scale = quantize_fp8(h_TH)
                row["hidden"], row["hidden_scale"] = codes.cpu(), scale.cpu()
            else:
                row["hidden"] = h_TH.to("cpu", STORAGES[storage])
            if topk:
                ids, lps = _topk_logprobs(target.lm_head, h_TH, topk)
                row["topk_ids"], row["topk_logprobs"] = ids.cpu(), lps.to("cpu", dtype)
            out[i] = row
        on_rows(len(batch_idx))
    lengths = [len(rows[i]["input_ids"]) for i in idx]
    tensors = {
        "input_ids": torch.tensor(np.concatenate([np.asarray(rows[i]["input_ids"], dtype=np.int32) for i in idx])),
        "loss_mask": torch.tensor(np.concatenate([np.asarray(rows[i]["loss_mask"], dtype=np.uint8) for i in idx])),
        "offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),
    }
    for key in out[idx[0]]:
        tensors[key] = torch.cat([out[i][key] for i in idx]).contiguous()
    return tensors


def _write_shard(tmp: Path, shard: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The shard file, then its sidecar (both atomic); returns the manifest entry."""
    data = safetensors_bytes(tensors, metadata={"format": FORMAT_NAME})
    entry = {**shard, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(tmp / shard["file"], data)
    atomic_write_text(tmp / (shard["file"] + DONE_SUFFIX), json.dumps(entry, indent=2))
    return entry


def _done_entry(tmp: Path, shard: dict, verify: bool) -> dict | None:
    """The sidecar's entry when the shard was completed (and, with `verify`, its file still has
    the recorded size and sha256); None when it must be computed."""
    sidecar = tmp / (shard["file"] + DONE_SUFFIX)
    if not sidecar.is_file():
        return None
    try:
        entry = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        entry = None
    if not isinstance(entry, dict) or {k: entry.get(k) for k in shard} != shard:
        warnings.warn(f"'{sidecar}' is damaged or belongs to another plan; computing {shard['file']} again", stacklevel=2)
        return None
    if verify:
        file = tmp / shard["file"]
        size = file.stat().st_size if file.is_file() else -1
        if size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            warnings.warn(f"'{file}' does not match its sidecar ({size} of {entry['bytes']} bytes, or another sha256); "
                          "computing it again", stacklevel=2)
            return None
    return entry


# ------------------------------------------------------------------------------ the dump
@torch.no_grad()
def dump_hidden_states(
    target,
    tokenizer,
    *,
    target_path: str | Path,
    source: str,
    out: str | Path,
    max_length: int,
    limit: int | None = None,
    enable_thinking: bool | None = None,
    batch_size: int = 8,
    topk: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    dtype: torch.dtype | None = None,
    storage: str | None = None,
    num_proc: int = 1,
    force: bool = False,
    disk_check: bool = True,
    progress: bool = True,
    on_shard: Callable[[dict], None] | None = None,
) -> dict:
    """Run `target` (a FrozenTarget) over `build_chat_dataset(source, tokenizer, max_length, limit,
    enable_thinking=...)` (rows rendered as data.enable_thinking renders them) and write the dump to `out`; returns the manifest. Every process of a distributed run calls it
    (`init_dump_processes` first); each computes its share of the shards.

    `dtype` is the compute dtype (the target's by default) and what the reader returns; `storage`
    (bf16, fp32, fp8_e4m3; default: dtype) is how h_t is stored. `on_shard(entry)` is called after
    each shard this process writes. An interrupted dump keeps its temp dir; calling again with the
    same settings resumes it.
    """
    from tqdm.auto import tqdm

    ranks = _Ranks()
    out = Path(out)
    check_out(out, force)
    if batch_size < 1 or shard_tokens < 1 or topk < 0:
        raise ValueError(f"batch_size={batch_size} and shard_tokens={shard_tokens} must be >= 1, topk={topk} >= 0")
    if topk > target.config.vocab_size:
        raise ValueError(f"--topk-logits {topk} exceeds the vocabulary ({target.config.vocab_size})")
    dtype = dtype or target.lm_head.weight.dtype
    storage = storage or DTYPE_NAMES[dtype]
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r} unknown; choose one of {sorted(STORAGES)}")
    fingerprint = target_fingerprint(target_path)  # fails early for a target that is not a local dir
    tmp = temp_path(out, RESUME_TAG)
    if ranks.rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    ranks.barrier()

    # rank 0 tokenizes into the temp dir, the others load its result
    ds = report = None
    for turn in (0, 1):
        if (ranks.rank == 0) == (turn == 0):
            ds, report = build_chat_dataset(source, tokenizer, max_length, limit=limit, num_proc=num_proc,
                                            cache_dir=tmp / TOKENIZED_DIR, enable_thinking=enable_thinking)
        ranks.barrier()
    lengths = ds["length"]
    shards = plan_shards(lengths, shard_tokens)
    plan = {
        "format": FORMAT_NAME, "target": {"path": str(target_path), **fingerprint}, "dtype": DTYPE_NAMES[dtype],
        "storage": storage, "topk": topk, "shard_tokens": shard_tokens,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "size": len(tokenizer)},
        "data": {"source": source, "source_fingerprint": source_fingerprint(source), "limit": limit,
                 "max_length": max_length, "enable_thinking": enable_thinking, "rows": len(ds),
                 "tokens": int(sum(lengths))},
        "shards": shards,
    }

    # rank 0: the plan of an unfinished dump must be this one; what is left must fit on the disk
    error = done = None
    if ranks.rank == 0:
        plan_file = tmp / PLAN_NAME
        old = json.loads(plan_file.read_text(encoding="utf-8")) if plan_file.is_file() else None
        if old is not None and old != plan:
            keys = _differing_keys(old, plan)
            error = (f"'{tmp}' holds an unfinished dump with other settings ({', '.join(keys)} differ); re-run with "
                     "the same --target, --data, --limit, --max-length, --shard-tokens, --dtype, --storage and "
                     f"--topk-logits to resume it, or delete '{tmp}' to start over")
        else:
            atomic_write_text(plan_file, json.dumps(plan, indent=2))
            done = [i for i, s in enumerate(shards) if _done_entry(tmp, s, verify=False)]
            left = [s for i, s in enumerate(shards) if i not in set(done)]
            need, free = estimate_bytes(left, fingerprint["hidden_size"], storage, topk, dtype), free_bytes(tmp)
            resumed = f", {len(done)} already written in '{tmp}'" if done else ""
            print(f"dump: {len(ds)} rows, {plan['data']['tokens']:,} tokens, {len(shards)} shards{resumed}; "
                  f"h_t {fingerprint['hidden_size']} x {STORAGE_BYTES[storage]} bytes ({storage}) a token; "
                  f"needs {_size(need)}{' more' if done else ''} on disk, {_size(free)} free on '{out.absolute().parent}'",
                  flush=True)
            if disk_check and need > free:
                error = (f"the dump needs {_size(need)} but only {_size(free)} are free on the filesystem of "
                         f"'{out.absolute().parent}'; free space, choose another --out, dump fewer rows (--limit), "
                         "use --storage fp8 (H + 4 bytes a token, half of bf16), or pass --no-disk-check")
    ranks.raise_if(error)
    done = set(ranks.from_rank0(done))

    # each rank computes its share of the shards left and verifies its share of those written
    # (one that fails verification is computed again by the rank that checked it)
    mine = [i for i in range(len(shards)) if i not in done][ranks.rank :: ranks.world]
    mine += [i for i in sorted(done)[ranks.rank :: ranks.world] if _done_entry(tmp, shards[i], verify=True) is None]
    mine.sort()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total = sum(shards[i]["row_end"] - shards[i]["row_start"] for i in mine)
    bar = tqdm(total=total, desc=f"hidden states (rank {ranks.rank} of {ranks.world})" if ranks.world > 1 else "hidden states",
               unit="row", disable=not progress or ranks.rank != 0, dynamic_ncols=True)
    for i in mine:
        tensors = _shard_tensors(target, ds, shards[i], batch_size=batch_size, pad_id=pad_id, dtype=dtype,
                                 storage=storage, topk=topk, on_rows=bar.update)
        entry = _write_shard(tmp, shards[i], tensors)
        if on_shard is not None:
            on_shard(entry)
    bar.close()
    if ranks.world > 1:
        print(f"rank {ranks.rank}: wrote {len(mine)} of {len(shards)} shards ({total} rows)", flush=True)
    ranks.barrier()

    # rank 0 writes the manifest last and moves the finished dump into place
    manifest = None
    if ranks.rank == 0:
        entries = [_done_entry(tmp, s, verify=False) for s in shards]
        assert all(entries), "a shard has no sidecar after every rank finished"
        ids_hash = RowsHasher()
        for start in range(0, len(ds), 4096):
            for ids in ds[start : start + 4096]["input_ids"]:
                ids_hash.update(ids)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": storage_version(storage),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": plan["target"],
            "dtype": DTYPE_NAMES[dtype],
            "storage": storage,
            "tokenizer": plan["tokenizer"],
            "data": {**plan["data"], "input_ids_sha256": ids_hash.hexdigest(), "skip_report": report.as_dict()},
            "topk": topk,
            "shards": entries,
        }
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=2))
        for s in shards:
            (tmp / (s["file"] + DONE_SUFFIX)).unlink()
        (tmp / PLAN_NAME).unlink()
        shutil.rmtree(tmp / TOKENIZED_DIR, ignore_errors=True)
        replace_dir(tmp, out)
    return ranks.from_rank0(manifest)
