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
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from data.fingerprints import source_fingerprint, target_fingerprint, tokenizer_fingerprint
from data.rows import SkipReport

FORMAT_NAME = "qwen3-moe-mtp-hidden-states"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_NAME = "shard-{i:05d}.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_SHARD_TOKENS = 1 << 18  # 262,144 tokens: 1 GiB of bf16 hidden states at H=2048
FINGERPRINT_ROWS = 16  # rows of embed_tokens / lm_head hashed into the weights fingerprint


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
        return SkipReport.from_dict(self.manifest["data"]["skip_report"])

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
