"""Draft sources behind the engine's `Drafter` protocol (model/engine.py).

    drafter = build_drafter("mtp", head, target_lm)     # or "ngram"

- `MTPDrafter`: chain drafting with the MTP head, as SGLang's NEXTN with topk 1; with a token
  map (the head LM's `token_map`, SGLang's --speculative-token-map) it drafts among the map's ids.
- `NGramDrafter`: prompt lookup (as SGLang's NGRAM drafter with one candidate per step): match
  the last n tokens of the row's prompt + output (n = max_n down to min_n) against earlier text
  of the same row, take the most recent match, propose the K tokens that followed it. SGLang
  also matches other requests' text and proposes token trees; this per-row chain version is
  enough to measure how much of a model's output is copied or looped (a looping target makes
  any drafter look good).

Every method runs on device without host syncs (the engine captures it in a CUDA graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.acceptance import sample_from
from model.engine import MTPHeadLM, TargetLM

DRAFTERS = ("mtp", "ngram")


class MTPDrafter:
    """Chain drafting with the MTP head (module docstring). Keeps d_1 (and h'_1, q_1) of the
    next step, produced by the prefill or by the previous step's draft extend."""

    def __init__(self, head_lm):
        self.head = head_lm
        # the ids of a draft vocabulary (model/token_map.py): logits index it, drafts are its ids
        self.token_map = getattr(head_lm, "token_map", None)

    def allocate(self, batch_size, max_len, steps, temperature):
        head = self.head
        head.allocate(batch_size, max_len)
        self.steps, self.temperature = steps, temperature
        self.d1 = torch.zeros(batch_size, dtype=torch.long, device=head.device)
        self.h1 = torch.zeros(batch_size, head.hidden_size, dtype=head.dtype, device=head.device)
        self.q1 = None
        if temperature > 0:
            self.q1 = torch.zeros(batch_size, head.vocab_size, dtype=torch.float, device=head.device)

    def _draft(self, h_BH):
        """The next draft token (and its distribution q at T>0) from the head's output."""
        logits = self.head.logits(h_BH)
        if self.temperature == 0:
            return self._ids(logits.argmax(-1)), None
        q = F.softmax(logits / self.temperature, dim=-1)
        d = self._ids(sample_from(q))
        if self.token_map is not None:  # q over the whole vocabulary, 0 outside the map
            q = q.new_zeros(q.shape[0], self.head.vocab_size).index_copy_(1, self.token_map, q)
        return d, q

    def _ids(self, idx):
        return idx if self.token_map is None else self.token_map[idx]

    def _first(self, h_BH):
        d, q = self._draft(h_BH)
        self.d1.copy_(d)
        self.h1.copy_(h_BH)
        if q is not None:
            self.q1.copy_(q)

    def prefill(self, st, hidden_BTH):
        B, T = hidden_BTH.shape[:2]
        pos = torch.arange(T, device=hidden_BTH.device).expand(B, T)
        out = self.head.forward(st.tokens[:, 1:T + 1], hidden_BTH, pos, prefill=True)
        self._first(out[torch.arange(B, device=out.device), st.prompt_len - 1])

    def propose(self, st):
        tok, h = self.d1, self.h1
        drafts, probs = [tok], [self.q1]
        base = st.seq_len - 1  # the target's cache length = position of x_{t+1}
        for j in range(2, self.steps + 1):
            h = self.head.forward(tok[:, None], h[:, None], (base + j - 2)[:, None])[:, 0]
            tok, q = self._draft(h)
            drafts.append(tok)
            probs.append(q)
        q_BKV = None if self.temperature == 0 else torch.stack(probs, 1)
        return torch.stack(drafts, 1), q_BKV

    def commit(self, st, hidden_BK1H, emitted_BK1, num_accepted_B, positions_BK1):
        # draft extend: slot s gets (e(x_{s+1}), h_s) for the accepted tokens, with the
        # target's h; emitted[j] = x_{s+1} for j <= n. Output n is the next step's h'_1.
        out = self.head.forward(emitted_BK1, hidden_BK1H, positions_BK1)
        B = out.shape[0]
        self._first(out[torch.arange(B, device=out.device), num_accepted_B])


class NGramDrafter:
    def __init__(self, max_n: int = 4, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n

    def allocate(self, batch_size: int, max_len: int, steps: int, temperature: float) -> None:
        self.steps = steps

    def prefill(self, st, hidden_BTH) -> None:
        pass

    def _match_end(self, tokens_BS, seq_len_B):
        """End e (exclusive) of the most recent earlier occurrence of the row's last n tokens,
        for the longest n in [min_n, max_n] that has one; L-1 (repeat the last token) if none."""
        B, S = tokens_BS.shape
        L = seq_len_B
        best = L - 1
        found = torch.zeros(B, dtype=torch.bool, device=tokens_BS.device)
        for n in range(self.max_n, self.min_n - 1, -1):
            if n >= S:
                continue
            k = torch.arange(n, device=tokens_BS.device)
            suffix_Bn = tokens_BS.gather(1, (L[:, None] - n + k).clamp_min(0))
            windows_BWn = tokens_BS.unfold(1, n, 1)  # window w covers w .. w+n-1, ends at e = w+n
            end_W = torch.arange(n, S + 1, device=tokens_BS.device)
            match = (windows_BWn == suffix_Bn[:, None, :]).all(-1) & (end_W[None] < L[:, None]) & (L[:, None] > n)
            e_B = torch.where(match, end_W[None], -1).amax(-1)
            take = ~found & (e_B >= 0)
            best = torch.where(take, e_B, best)
            found |= take
        return best

    def propose(self, st):
        e_B = self._match_end(st.tokens, st.seq_len)
        period = (st.seq_len - e_B).clamp_min(1)  # continuing x[L+m] = x[e+m] repeats with period L-e
        m = torch.arange(self.steps, device=e_B.device)
        idx = e_B[:, None] + m[None] % period[:, None]
        return st.tokens.gather(1, idx), None

    def commit(self, st, hidden_BK1H, emitted_BK1, num_accepted_B, positions_BK1) -> None:
        pass


def build_drafter(kind: str, head, target_lm: TargetLM, experts=None, compile=False, kernels=None, token_map=None,
                  **ngram_kwargs):
    """The drafter named `kind` ("mtp" needs the head and may take a token map of draft ids;
    "ngram" takes max_n / min_n)."""
    if kind == "mtp":
        if head is None:
            raise ValueError("drafter 'mtp' needs a head (--mtp)")
        return MTPDrafter(MTPHeadLM(head, target_lm, experts=experts, compile=compile, kernels=kernels,
                                    token_map=token_map))
    if token_map is not None:
        raise ValueError(f"a token map limits an MTP head's drafts; drafter {kind!r} takes none")
    if kind == "ngram":
        return NGramDrafter(**ngram_kwargs)
    raise ValueError(f"unknown drafter {kind!r}; choose 'mtp' or 'ngram'")
