"""The order training and test samples are drawn in, one shard per process, and the loaders over them.

:class:`EpochSampler` draws each epoch's permutation from its own generator and can replay an epoch that a
checkpoint interrupted, so a resumed run sees the same samples in the same order.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from resnet_fast.train.data import DataBundle
from resnet_fast.train.distributed import DistributedContext

__all__ = ["EpochSampler", "ShardSampler", "train_loader", "make_test_loader"]


class EpochSampler(Sampler[int]):
    """Shuffled indices, one shard per process (``DistributedSampler`` semantics) and resumable mid-epoch.

    Each epoch's permutation is drawn from ``generator``; :attr:`epoch_start_state`
    is the generator's state before that draw, so a checkpoint can replay the
    epoch. Every process uses the same seed, hence the same permutation; the
    list is padded (by wrapping) to a multiple of ``num_replicas``.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start_state = self.generator.get_state()
        self.skip = 0
        self._order: Optional[list[int]] = None
        self.per_replica = math.ceil(size / num_replicas)

    def new_epoch(self, skip: int = 0) -> None:
        """Draw this epoch's order; ``skip`` leaves out the first samples of this shard (mid-epoch resume)."""
        self.epoch_start_state = self.generator.get_state()
        order = torch.randperm(self.size, generator=self.generator).tolist()
        total = self.per_replica * self.num_replicas
        order += order[: total - len(order)]
        self._order = order[self.rank:total:self.num_replicas]
        self.skip = skip

    def replay_epoch(self, state: torch.Tensor, skip: int) -> None:
        """Restore the order of an epoch that a checkpoint interrupted."""
        self.generator.set_state(state)
        self.new_epoch(skip)

    def __iter__(self) -> Iterator[int]:
        if self._order is None:
            self.new_epoch()
        return iter(self._order[self.skip:])  # type: ignore[index]

    def __len__(self) -> int:
        return self.per_replica - self.skip


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: each test sample evaluated by exactly one process."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(bundle: DataBundle, sampler: Sampler, batch_size: int, workers: int,
                 device: torch.device) -> DataLoader:
    """Batches of the training split in ``sampler``'s order (the last one may be short)."""
    return DataLoader(bundle.train, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=False, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))  # keeps the loader off the global RNG


def make_test_loader(bundle: DataBundle, batch_size: int, workers: int, device: torch.device,
                     context: Optional[DistributedContext] = None) -> DataLoader:
    """Sequential loader over this process's shard of the test split."""
    context = context or DistributedContext()
    sampler = ShardSampler(len(bundle.test), context.world_size, context.rank)
    return DataLoader(bundle.test, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda")
