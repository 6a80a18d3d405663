"""Sequence-level unlikelihood for the demo target (Welleck et al. 2019, section 5.2).

After the cross-entropy schedule, the demo target decodes greedy answers to training prompts
with the engine, marks every generated token that belongs to an n-gram seen earlier in its
sequence (prompt included), and is trained to give those tokens less probability:
-log(1 - p(token)), summed over the marked tokens and divided by the generated tokens. Each
update also takes a cross-entropy step on ordinary training blocks, so the language it learned
stays. This is what the paper does to stop greedy loops at their source: the model's own
repetitive continuations are the negatives.

    from train.demo_unlikelihood import SeqUnlikelihood, repeated_ngram_mask
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from data.chat import render_prompt
from train.demo_loss import chunked_token_unlikelihood


def repeated_ngram_mask(ids: list[int], start: int, n: int) -> list[bool]:
    """For each token of ids[start:], whether it lies in an n-gram of `ids` that also occurs at
    an earlier position (the earlier copy may overlap it: a loop of any period is caught)."""
    seen: set[tuple[int, ...]] = set()
    marked = [False] * len(ids)
    for s in range(len(ids) - n + 1):
        gram = tuple(ids[s: s + n])
        if gram in seen:
            for j in range(s, s + n):
                marked[j] = True
        seen.add(gram)
    return marked[start:]


def first_turn_prompts(tokenizer, messages: list[list[dict]], max_tokens: int) -> list[list[int]]:
    """Served prompts (thinking off) of each conversation's turns before its first answer; prompts
    longer than `max_tokens` are left out."""
    out = []
    for msgs in messages:
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if not first:
            continue
        ids = render_prompt(tokenizer, msgs[:first], enable_thinking=False)
        if len(ids) <= max_tokens:
            out.append(ids)
    return out


@dataclass
class SeqUnlikelihoodStats:
    rounds: int = 0
    updates: int = 0
    generated_tokens: int = 0
    marked_tokens: int = 0
    seconds: float = 0.0
    first_round_marked_share: float | None = None
    last_round_marked_share: float | None = None

    def as_dict(self) -> dict:
        return dict(vars(self))


class SeqUnlikelihood:
    """Rounds of: greedy answers to `prompts_per_round` training prompts (engine), then
    `prompts_per_round / batch_size` updates, each the unlikelihood of one batch of answers plus
    the cross-entropy of one batch of training blocks (`ce_step`)."""

    def __init__(self, model, prompts: list[list[int]], eos_ids, *, generate, ngram: int = 4,
                 new_tokens: int = 256, prompts_per_round: int = 256, batch_size: int = 32,
                 weight: float = 1.0, loss_chunk: int = 8192, vocab=None, seed: int = 0):
        if not prompts:
            raise ValueError("sequence-level unlikelihood: no training prompt fits; raise the prompt length cap")
        if ngram < 1 or batch_size < 1 or prompts_per_round < batch_size:
            raise ValueError(f"--seq-unlikelihood: ngram {ngram} >= 1 and prompts per round {prompts_per_round} >= "
                             f"batch {batch_size} >= 1 are required")
        self.model, self.prompts, self.eos = model, prompts, set(int(e) for e in eos_ids)
        self.generate = generate  # (model, prompts, max_new_tokens) -> outputs (token lists)
        self.ngram, self.new_tokens, self.per_round, self.B = ngram, new_tokens, prompts_per_round, batch_size
        self.weight, self.chunk, self.vocab = weight, loss_chunk, vocab
        self.rng = np.random.default_rng([seed, 7])
        self.stats = SeqUnlikelihoodStats()

    def _batches(self):
        """Generate one round; yield (tokens [b, T], attention mask [b, T], marked [b, T]) batches
        (marked: generated tokens of a repeated n-gram, as prediction targets at their position)."""
        idx = self.rng.choice(len(self.prompts), size=min(self.per_round, len(self.prompts)), replace=False)
        prompts = [self.prompts[i] for i in idx]
        with torch.no_grad():
            outs = self.generate(self.model, prompts, self.new_tokens)
        marked_round, gen_round = 0, 0
        rows = []
        for p, o in zip(prompts, outs):
            o = list(o)
            if o and o[-1] in self.eos:
                o = o[:-1]  # the EOS ends an answer; it is never a repeat
            ids = list(p) + o
            mask = repeated_ngram_mask(ids, len(p), self.ngram)
            marked_round += sum(mask)
            gen_round += len(o)
            rows.append((ids, [False] * len(p) + mask, len(o)))
        share = marked_round / max(gen_round, 1)
        if self.stats.first_round_marked_share is None:
            self.stats.first_round_marked_share = share
        self.stats.last_round_marked_share = share
        self.stats.generated_tokens += gen_round
        self.stats.marked_tokens += marked_round
        for s in range(0, len(rows), self.B):
            part = rows[s: s + self.B]
            T = max(len(ids) for ids, _, _ in part)
            x = torch.zeros(len(part), T, dtype=torch.long)
            att = torch.zeros(len(part), T, dtype=torch.long)
            mk = torch.zeros(len(part), T, dtype=torch.bool)
            for r, (ids, m, _) in enumerate(part):
                x[r, : len(ids)] = torch.tensor(ids)
                att[r, : len(ids)] = 1
                mk[r, : len(ids)] = torch.tensor(m)
            yield x, att, mk, sum(n for _, _, n in part)

    def loss(self, x_BT, att_BT, marked_BT, generated: int) -> torch.Tensor:
        """The batch's unlikelihood: sum over marked tokens of -log(1 - p), / generated tokens."""
        dev = self.model.lm_head.weight.device
        x_BT, att_BT, marked_BT = x_BT.to(dev), att_BT.to(dev), marked_BT.to(dev)
        h_BTH = self.model.model(input_ids=x_BT, attention_mask=att_BT).last_hidden_state
        pick = marked_BT[:, 1:]  # the hidden state at t predicts token t + 1
        if not bool(pick.any()):
            return h_BTH.sum() * 0.0  # keeps the graph (and the router hooks' pairing) uniform
        h_NH = h_BTH[:, :-1][pick]
        return chunked_token_unlikelihood(h_NH, self.model.lm_head.weight, x_BT[:, 1:][pick], self.chunk,
                                          self.vocab) / max(generated, 1)

    def run(self, seconds: float, ce_step, aux_loss, update, log=print) -> SeqUnlikelihoodStats:
        """Rounds until `seconds` have passed (checked between updates; one update at least). `ce_step()` runs forward and
        backward of one training batch and returns its cross-entropy; `aux_loss()` the router
        balance term of the forward just run (with its graph); `update()` applies the gradients."""
        t0 = time.perf_counter()
        ce = None
        while self.stats.updates == 0 or time.perf_counter() - t0 < seconds:  # one update at least
            for x, att, mk, generated in self._batches():
                if self.stats.updates and time.perf_counter() - t0 >= seconds:
                    break
                ce = ce_step()
                (self.weight * self.loss(x, att, mk, generated) + aux_loss()).backward()
                update()
                self.stats.updates += 1
            self.stats.rounds += 1
            log(f"sequence unlikelihood round {self.stats.rounds}: {self.stats.updates} updates, "
                f"{self.stats.last_round_marked_share:.3f} of generated tokens in repeated {self.ngram}-grams"
                + (f", ce {ce.item():.3f}" if ce is not None else "") + f", {time.perf_counter() - t0:.0f}s")
        self.stats.seconds = time.perf_counter() - t0
        return self.stats
