"""The demo target's training loss (train/demo_target.py): next-token cross-entropy with the
vocabulary projection in checkpointed chunks, optionally over the tokens the data uses only
(`DataVocab`), and the token-level unlikelihood term (`chunked_ce_unlikelihood`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

END_OF_TEXT_ID = 151643  # <|endoftext|>: separates packed conversations


def _ce_chunk(h_NH, w_VH, labels_N):
    # bf16 matmul, fp32 softmax; recomputed in backward (checkpoint), so only one chunk's
    # logits live at a time
    return F.cross_entropy(F.linear(h_NH, w_VH).float(), labels_N, reduction="sum")


def _ce_chunk_zero_rest(h_NH, w_UH, labels_N, log_rest):
    # the U used rows' logits; the other rows are zero, so each of them has logit exactly 0:
    # log Z adds their count in closed form, and a label among them scores logit 0
    logits_NU = F.linear(h_NH, w_UH).float()
    log_z_N = torch.logaddexp(torch.logsumexp(logits_NU, dim=-1), log_rest)
    picked_N = logits_NU.gather(1, labels_N.clamp(min=0)[:, None])[:, 0].masked_fill(labels_N < 0, 0.0)
    return (log_z_N - picked_N).sum()


def _ce_ul_chunk(h_NH, w_UH, labels_N, cands_NW, log_rest):
    # cross-entropy and token-level unlikelihood from one chunk's logits: [ce sum, ul sum].
    # cands_NW: candidate rows of w_UH per position, -1 where there is none; `log_rest` (or None):
    # log(#zero rows left out of w_UH), as in _ce_chunk_zero_rest
    logits_NU = F.linear(h_NH, w_UH).float()
    log_z_N = torch.logsumexp(logits_NU, dim=-1)
    if log_rest is not None:
        log_z_N = torch.logaddexp(log_z_N, log_rest)
    picked_N = logits_NU.gather(1, labels_N.clamp(min=0)[:, None])[:, 0].masked_fill(labels_N < 0, 0.0)
    p_NW = (logits_NU.gather(1, cands_NW.clamp(min=0)) - log_z_N[:, None]).exp()
    ul = -(torch.log1p(-p_NW.clamp(max=1.0 - 1e-6)) * (cands_NW >= 0)).sum()
    return torch.stack(((log_z_N - picked_N).sum(), ul))


def _chunked(fn, h_NH, w_UH, rows: tuple, extra: tuple, chunk: int) -> torch.Tensor:
    # sum of fn(h rows, w, per-row tensors..., extra...) over chunks of rows; each chunk is
    # checkpointed when training, so only one chunk's logits live at a time
    total = None
    for s in range(0, h_NH.shape[0], chunk):
        args = (h_NH[s: s + chunk], w_UH, *(r[s: s + chunk] for r in rows), *extra)
        part = checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)
        total = part if total is None else total + part
    return total


def chunked_ce(h_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor, chunk: int,
               vocab: "DataVocab | None" = None) -> torch.Tensor:
    """Mean next-token cross-entropy over N positions, the vocabulary projection in chunks.
    With `vocab`, only its used rows of w_VH are multiplied (the others must be zero: then the
    value and the gradient are those of the full-vocabulary loss)."""
    if vocab is not None:
        w, rows, fn, extra = w_VH.index_select(0, vocab.used_ids), (vocab.index_of[labels_N],), _ce_chunk_zero_rest, (vocab.log_rest,)
    else:
        w, rows, fn, extra = w_VH, (labels_N,), _ce_chunk, ()
    return _chunked(fn, h_NH, w, rows, extra, chunk) / h_NH.shape[0]


def chunked_ce_unlikelihood(h_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor, cands_NW: torch.Tensor,
                            chunk: int, vocab: "DataVocab | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean unlikelihood -sum_c log(1 - p(c))) over N positions; cands_NW are
    token ids (-1: none), from unlikelihood_candidates. `vocab` as in chunked_ce (every candidate
    must be a used token: candidates come from the training chats)."""
    if vocab is not None:
        cands = torch.where(cands_NW >= 0, vocab.index_of[cands_NW.clamp(min=0)], -1)
        w, rows, extra = w_VH.index_select(0, vocab.used_ids), (vocab.index_of[labels_N], cands), (vocab.log_rest,)
    else:
        w, rows, extra = w_VH, (labels_N, cands_NW), (None,)
    ce, ul = _chunked(_ce_ul_chunk, h_NH, w, rows, extra, chunk) / h_NH.shape[0]
    return ce, ul


