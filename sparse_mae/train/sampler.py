"""A DistributedSampler that can resume mid-epoch and gives every sample its own seed.

Each item is `(dataset_index, sample_seed)`. The seed is a pure function of
(seed, epoch, position in the epoch's global order), so augmentation and masking do not
depend on DataLoader workers, on how many processes share the batch, or on whether the
run was interrupted: 2 processes x batch B/2 see exactly the samples (and seeds) that
1 process x batch B sees, and a resumed run sees what the uninterrupted one would have.
"""
from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads nearby integers over 64 bits


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one sample; different for every (seed, epoch, position)."""
    x = (seed * 1_000_003 + epoch) * _MIX + position * 0xBF58476D1CE4E5B9
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & ((1 << 63) - 1)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch from `seed`, strided across ranks, drop_last)
    with `set_epoch(epoch, start=k)` skipping this rank's first k items of the epoch."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.start = start

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        order = order[: self.total_size]
        # rank r takes global positions r, r + R, r + 2R, ... (as DistributedSampler does)
        positions = range(self.rank, self.total_size, self.num_replicas)
        for k, pos in enumerate(positions):
            if k < self.start:
                continue
            yield order[pos], sample_seed(self.seed, self.epoch, pos)

    def __len__(self) -> int:
        return self.num_samples - self.start
