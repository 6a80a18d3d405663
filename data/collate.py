"""Length-bucketed, rank-sharded batching and right-padding collation.

    from torch.utils.data import DataLoader
    sampler = BucketBatchSampler(ds["length"], batch_size=4, seed=0,
                                 num_replicas=world_size, rank=rank)
    loader = DataLoader(ds, batch_sampler=sampler,
                        collate_fn=lambda rows: collate_batch(rows, pad_id=tokenizer.pad_token_id))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...   # batch["input_ids"]: LongTensor [B, T]

The sampler already gives each rank its own batches: do not let accelerate shard this
DataLoader again (e.g. pass it to `accelerator.prepare` only with dispatch/splitting off,
or skip preparing it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class BucketBatchSampler:
    """Batches of indices of similar length, disjoint across ranks, equal count per rank.

    Plan of one epoch (identical on every rank, a function of (seed, epoch) only):
      1. shuffle all indices (shuffle=True) or keep them in order;
      2. cut them into windows of batch_size * num_replicas * bucket_size_multiplier and sort
         each window by length, so a batch holds similar lengths (less padding) while the
         windows keep the epoch random;
      3. chunk each window into batches of batch_size (with drop_last, the one short batch at
         the very end is dropped);
      4. shuffle the batch order, so long and short batches are spread over the epoch;
      5. rank r takes batches r, r + R, r + 2R, ... of the first R * len(self) batches.
    Every rank gets the same number of batches, len(self), because DeepSpeed steps all ranks
    together: drop_last drops the last batches that do not fill all ranks; without it, the
    list is padded by repeating its first batches (a few samples seen twice).

    Resuming: building the plan is one permutation and a few sorts (milliseconds for 10^6
    rows), so skipping the first N batches of an epoch (`itertools.islice`, accelerate's
    `skip_first_batches`) costs next to nothing.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        bucket_size_multiplier: int = 50,
        drop_last: bool = True,
    ):
        if batch_size < 1 or num_replicas < 1 or bucket_size_multiplier < 1:
            raise ValueError(
                f"batch_size={batch_size}, num_replicas={num_replicas} and "
                f"bucket_size_multiplier={bucket_size_multiplier} must be >= 1"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.window = batch_size * num_replicas * bucket_size_multiplier
        self.drop_last = drop_last
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(
                f"{len(self.lengths)} rows make no batch of {batch_size} for each of {num_replicas} "
                "ranks; use more data or a smaller batch size"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the plan that the next iteration follows."""
        self.epoch = epoch

    def _num_batches_total(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        """Batches per rank per epoch."""
        total = self._num_batches_total()
        return total // self.num_replicas if self.drop_last else -(-total // self.num_replicas)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, in order, before the rank split (for tests/inspection)."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches = []
        for w in range(0, n, self.window):
            window = order[w : w + self.window]
            window = window[np.argsort(self.lengths[window], kind="stable")]
            batches += [window[b : b + self.batch_size] for b in range(0, len(window), self.batch_size)]
        # Only the last window can end in a short batch: windows are multiples of batch_size.
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        wanted = len(self) * self.num_replicas
        while len(batches) < wanted:  # drop_last=False: pad by repeating the first batches
            batches += batches[: wanted - len(batches)]
        return [b.tolist() for b in batches[:wanted]]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.epoch)[self.rank :: self.num_replicas]


def collate_batch(
    rows: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad rows of {"input_ids", "loss_mask"} into LongTensors of shape [B, T].

    Returns input_ids (pad_id on padding), loss_mask (0 on padding) and attention_mask
    (1 on real tokens). T is the longest row, rounded up to pad_to_multiple_of when given.
    Right padding only: training uses causal attention without a mask, and with padding on
    the right no real token ever attends to a pad.
    """
    if not rows:
        raise ValueError("collate_batch got an empty batch")
    T = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask_BT = torch.zeros((B, T), dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        assert len(row["loss_mask"]) == n, "input_ids and loss_mask differ in length"
        input_ids_BT[b, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        loss_mask_BT[b, :n] = torch.as_tensor(row["loss_mask"], dtype=torch.long)
        attention_mask_BT[b, :n] = 1
    return {"input_ids": input_ids_BT, "loss_mask": loss_mask_BT, "attention_mask": attention_mask_BT}
