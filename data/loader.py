"""Data loaders whose every random draw is a function of (seed, epoch, sample).

Neither the shuffle nor the augmentation depends on what ran before, which is what makes a
run resumed from a checkpoint draw the same batches as one that never stopped, whatever the
number of loader workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from data.dataset import SegDataset
from runtime import derive_seed


class SeededSampler(Sampler[tuple[int, int]]):
    """Shuffled (and, under DDP, sharded) indices, each with its own augmentation seed.

    The permutation comes from DistributedSampler seeded by (seed, epoch); the per-sample
    seed from (seed, epoch, index). Neither depends on what ran before, which is what makes
    a resumed run draw the same batches and augmentations as an uninterrupted one.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.seed = seed
        self.epoch = 0
        self.inner = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.inner:
            yield index, derive_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return len(self.inner)


class SeededDataset(Dataset):
    """Reseeds every random source (albumentations' own generators included) per sample.

    The transform reseeded is the dataset's own, so the two can never disagree.
    """

    def __init__(self, dataset: SegDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.dataset.transform.set_random_seed(seed)
        return self.dataset[index]


def _init_worker(_: int) -> None:
    # OpenCV's own thread pool in every worker would oversubscribe the cores.
    import cv2

    cv2.setNumThreads(1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    sampler: Any,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        worker_init_fn=_init_worker if num_workers > 0 else None,
    )