def unlikelihood_candidates(x_BT: torch.Tensor, window: int, separator: int = END_OF_TEXT_ID) -> torch.Tensor:
    """Negative candidates of each next-token position of packed blocks x_BT: for the label
    x[t+1], the distinct ids among x[t-window+1 .. t] of the same conversation (no separator
    between them and the label) other than x[t+1] itself. [B * (T-1), window] ids, -1 padded."""
    B, T = x_BT.shape
    if window < 1:
        raise ValueError(f"--unlikelihood-window {window}: expected >= 1")
    labels_BT = x_BT[:, 1:]
    is_sep = (x_BT == separator).long()
    conv_BT = is_sep.cumsum(1) - is_sep  # separators before each position: a conversation's id
    pad = x_BT.new_full((B, window - 1), -1)
    cands = torch.cat([pad, x_BT[:, :-1]], 1).unfold(1, window, 1)  # [B, T-1, window]: x[t-window+1 .. t]
    conv = torch.cat([pad, conv_BT[:, :-1]], 1).unfold(1, window, 1)
    keep = (cands >= 0) & (conv == conv_BT[:, 1:, None]) & (cands != labels_BT[..., None])
    cands = torch.where(keep, cands, -1).sort(dim=-1).values
    repeat = torch.zeros_like(keep)
    repeat[..., 1:] = cands[..., 1:] == cands[..., :-1]  # sorted: a repeat follows its first copy
    return cands.masked_fill(repeat, -1).reshape(B * (T - 1), window)


@dataclass
class DataVocab:
    """The token ids the training chats use (`used_ids`, sorted), each id's index among them
    (`index_of`, -1 for an unused id) and log(#unused ids) (`log_rest`)."""

    used_ids: torch.Tensor
    index_of: torch.Tensor
    log_rest: torch.Tensor

    @classmethod
    def from_chats(cls, chats: list[np.ndarray], vocab_size: int, device, multiple: int = 128) -> "DataVocab":
        """`multiple`: the used set is topped up with unused ids to a multiple of this many rows. An
        odd row count (85,713 for ShareGPT) leaves the logits matmul unaligned; on one H200 that
        first version ran the demo step at 93k tok/s against 130k with every row. Any superset of
        the used rows gives the same exact loss."""
        used = np.unique(np.concatenate(chats)).astype(np.int64)
        if used[0] < 0 or used[-1] >= vocab_size:
            raise ValueError(f"token ids outside 0..{vocab_size - 1} in the training chats")
        want = min(vocab_size, -(-len(used) // multiple) * multiple)
        if want > len(used):
            spare = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), used)[: want - len(used)]
            used = np.sort(np.concatenate([used, spare]))
        index_of = np.full(vocab_size, -1, dtype=np.int64)
        index_of[used] = np.arange(len(used))
        rest = vocab_size - len(used)
        return cls(torch.from_numpy(used).to(device), torch.from_numpy(index_of).to(device),
                   torch.tensor(math.log(rest) if rest else -math.inf, device=device))

    def zero_unused_rows(self, weight_VH: torch.Tensor) -> None:
        with torch.no_grad():
            weight_VH[self.index_of.to(weight_VH.device) < 0] = 0


def chunked_token_unlikelihood(h_NH: torch.Tensor, w_VH: torch.Tensor, tokens_N: torch.Tensor, chunk: int,
                               vocab: "DataVocab | None" = None) -> torch.Tensor:
    """Sum over N positions of -log(1 - p(tokens_N)): each position's own token is its one
    negative (the sequence-level term). With `vocab`, a token outside it is skipped."""
    cands = tokens_N[:, None] if vocab is None else vocab.index_of[tokens_N][:, None]
    labels = torch.full_like(tokens_N, -1)  # no positive: the chunk's cross-entropy part is unused
    if vocab is not None:
        w, extra = w_VH.index_select(0, vocab.used_ids), (vocab.log_rest,)
    else:
        w, extra = w_VH, (None,)
    return _chunked(_ce_ul_chunk, h_NH, w, (labels, cands), extra, chunk)[1]
