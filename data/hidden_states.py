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
4 x 2048 on an H200) and gives the same h_t every epoch, so a multi-epoch run or a sweep of
head settings pays it once. The price is disk: H x 2 bytes per token in bf16 (4 KiB for
H=2048, so 1 M tokens take 4 GiB), H + 4 bytes in fp8 storage.

Layout of a dump directory (written to a temporary sibling, renamed when complete):
    manifest.json            format version, target/tokenizer/data fingerprints, `dtype` (what the
                             reader returns: the target's compute dtype), `storage` (how `hidden` is
                             stored), shard list with each shard's rows, size and sha256
    shard-00000.safetensors  for the rows [row_start, row_end) of the manifest's shard entry:
        hidden        [N, H]  storage     post-final-norm h_t (the lm_head input), all rows' tokens
        hidden_scale  [N]     float32     only for storage fp8_e4m3: per-token scale amax/448
        input_ids     [N]     int32       concatenated
        loss_mask     [N]     uint8
        offsets       [R + 1] int64       row r is tokens offsets[r]:offsets[r+1] of this shard
        topk_ids      [N, K]  int32       only with --topk-logits K: the target's top-K next tokens
        topk_logprobs [N, K]  dtype       ... and their log-probabilities (full-vocab softmax)
Rows keep the order of `build_chat_dataset`, so `data.holdout` splits them as online training does.

