"""Offline hidden states: run the frozen target once, store h_t, train the head without it.

    python scripts/dump_hidden_states.py --target artifacts/tiny-target --data sharegpt-package \
        --limit 600 --max-length 256 --out artifacts/tiny-hidden
    python train/train_mtp.py --config configs/tiny.yaml data.hidden_states=artifacts/tiny-hidden \
        eval.enabled=false

    store = HiddenStateStore("artifacts/tiny-hidden")
    store.check_compatible(target_dir, tokenizer, cfg.data)   # ValueError naming what differs
    store[0]    # {"input_ids", "loss_mask", "length", "hidden" [T, H], ("topk_ids", "topk_logprobs")}
    batch = collate_hidden_states([store[0], store[1]], pad_id)   # + "hidden" [B, T, H]

The target forward is most of an online training step (220 of 272 ms for Qwen3-30B-A3B at
4 x 2048, design.md §5) and gives the same h_t every epoch, so a multi-epoch run or a sweep of
head settings pays it once. The price is disk: H x 2 bytes per token in bf16 (4 KiB for
H=2048, so 1 M tokens take 4 GiB).

Layout of a dump directory (written to a temporary sibling, renamed when complete):
    manifest.json            format version, target/tokenizer/data fingerprints, shard list
    shard-00000.safetensors  for the rows [row_start, row_end) of the manifest's shard entry:
        hidden        [N, H]  bf16|fp32   post-final-norm h_t (the lm_head input), all rows' tokens
        input_ids     [N]     int32       concatenated
        loss_mask     [N]     uint8
        offsets       [R + 1] int64       row r is tokens offsets[r]:offsets[r+1] of this shard
        topk_ids      [N, K]  int32       only with --topk-logits K: the target's top-K next tokens
        topk_logprobs [N, K]  hidden dtype ... and their log-probabilities (full-vocab softmax)
Rows keep the order of `build_chat_dataset`, so `data.holdout` splits them as online training does.

Soft labels (head.loss=kl|ce+kl) need no top-k: the target distribution for x_{q+2} is
softmax(lm_head(h_{q+1})), and the loss computes it from the stored h_{q+1} with the target's
lm_head (model/loss.py). `--topk-logits` is an extra for heads trained with another vocabulary
projection or outside this toolkit.

A dump that does not match the run's target (config.json text or weights), tokenizer, or data
(source, limit, max_length) is refused by `check_compatible`, which the trainer always calls.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_NAME = "qwen3-moe-mtp-hidden-states"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_NAME = "shard-{i:05d}.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_SHARD_TOKENS = 1 << 18  # 262,144 tokens: 1 GiB of bf16 hidden states at H=2048
FINGERPRINT_ROWS = 16  # rows of embed_tokens / lm_head hashed into the weights fingerprint


# ------------------------------------------------------------------------------ fingerprints
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def target_fingerprint(model_dir: str | Path) -> dict:
    """{config_sha256, weights_sha256, hidden_size, vocab_size, num_hidden_layers} of a local target.

    config_sha256 hashes config.json's bytes. weights_sha256 hashes the final norm and 16 evenly
    spaced rows of embed_tokens and lm_head, read with safe_open (milliseconds for 30B): a
    fine-tune with an unchanged config.json still gets a new fingerprint.
    """
    from model.shared_weights import EMBED_NAME, FINAL_NORM_NAME, LM_HEAD_NAME, local_model_dir, weight_map

    model_dir = local_model_dir(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    files = weight_map(model_dir)
    h = hashlib.sha256()
    for name in (FINAL_NORM_NAME, EMBED_NAME, LM_HEAD_NAME):
        if name not in files:  # lm_head is absent when the config ties it to the embedding
            continue
        with safe_open(str(files[name]), framework="pt") as f:
            sl = f.get_slice(name)
            shape = sl.get_shape()
            rows = sorted({int(r) for r in np.linspace(0, shape[0] - 1, FINGERPRINT_ROWS)}) if len(shape) > 1 else None
            parts = [sl[:]] if rows is None else [sl[r : r + 1] for r in rows]
        h.update(f"{name}{shape}{parts[0].dtype}".encode())
        for t in parts:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "config_sha256": _sha256_file(model_dir / "config.json"),
        "weights_sha256": h.hexdigest(),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: the fast tokenizer's JSON (normalizer, pre-tokenizer,
    vocab, merges, added tokens; padding/truncation settings removed) and the chat template."""
    backend = tokenizer.backend_tokenizer
    if backend.padding is not None or backend.truncation is not None:  # a call left them set: hash a clean copy
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
    h = hashlib.sha256(backend.to_str().encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def source_fingerprint(source: str) -> str:
    """A local file or directory by content (moving it does not matter), anything else by name
    ("sharegpt-package", a hub id)."""
    path = Path(source).expanduser()
    if path.is_file():
        return "sha256:" + _sha256_file(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file() and q.suffix in (".jsonl", ".json", ".parquet")):
            h.update(f"{p.relative_to(path)}:{_sha256_file(p)}\n".encode())
        return "dir-sha256:" + h.hexdigest()
    return "name:" + source


def _rows_hasher():
    return hashlib.sha256()


def _hash_row(h, input_ids: Sequence[int]) -> None:
    ids = np.asarray(input_ids, dtype=np.int32)
    h.update(np.int64(len(ids)).tobytes())
    h.update(ids.tobytes())


def input_ids_sha256(rows_input_ids) -> str:
    """The manifest's data.input_ids_sha256 for an iterable of rows' input_ids."""
    h = _rows_hasher()
    for ids in rows_input_ids:
        _hash_row(h, ids)
    return h.hexdigest()


# ------------------------------------------------------------------------------ writing
@dataclass
class _ShardWriter:
    """Buffers rows and writes a shard each time `shard_tokens` tokens have accumulated."""

    dir: Path
    shard_tokens: int
    rows: list = field(default_factory=list)
    tokens: int = 0
    shards: list = field(default_factory=list)
    next_row: int = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.tokens += len(row["input_ids"])
        if self.tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        lengths = [len(r["input_ids"]) for r in self.rows]
        tensors = {
            "hidden": torch.cat([r["hidden"] for r in self.rows]).contiguous(),
            "input_ids": torch.tensor(np.concatenate([np.asarray(r["input_ids"], dtype=np.int32) for r in self.rows])),
            "loss_mask": torch.tensor(np.concatenate([np.asarray(r["loss_mask"], dtype=np.uint8) for r in self.rows])),
            "offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),
        }
        if "topk_ids" in self.rows[0]:
            tensors["topk_ids"] = torch.cat([r["topk_ids"] for r in self.rows]).contiguous()
            tensors["topk_logprobs"] = torch.cat([r["topk_logprobs"] for r in self.rows]).contiguous()
        name = SHARD_NAME.format(i=len(self.shards))
        save_file(tensors, str(self.dir / name), metadata={"format": FORMAT_NAME})
        start = self.next_row
        self.next_row += len(self.rows)
        self.shards.append({"file": name, "row_start": start, "row_end": self.next_row, "tokens": int(sum(lengths))})
        self.rows, self.tokens = [], 0


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


def _fresh_temp_dir(out: Path) -> Path:
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


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
    batch_size: int = 8,
    topk: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    dtype: torch.dtype | None = None,
    num_proc: int = 1,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Run `target` (a FrozenTarget) over `build_chat_dataset(source, tokenizer, max_length, limit)`
    and write the dump to `out`; returns the manifest.

    Rows are batched in windows sorted by length (less padding) and written in dataset order.
    Right padding with a causal mask: padded positions never change a real token's h_t.
    """
    from tqdm.auto import tqdm

    from data.chat import build_chat_dataset

    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"'{out}' exists; pass --force to replace it or choose another --out")
    if batch_size < 1 or shard_tokens < 1 or topk < 0:
        raise ValueError(f"batch_size={batch_size} and shard_tokens={shard_tokens} must be >= 1, topk={topk} >= 0")
    if topk > target.config.vocab_size:
        raise ValueError(f"--topk-logits {topk} exceeds the vocabulary ({target.config.vocab_size})")
    dtype = dtype or target.lm_head.weight.dtype
    fingerprint = target_fingerprint(target_path)  # fails early for a target that is not a local dir
    ds, report = build_chat_dataset(source, tokenizer, max_length, limit=limit, num_proc=num_proc)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = ds["length"]
    device = target.device

    tmp = _fresh_temp_dir(out)
    writer = _ShardWriter(tmp, shard_tokens)
    ids_hash = _rows_hasher()
    window = batch_size * 16
    bar = tqdm(total=len(ds), desc="hidden states", unit="row", disable=not progress, dynamic_ncols=True)
    try:
        for w in range(0, len(ds), window):
            idx = list(range(w, min(w + window, len(ds))))
            by_length = sorted(idx, key=lambda i: -lengths[i])
            done: dict[int, dict] = {}
            for b in range(0, len(idx), batch_size):
                batch_idx = by_length[b : b + batch_size]
                rows = [ds[i] for i in batch_idx]
                T = max(len(r["input_ids"]) for r in rows)
                input_ids_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
                attn_BT = torch.zeros((len(rows), T), dtype=torch.long)
                for j, r in enumerate(rows):
                    input_ids_BT[j, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
                    attn_BT[j, : len(r["input_ids"])] = 1
                hidden_BTH = target.hidden(input_ids_BT.to(device), attn_BT.to(device))
                for j, (i, r) in enumerate(zip(batch_idx, rows)):
                    n = len(r["input_ids"])
                    row = {"input_ids": r["input_ids"], "loss_mask": r["loss_mask"],
                           "hidden": hidden_BTH[j, :n].to("cpu", dtype)}
                    if topk:
                        ids, lps = _topk_logprobs(target.lm_head, hidden_BTH[j, :n], topk)
                        row["topk_ids"], row["topk_logprobs"] = ids.cpu(), lps.to("cpu", dtype)
                    done[i] = row
                bar.update(len(rows))
            for i in idx:  # dataset order
                _hash_row(ids_hash, done[i]["input_ids"])
                writer.add(done.pop(i))
        writer.flush()
        bar.close()
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": {"path": str(target_path), **fingerprint},
            "dtype": DTYPE_NAMES[dtype],
            "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "size": len(tokenizer)},
            "data": {
                "source": source, "source_fingerprint": source_fingerprint(source), "limit": limit,
                "max_length": max_length, "rows": len(ds), "tokens": int(sum(lengths)),
                "input_ids_sha256": ids_hash.hexdigest(), "skip_report": report.as_dict(),
            },
            "topk": topk,
            "shards": writer.shards,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if out.exists():  # force: the old dump goes only once the new one is complete
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ------------------------------------------------------------------------------ reading
class HiddenStateStore:
    """Rows of a dump directory, read lazily (memory-mapped safetensors slices).

    `select(indices)` returns a store over those rows (like `datasets.Dataset.select`), which is
    how the trainer holds out the first `data.holdout` rows.
    """

    def __init__(self, path: str | Path, _rows: list[int] | None = None, _parent: "HiddenStateStore | None" = None):
        self.path = Path(path)
        if _parent is not None:  # a selection shares the parent's manifest, offsets and file handles
            self.manifest, self._offsets, self._starts, self._handles = (
                _parent.manifest, _parent._offsets, _parent._starts, _parent._handles)
            self._all_lengths = _parent._all_lengths
            self._rows = _rows
            return
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ValueError(f"'{self.path}' has no {MANIFEST_NAME}; write it with scripts/dump_hidden_states.py")
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"'{self.path}' is format {self.manifest.get('format')!r} v{self.manifest.get('format_version')}; "
                f"this toolkit reads {FORMAT_NAME!r} v{FORMAT_VERSION}: re-run scripts/dump_hidden_states.py"
            )
        self._handles: dict[int, Any] = {}
        self._offsets: list[np.ndarray] = []
        self._starts = [s["row_start"] for s in self.manifest["shards"]]
        lengths = []
        for i, shard in enumerate(self.manifest["shards"]):
            file = self.path / shard["file"]
            if not file.is_file():
                raise ValueError(f"'{file}' listed in the manifest is missing; the dump is incomplete, re-run it")
            offsets = self._handle(i).get_tensor("offsets").numpy()
            if len(offsets) != shard["row_end"] - shard["row_start"] + 1:
                raise ValueError(f"'{file}' holds {len(offsets) - 1} rows, the manifest says {shard['row_end'] - shard['row_start']}")
            self._offsets.append(offsets)
            lengths += np.diff(offsets).tolist()
        if len(lengths) != self.manifest["data"]["rows"]:
            raise ValueError(f"'{self.path}': shards hold {len(lengths)} rows, the manifest says {self.manifest['data']['rows']}")
        self._all_lengths = lengths
        self._rows = None

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / self.manifest["shards"][shard]["file"]), framework="pt")
        return self._handles[shard]

    # ----------------------------------------------------------- dataset API
    def __len__(self) -> int:
        return len(self._all_lengths) if self._rows is None else len(self._rows)

    @property
    def lengths(self) -> list[int]:
        """Tokens per row (what BucketBatchSampler buckets by)."""
        return self._all_lengths if self._rows is None else [self._all_lengths[r] for r in self._rows]

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["target"]["hidden_size"])

    def select(self, indices) -> "HiddenStateStore":
        rows = [self._global(int(i)) for i in indices]
        return HiddenStateStore(self.path, _rows=rows, _parent=self)

    def _global(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        return i if self._rows is None else self._rows[i]

    def __getitem__(self, i: int) -> dict:
        g = self._global(int(i))
        s = bisect.bisect_right(self._starts, g) - 1
        r = g - self._starts[s]
        a, b = int(self._offsets[s][r]), int(self._offsets[s][r + 1])
        f = self._handle(s)
        row = {
            "input_ids": f.get_slice("input_ids")[a:b].long().tolist(),
            "loss_mask": f.get_slice("loss_mask")[a:b].long().tolist(),
            "length": b - a,
            "hidden": f.get_slice("hidden")[a:b],  # [T, H]
        }
        if self.manifest.get("topk"):
            row["topk_ids"] = f.get_slice("topk_ids")[a:b]  # [T, K]
            row["topk_logprobs"] = f.get_slice("topk_logprobs")[a:b]  # [T, K]
        return row

    def skip_report(self):
        """The SkipReport of the tokenization the dump was made from."""
        from collections import Counter

        from data.chat import SkipReport

        d = self.manifest["data"]["skip_report"]
        return SkipReport(total=d["total"], kept=d["kept"], skipped=Counter(d["skipped"]))

    # ----------------------------------------------------------- compatibility
    def check_compatible(self, target: str | Path, tokenizer, data_cfg: Any = None) -> None:
        """Raise ValueError listing every way this dump differs from the run: the target
        (config.json bytes, weights fingerprint), the tokenizer, the data (source, limit,
        max_length). `data_cfg` is a DataConfig (train, limit, max_length) or a mapping with
        those keys; None skips the data check."""
        m = self.manifest
        problems = []
        fp = target_fingerprint(target)
        if fp["config_sha256"] != m["target"]["config_sha256"]:
            problems.append(f"target: config.json of '{target}' differs from that of the dumped target '{m['target']['path']}'")
        elif fp["weights_sha256"] != m["target"]["weights_sha256"]:
            problems.append(f"target: the weights of '{target}' differ from those of the dumped target '{m['target']['path']}'")
        if tokenizer_fingerprint(tokenizer) != m["tokenizer"]["fingerprint"]:
            problems.append("tokenizer: vocabulary, merges, added tokens or chat template differ from the dump's tokenizer")
        if data_cfg is not None:
            get = data_cfg.get if isinstance(data_cfg, Mapping) else lambda k: getattr(data_cfg, k)
            d = m["data"]
            source = get("train")
            if source_fingerprint(source) != d["source_fingerprint"]:
                problems.append(f"data: data.train={source!r} is not the dumped source {d['source']!r} (by content)")
            if get("limit") != d["limit"]:
                problems.append(f"data: data.limit={get('limit')} but the dump used {d['limit']}")
            if get("max_length") != d["max_length"]:
                problems.append(f"data: data.max_length={get('max_length')} but the dump used {d['max_length']}")
        if problems:
            raise ValueError(
                f"hidden states in '{self.path}' do not match this run:\n  - " + "\n  - ".join(problems)
                + "\nRe-run scripts/dump_hidden_states.py with this run's target, tokenizer and data settings, "
                "or set data.hidden_states to a matching dump (or unset it to train online)."
            )


def collate_hidden_states(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate_batch` (right padding) plus the stored tensors: hidden [B, T, H] (zeros on
    padding) and, when the dump has them, topk_ids [B, T, K] / topk_logprobs [B, T, K]."""
    from data.collate import collate_batch

    batch = collate_batch(rows, pad_id=pad_id)
    B, T = batch["input_ids"].shape
    for key in ("hidden", "topk_ids", "topk_logprobs"):
        if key not in rows[0]:
            continue
        first = rows[0][key]
        out = torch.zeros((B, T, first.shape[-1]), dtype=first.dtype)
        for b, row in enumerate(rows):
            out[b, : row[key].shape[0]] = row[key]
        batch[key] = out
    return batch
