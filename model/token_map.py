"""A draft vocabulary ("token map", FR-Spec): the head drafts only among the most frequent tokens.

    ids = frequent_tokens(counts_V, 32768)              # the 32,768 most frequent token ids
    save_token_map(ids, "hot_vocab.pt")                  # what SGLang's --speculative-token-map reads
    ids = load_token_map("hot_vocab.pt", vocab_size)     # checked: 1-D, distinct, inside the vocabulary

Why: a draft step ends in the lm_head, every vocabulary row read for one token's logits. On the
Qwen3-30B-A3B shape that is 151,936 x 2048 bf16 = 622 MB per draft step, several times the MTP
layer's own weights at batch 1. Drafting among N tokens reads N rows instead.

SGLang (checked on 0.5.23 and its main branch, December 2026) does this for EAGLE and NEXTN drafts
with `--speculative-token-map FILE`: `torch.load(FILE, weights_only=True)` gives the token ids
(a list or a 1-D tensor), the draft's lm_head becomes the target's lm_head rows at those ids, the
draft's top-1 is taken over those logits and mapped back through the ids. The target and its
verification are unchanged, so decoding stays lossless; only the drafts are limited to the map.
The engine does the same (model/engine.py's MTPHeadLM, model/drafters.py's MTPDrafter).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from model.atomic import atomic_file


def frequent_tokens(counts_V: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent token ids of a count vector [V], most frequent first (ties: the
    lower id first). Tokens never seen fill the rest in id order, so the map has `size` ids."""
    V = counts_V.numel()
    if not 1 <= size <= V:
        raise ValueError(f"token map size must be in [1, {V}] (the vocabulary), got {size}")
    # a stable sort on -count keeps equal counts in id order
    order = torch.sort(-counts_V.to(torch.float64), stable=True).indices
    return order[:size].to(torch.long)


def coverage(counts_V: torch.Tensor, ids: torch.Tensor) -> float:
    """Share of the counted tokens whose id is in the map: the most a draft from it can match."""
    total = float(counts_V.sum())
    return float(counts_V[ids].sum()) / total if total else 0.0


def save_token_map(ids: torch.Tensor, path: str | Path) -> None:
    """A 1-D int64 tensor of token ids, written atomically with torch.save."""
    with atomic_file(path, "wb") as f:
        torch.save(ids.detach().to("cpu", torch.long).contiguous(), f)


def load_token_map(path: str | Path, vocab_size: int) -> torch.Tensor:
    """The token ids of a token-map file (a list of ints or a 1-D integer tensor, as SGLang reads
    it), checked: non-empty, distinct, inside [0, vocab_size). Loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token map {path} does not exist; build one with scripts/build_token_map.py")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of anything but tensors and plain containers
        raise ValueError(f"token map {path} is not a torch.save of token ids ({type(e).__name__}: {e})") from e
    if isinstance(raw, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        ids = torch.tensor(raw, dtype=torch.long)
    elif isinstance(raw, torch.Tensor) and raw.dim() == 1 and not raw.is_floating_point() and raw.dtype != torch.bool:
        ids = raw.to(torch.long)
    else:
        raise ValueError(f"token map {path} holds {type(raw).__name__}; expected a list of ints or a 1-D integer "
                         "tensor of token ids (scripts/build_token_map.py writes one)")
    if ids.numel() == 0:
        raise ValueError(f"token map {path} is empty")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        raise ValueError(f"token map {path} has ids outside the vocabulary [0, {vocab_size}), e.g. {int(bad[0])}; "
                         "was it built for another tokenizer?")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"token map {path} repeats token ids; each id may appear once")
    return ids


def token_map_info(path: str | Path, ids: torch.Tensor) -> dict:
    """What a report records of the map: its file, size and the sha256 of the file's bytes."""
    return {"path": str(path), "size": int(ids.numel()),
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
