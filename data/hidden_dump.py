"""Write a hidden-state dump: run the frozen target once over a chat dataset, store h_t.

    python scripts/dump_hidden_states.py --target artifacts/tiny-target --data sharegpt-package \
        --limit 600 --max-length 256 --out artifacts/tiny-hidden

The layout, the reader and the compatibility check are data/hidden_states.py.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from data.chat import build_chat_dataset
from data.fingerprints import RowsHasher, source_fingerprint, target_fingerprint, tokenizer_fingerprint
from data.hidden_states import DEFAULT_SHARD_TOKENS, DTYPE_NAMES, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SHARD_NAME
from model.atomic import atomic_dir


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

    bar = tqdm(total=len(ds), desc="hidden states", unit="row", disable=not progress, dynamic_ncols=True)
    # the old dump (with --force) goes only once the new one is complete
    with atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, shard_tokens)
        ids_hash = RowsHasher()
        window = batch_size * 16
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
                ids_hash.update(done[i]["input_ids"])
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
    return manifest
