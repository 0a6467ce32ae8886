"""Batch samplers: the paper's random batches, and P identities x K images."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["RandomBatchSampler", "IdentityBatchSampler"]


class RandomBatchSampler(Sampler[list[int]]):
    """The paper's batches: ``batch_size`` images drawn at random from all cameras, reshuffled
    every epoch; every pair in a batch is a training pair. The last short batch is dropped."""

    def __init__(self, num_images: int, batch_size: int = 128, seed: int = 0) -> None:
        if num_images < batch_size:
            raise ValueError(f"{num_images} images cannot fill a batch of {batch_size}")
        self.num_images, self.batch_size = num_images, batch_size
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_images // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_images, generator=g).tolist()
        for k in range(len(self)):
            yield order[k * self.batch_size:(k + 1) * self.batch_size]


class IdentityBatchSampler(Sampler[list[int]]):
    """Batches of P identities x K images (``batch_size = P * K``), so that every batch holds
    positive pairs: P * K(K-1)/2 of them. Identities with fewer than K images are sampled with
    replacement. One epoch visits every identity about once."""

    def __init__(self, pids: Sequence[int], batch_size: int = 128, instances: int = 4,
                 seed: int = 0) -> None:
        if batch_size % instances:
            raise ValueError(f"batch_size {batch_size} is not a multiple of K={instances}")
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.by_pid[int(pid)].append(index)
        self.ids_per_batch = batch_size // instances
        if len(self.by_pid) < self.ids_per_batch:
            raise ValueError(f"{len(self.by_pid)} identities cannot fill "
                             f"{self.ids_per_batch} per batch")
        self.instances, self.seed, self.epoch = instances, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.by_pid) // self.ids_per_batch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        pids = list(self.by_pid)
        order = [pids[i] for i in torch.randperm(len(pids), generator=g).tolist()]
        for k in range(len(self)):
            batch = []
            for pid in order[k * self.ids_per_batch:(k + 1) * self.ids_per_batch]:
                images = self.by_pid[pid]
                if len(images) >= self.instances:
                    pick = torch.randperm(len(images), generator=g)[:self.instances]
                else:
                    pick = torch.randint(len(images), (self.instances,), generator=g)
                batch += [images[i] for i in pick.tolist()]
            yield batch