Storage: `bf16` / `fp32` keep h_t as computed (or cast); `fp8_e4m3` keeps each token's h_t as
e4m3 values times a float32 scale amax(|h_t|)/448 (448 is e4m3's largest finite value), about a
quarter of fp32 and half of bf16; the reader dequantizes to `dtype` transparently.
`format_version` is the oldest reader that reads a dump: 1 for bf16/fp32 storage (the layout
has not changed), 2 for fp8 (a v1 reader would hand e4m3 codes to the loss). This reader reads both.

Soft labels (head.loss=kl|ce+kl) need no top-k: the target distribution for x_{q+2} is
softmax(lm_head(h_{q+1})), and the loss computes it from the stored h_{q+1} with the target's
lm_head (model/loss.py). `--topk-logits` is an extra for heads trained with another vocabulary
projection or outside this toolkit.

A dump that does not match the run's target (config.json text or weights), tokenizer, or data
(source, limit, max_length) is refused by `check_compatible`, which the trainer always calls.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from data.fingerprints import source_fingerprint, target_fingerprint, tokenizer_fingerprint
from data.rows import SkipReport

FORMAT_NAME = "qwen3-moe-mtp-hidden-states"
FORMAT_VERSION = 2  # the newest layout this code writes and reads (fp8 storage); see the docstring
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SHARD_NAME = "shard-{i:05d}.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP8 = "fp8_e4m3"
STORAGES = {"bf16": torch.bfloat16, "fp32": torch.float32, FP8: torch.float8_e4m3fn}
STORAGE_BYTES = {"bf16": 2, "fp32": 4, FP8: 1}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# what HiddenStateStore needs of a manifest; a missing one means a cut-short or hand-edited file
REQUIRED_KEYS = ("format", "format_version", "dtype", "topk", "shards", "target.hidden_size", "target.config_sha256",
                 "target.weights_sha256", "tokenizer.fingerprint", "data.rows", "data.source", "data.source_fingerprint",
                 "data.limit", "data.max_length", "data.skip_report")
DEFAULT_SHARD_TOKENS = 1 << 18  # 262,144 tokens: 1 GiB of bf16 hidden states at H=2048
FINGERPRINT_ROWS = 16  # rows of embed_tokens / lm_head hashed into the weights fingerprint


def storage_version(storage: str) -> int:
    """The format_version a dump with this storage is written with (the oldest reader that reads it)."""
    return 2 if storage == FP8 else 1


def quantize_fp8(hidden_NH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes [N, H], float32 scale [N]) with hidden ~= codes * scale[:, None]; scale is each
    token's amax / 448, so the largest entry of a token maps to e4m3's largest finite value. A token
    of zeros gets scale 0 (and codes 0)."""
    x = hidden_NH.float()
    scale_N = x.abs().amax(dim=-1) / FP8_MAX
    safe_N = torch.where(scale_N > 0, scale_N, torch.ones_like(scale_N))
    codes = (x / safe_N[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale_N


def dequantize_fp8(codes_NH: torch.Tensor, scale_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes_NH.float() * scale_N.float()[:, None]).to(dtype)


def _read_manifest(path: Path) -> dict:
    """manifest.json of a dump dir, checked for the keys the reader needs; ValueError naming the file."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(f"'{path}' has no {MANIFEST_NAME}; write it with scripts/dump_hidden_states.py")
    fix = "the dump was cut short or edited; re-run scripts/dump_hidden_states.py"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"'{manifest_path}' is not valid JSON ({exc}); {fix}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"'{manifest_path}' holds a {type(manifest).__name__}, not a JSON object; {fix}")
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") not in READ_VERSIONS:
        raise ValueError(
            f"'{manifest_path}' is format {manifest.get('format')!r} v{manifest.get('format_version')}; "
            f"this toolkit reads {FORMAT_NAME!r} v{'/v'.join(map(str, READ_VERSIONS))}: re-run scripts/dump_hidden_states.py"
        )
    for key in REQUIRED_KEYS:
        node = manifest
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"'{manifest_path}' has no '{key}'; {fix}")
            node = node[part]
    storage = manifest.get("storage", manifest["dtype"])  # v1 dumps stored h_t in their dtype
    if manifest["dtype"] not in DTYPES or storage not in STORAGES:
        raise ValueError(f"'{manifest_path}': dtype {manifest['dtype']!r} / storage {storage!r} unknown "
                         f"(dtype one of {sorted(DTYPES)}, storage one of {sorted(STORAGES)}); {fix}")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or not {"file", "row_start", "row_end"} <= set(shard):
            raise ValueError(f"'{manifest_path}': shard entry {i} lacks file/row_start/row_end; {fix}")
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
            self._dtype, self._storage = _parent._dtype, _parent._storage
            self._rows = _rows
            return
        self.manifest = _read_manifest(self.path)
        self._dtype = DTYPES[self.manifest["dtype"]]
        self._storage = self.manifest.get("storage", self.manifest["dtype"])
        self._handles: dict[int, Any] = {}
        self._offsets: list[np.ndarray] = []
        self._starts = [s["row_start"] for s in self.manifest["shards"]]
        lengths = []
        redo = "re-run scripts/dump_hidden_states.py (with --force) to write it again"
        for i, shard in enumerate(self.manifest["shards"]):
            file = self.path / shard["file"]
            if not file.is_file():
                raise ValueError(f"'{file}' listed in the manifest is missing; the dump is incomplete: {redo}")
            if "bytes" in shard and file.stat().st_size != shard["bytes"]:
                raise ValueError(f"'{file}' is {file.stat().st_size} bytes, the manifest says {shard['bytes']}: "
                                 f"the shard is truncated or was replaced; {redo}")
            offsets = self._handle(i).get_tensor("offsets").numpy()
            expected = shard["row_end"] - shard["row_start"]
            if len(offsets) != expected + 1:
                raise ValueError(f"'{file}' holds {len(offsets) - 1} rows, the manifest says {expected}: "
                                 f"the shard does not belong to this manifest; {redo}")
            self._offsets.append(offsets)
            lengths += np.diff(offsets).tolist()
        if len(lengths) != self.manifest["data"]["rows"]:
            raise ValueError(f"'{self.path / MANIFEST_NAME}': shards hold {len(lengths)} rows, the manifest says "
                             f"{self.manifest['data']['rows']}; {redo}")
        self._all_lengths = lengths
        self._rows = None

    def _handle(self, shard: int):
        if shard not in self._handles:
            file = self.path / self.manifest["shards"][shard]["file"]
            try:
                self._handles[shard] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as exc:  # truncated, not safetensors, unreadable
                raise ValueError(f"'{file}' is not a readable safetensors file ({exc}); the shard is damaged: "
                                 "re-run scripts/dump_hidden_states.py (with --force) to write it again") from None
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
            "hidden": self._hidden(f, a, b),  # [T, H] in the manifest's dtype
        }
        if self.manifest.get("topk"):
            row["topk_ids"] = f.get_slice("topk_ids")[a:b]  # [T, K]
            row["topk_logprobs"] = f.get_slice("topk_logprobs")[a:b]  # [T, K]
        return row

    def _hidden(self, f, a: int, b: int) -> torch.Tensor:
        h = f.get_slice("hidden")[a:b]
        if self._storage == FP8:
            return dequantize_fp8(h, f.get_slice("hidden_scale")[a:b], self._dtype)
        return h if h.dtype == self._dtype else h.to(self._dtype)

    def skip_report(self):
        """The SkipReport of the tokenization the dump was made from."""
        return SkipReport.from_dict(self.manifest["data"]["skip_report"])

    # ----------------------------------------------------------- compatibility
    def check_compatible(self, target: str | Path, tokenizer, data_cfg: Any = None) -> None:
        """Raise ValueError listing every way this dump differs from the run: the target
        (config.json bytes, weights fingerprint), the tokenizer, the data (source, limit,
        max_length). `data_cfg` is a DataConfig (train, limit, max_length, enable_thinking) or a mapping with
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
            if get("enable_thinking") != d.get("enable_thinking"):  # rows render differently
                problems.append(f"data: data.enable_thinking={get('enable_thinking')} but the dump used "
                                f"{d.get('enable_thinking')}")
        if problems:
            raise ValueError(
                f"hidden states in '{self.path}' do not match this run:\n  - " + "\n  - ".join(problems)
                + "\nRe-run scripts/dump_hidden_states.py with this run's target, tokenizer and data settings, "
                "or set data.hidden_states to a matching dump (or unset it to train online)."
            )


def collate_hidden_states(rows: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """`collate_batch` (right padding) plus the stored tensors: hidden [B, T, H] (zeros on
    padding) and, when the dump has them, topk_ids [B, T, K] / topk_logprobs [B, T, K]."""
    from data.collate import collate_batch

    batch = collate_batch(rows, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
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
