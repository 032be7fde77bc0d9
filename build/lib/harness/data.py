"""A DataLoader whose position can be restored: epoch-seeded order, skipping by sampler indices."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from harness.stop.flag import ChainedWorkerInit


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch.

    Skipping happens on indices, so resuming mid-epoch loads no batch twice and costs no I/O.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.start_index = 0  # indices of the current epoch to skip (batches done x batch size)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def make_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                shuffle: bool = True, num_workers: int = 0, pin_memory: bool = False,
                collate_fn: Optional[Callable] = None,
                worker_init_fn: Optional[Callable[[int], None]] = None) -> DataLoader:
    """A loader with its own generator (so iter() never touches the global RNG), full batches only,
    and workers that ignore stop signals (the main process saves; workers must not die first)."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    if sampler.num_samples < batch_size:
        raise ValueError(f"each rank gets {sampler.num_samples} samples per epoch, fewer than "
                         f"batch_size={batch_size}: shrink the batch or add data")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_fn,
                      worker_init_fn=ChainedWorkerInit(worker_init_fn),
                      generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False)


def steps_per_epoch(loader: DataLoader) -> int:
    sampler = loader.sampler
    return sampler.num_samples // loader.batch_size


def position_loader(loader: DataLoader, seed: int, epoch: int, batch_in_epoch: int) -> None:
    """Set the loader to yield epoch ``epoch`` starting at batch ``batch_in_epoch``."""
    sampler = loader.sampler
    if not isinstance(sampler, ResumableSampler):
        raise TypeError("the loader's position cannot be restored: build it with session.loader(...)")
    sampler.set_epoch(epoch)
    sampler.start_index = batch_in_epoch * loader.batch_size
    loader.generator.manual_seed(seed + epoch)
