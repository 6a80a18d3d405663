"""N-gram (prompt-lookup) drafting behind the engine's `Drafter` interface (model/decode.py).

    python scripts/eval_acceptance.py --target DIR --drafter ngram --prompts FILE --steps 3

Like SGLang's NGRAM drafter with one candidate per step: match the last n tokens of the row's
prompt + output (n = max_n down to min_n) against earlier text of the same row, take the most
recent match, and propose the K tokens that followed it. SGLang also matches other requests'
text and proposes token trees; this is the per-row chain version, enough to measure how much
of a model's output is copied or looped (a looping target makes any drafter look good).

Runs on device without host syncs (it is captured in the engine's CUDA graph).
The draft is deterministic: at T>0 its q is one-hot, the acceptance rule handles that.
"""

from __future__ import annotations

import torch


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
