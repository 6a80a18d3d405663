"""Output diversity of generated token sequences: distinct n-grams and repetition loops.

    from model.diversity import diversity_stats, ends_in_loop
    stats = diversity_stats([[1, 2, 3, ...], ...])    # {"distinct_2": ..., "loop_share": ...}

A small model decoding greedily often falls into a loop, and a looping target makes any drafter
look good (the n-gram drafter most of all), so acceptance figures are reported next to these.

Definitions (token ids, the trailing EOS removed first):
  distinct_n       corpus level (Li et al. 2016): unique n-grams over all outputs / all n-grams
  distinct_n_mean  the same ratio per output, averaged over outputs with at least n tokens
  loop             an output whose last LOOP_WINDOW (32) tokens repeat with a period
                   p <= LOOP_MAX_PERIOD (16): w[i] == w[i + p] for every i in the window.
                   Outputs shorter than the window are never loops (they stopped on their own).
  loop_share       loops / outputs
  short_outputs    outputs shorter than the window, which the loop test cannot judge: a target
                   that stops early loops less by this count, so the two are read together
  median_output_tokens  the median length (EOS removed)
"""

from __future__ import annotations

LOOP_WINDOW = 32
LOOP_MAX_PERIOD = 16


def strip_eos(ids: list[int], eos_ids) -> list[int]:
    """`ids` without one trailing EOS (the engine keeps the EOS in its outputs)."""
    return ids[:-1] if ids and ids[-1] in set(eos_ids) else list(ids)


def loop_period(ids: list[int], window: int = LOOP_WINDOW, max_period: int = LOOP_MAX_PERIOD) -> int | None:
    """The smallest period p <= max_period of the last `window` tokens, or None (no loop)."""
    if len(ids) < window:
        return None
    w = ids[-window:]
    for p in range(1, max_period + 1):
        if all(w[i] == w[i + p] for i in range(window - p)):
            return p
    return None


def ends_in_loop(ids: list[int], window: int = LOOP_WINDOW, max_period: int = LOOP_MAX_PERIOD) -> bool:
    return loop_period(ids, window, max_period) is not None


def _ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i: i + n]) for i in range(len(ids) - n + 1)]


def diversity_stats(outputs: list[list[int]], eos_ids=()) -> dict:
    """distinct_2/4 (corpus and per-output mean), loop share and count, mean length."""
    outs = [strip_eos(list(o), eos_ids) for o in outputs]
    lengths = sorted(map(len, outs))
    stats: dict = {"num_outputs": len(outs),
                   "mean_output_tokens": sum(lengths) / len(outs) if outs else None,
                   "median_output_tokens": lengths[len(lengths) // 2] if outs else None,
                   "short_outputs": sum(n < LOOP_WINDOW for n in lengths)}
    for n in (2, 4):
        grams = [_ngrams(o, n) for o in outs]
        total = sum(map(len, grams))
        stats[f"distinct_{n}"] = len({g for gs in grams for g in gs}) / total if total else None
        per = [len(set(gs)) / len(gs) for gs in grams if gs]
        stats[f"distinct_{n}_mean"] = sum(per) / len(per) if per else None
    loops = sum(ends_in_loop(o) for o in outs)
    stats["loops"] = loops
    stats["loop_share"] = loops / len(outs) if outs else None
    stats["loop_definition"] = (f"last {LOOP_WINDOW} tokens (EOS removed) repeat with a period <= "
                                f"{LOOP_MAX_PERIOD}; shorter outputs are not loops")
    return stats
