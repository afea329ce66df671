"""A resumable sampler that gives every rank its share of each *global* batch.

Epoch ``e`` shuffles the dataset with a generator seeded from ``(seed, e)``; global batch ``i`` is
``perm[i*G:(i+1)*G]`` and rank ``r`` of ``K`` takes ``global[r::K]``. The ranks' shares together
are exactly the single-process batch, so gradients averaged by DistributedDataParallel equal the
single-process gradient. The last incomplete batch of an epoch is dropped (every step sees ``G``
samples). The position ``(epoch, batch)`` is all a checkpoint needs to continue the data stream.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from mz_kernels._validate import check_positive_int

_GOLDEN = 0x9E3779B97F4A7C15


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * _GOLDEN + epoch) % 2**63


class GlobalBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding this rank's indices of each global batch, from a settable position.

    Args:
        n: dataset length.
        global_batch: samples per optimiser step over all ranks; divisible by ``world_size``.
        seed: shuffling seed (the same on every rank).
        rank, world_size: this process and the number of processes.
        shuffle: shuffle every epoch (``False``: dataset order).

    Examples:
        >>> s = GlobalBatchSampler(10, 4, seed=0)
        >>> s.set_position(epoch=0, batch=1)
        >>> len(list(s))  # 2 full batches per epoch, starting at the second
        1
    """

    def __init__(
        self, n: int, global_batch: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        check_positive_int("GlobalBatchSampler", "n", n)
        check_positive_int("GlobalBatchSampler", "global_batch", global_batch)
        check_positive_int("GlobalBatchSampler", "world_size", world_size)
        if global_batch % world_size:
            raise ValueError(
                f"GlobalBatchSampler: global_batch must be divisible by world_size={world_size}, got {global_batch}"
            )
        if global_batch > n:
            raise ValueError(f"GlobalBatchSampler: global_batch must be <= n={n}, got {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"GlobalBatchSampler: rank must be in [0, {world_size}), got {rank}")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_position(self, epoch: int, batch: int) -> None:
        """Next iteration yields epoch ``epoch`` from global batch ``batch`` on."""
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(
                "GlobalBatchSampler: position must be epoch >= 0, "
                f"0 <= batch <= {self.batches_per_epoch}, got ({epoch}, {batch})"
            )
        self.epoch, self.start = epoch, batch

    def permutation(self, epoch: int) -> torch.Tensor:
        """Sample order of ``epoch``, ``[n]`` int64."""
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, epoch)))

    def __iter__(self) -> Iterator[list[int]]:
        perm, g = self.permutation(self.epoch), self.global_batch
        for i in range(self.start, self.batches_per_epoch):
            yield perm[i * g : (i + 1) * g][self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start
