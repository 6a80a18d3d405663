"""Fingerprints that tie derived data to what it was made from: the target, the tokenizer, the source.

    target_fingerprint(model_dir)    # config.json bytes + sampled embedding/lm_head/norm rows
    tokenizer_fingerprint(tokenizer) # vocabulary, merges, added tokens, chat template
    source_fingerprint(source)       # a file or directory by content, anything else by name
    input_ids_sha256(rows)           # the token ids of a tokenized dataset, in order

The hidden-state dump (data/hidden_states.py) records them in its manifest and training refuses
a dump that does not match; the tokenized-rows cache (data/chat.py) keys its entries by them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.safetensors_io import local_model_dir, sample_rows, weight_map
from model.shared_weights import EMBED_NAME, FINAL_NORM_NAME, LM_HEAD_NAME

FINGERPRINT_ROWS = 16  # rows of embed_tokens / lm_head hashed into the weights fingerprint


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def target_fingerprint(model_dir: str | Path) -> dict:
    """{config_sha256, weights_sha256, hidden_size, vocab_size, num_hidden_layers} of a local target.

    config_sha256 hashes config.json's bytes. weights_sha256 hashes the final norm and 16 evenly
    spaced rows of embed_tokens and lm_head (milliseconds for 30B): a fine-tune with an
    unchanged config.json still gets a new fingerprint.
    """
    model_dir = local_model_dir(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    files = weight_map(model_dir)
    h = hashlib.sha256()
    for name in (FINAL_NORM_NAME, EMBED_NAME, LM_HEAD_NAME):
        if name not in files:  # lm_head is absent when the config ties it to the embedding
            continue
        shape, parts = sample_rows(files[name], name, FINGERPRINT_ROWS)
        h.update(f"{name}{shape}{parts[0].dtype}".encode())
        for t in parts:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "config_sha256": sha256_file(model_dir / "config.json"),
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
        return "sha256:" + sha256_file(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file() and q.suffix in (".jsonl", ".json", ".parquet")):
            h.update(f"{p.relative_to(path)}:{sha256_file(p)}\n".encode())
        return "dir-sha256:" + h.hexdigest()
    return "name:" + source


class RowsHasher:
    """Incremental `input_ids_sha256`: `update(ids)` row by row, then `hexdigest()`."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, input_ids: Sequence[int]) -> None:
        ids = np.asarray(input_ids, dtype=np.int32)
        self._h.update(np.int64(len(ids)).tobytes())
        self._h.update(ids.tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def input_ids_sha256(rows_input_ids) -> str:
    """The manifest's data.input_ids_sha256 for an iterable of rows' input_ids."""
    h = RowsHasher()
    for ids in rows_input_ids:
        h.update(ids)
    return h.hexdigest()
