"""Data loaders whose every random draw is a function of (seed, epoch, sample).

Neither the shuffle nor the augmentation depends on what ran before, which is what makes a
run resumed from a checkpoint draw the same batches as one that never stopped, whatever the
number of loader workers.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from core.invocation import rerun_with
from core.runtime import derive_seed
from core.settings import DataSettings
from data.dataset import SegDataset
from data.reader import DataError

log = logging.getLogger(__name__)


class SeededSampler(Sampler[tuple[int, int]]):
    """Shuffled (and, under DDP, sharded) indices, each with its own augmentation seed.

    The permutation comes from DistributedSampler seeded by (seed, epoch); the per-sample
    seed from (seed, epoch, index). Neither depends on what ran before, which is what makes
    a resumed run draw the same batches and augmentations as an uninterrupted one.

    With `weights` (one per item) an epoch is instead `n` draws with replacement in
    proportion to them, e.g. images with non-neoplastic polyps twice as often: class-aware
    sampling against the 693 / 257 / 50 imbalance. The draws are seeded the same way.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = rank, world_size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.inner = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def _indices(self) -> list[int]:
        if self.weights is None:
            return list(self.inner)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        # Every rank gets exactly len(self) draws, as DDP needs equal batch counts.
        total = len(self) * self.world_size
        draws = torch.multinomial(self.weights, total, True, generator=gen)
        return draws.tolist()[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self._indices()):
            if self.weights is None:
                yield index, derive_seed(self.seed, self.epoch, index)
            else:
                # An image drawn twice in an epoch gets two different augmentations.
                yield index, derive_seed(self.seed, self.epoch, index, position, self.rank)

    def __len__(self) -> int:
        return len(self.inner)


def stratum_weights(
    strata: Sequence[str], by_stratum: dict[str, float] | None
) -> list[float] | None:
    """Per-item sampling weights from `data.sampling` ({stratum: weight}, default 1)."""
    if not by_stratum:
        return None
    return [float(by_stratum.get(s, 1.0)) for s in strata]


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


# Seconds a loader may deliver nothing before the stage stops (`data.loader_timeout_s`).
DEFAULT_TIMEOUT_S = 600.0
# How often a waiting loader checks that its workers live. The workers are the fork
# server's children, so the SIGCHLD PyTorch listens for never reaches the stage: without
# this a worker killed by the out-of-memory killer was noticed only at the timeout.
POLL_S = 5.0
# Imported once by the fork server, so each worker forked from it starts in milliseconds.
_PRELOAD = ["torch", "cv2", "albumentations", "data.dataset", "data.loader"]


class LoaderStalled(RuntimeError):
    """A loader's worker died, or delivered no batch within the timeout (hung)."""


def _init_worker(_: int) -> None:
    # OpenCV's own thread pool in every worker would oversubscribe the cores.
    import cv2

    cv2.setNumThreads(1)


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of every loader worker: a fork server, never a fork of the stage.

    A worker forked from the stage itself inherits whatever locks the stage's threads held
    at that instant: after the cache's threaded `cv2.resize` of full-size images, OpenCV's
    pool lock is one, and the worker deadlocks in its first OpenCV call. The fork server is
    a fresh process that only imports modules (no threads run there), so what a worker
    inherits from it is clean; the preloaded imports keep the start-up near fork's cost
    (bench/loader_start.py), unlike `spawn`, which re-imports torch in every worker.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class WatchedLoader(DataLoader):
    """A DataLoader that names itself when its workers die or stop delivering batches.

    It waits in steps of the DataLoader's own `timeout` (POLL_S), at each of which
    PyTorch checks its workers: a dead one is reported at once, a hung one once `stall_s`
    has passed without a batch. Either way the error says which stage's loader it was.
    """

    def __init__(self, *args: Any, name: str, stall_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = name
        self.stall_s = stall_s

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        while True:
            waited = 0.0
            while True:
                try:
                    batch = next(batches)
                    break
                except StopIteration:
                    return
                except DataError as exc:
                    raise DataError(_own_words(exc)) from exc
                except RuntimeError as exc:
                    waited += self.timeout
                    self._judge(exc, waited)
            yield batch

    def _judge(self, exc: RuntimeError, waited: float) -> None:
        """Return to wait on (a step of a slow batch), or raise what the stage reports."""
        if "exited unexpectedly" in str(exc):
            raise LoaderStalled(
                f"{self.name}: a data loader worker died ({exc}; the out-of-memory killer, "
                "or a crash in a C library). Lower data.num_workers or train.batch_size, or "
                f"load in the main process: {_without_workers()}"
            ) from exc
        if "timed out" not in str(exc):
            raise exc
        if waited >= self.stall_s:
            raise LoaderStalled(
                f"{self.name}: the data loader delivered nothing for {self.stall_s:.0f} s "
                "(a hung worker); stopped instead of waiting forever. Raise "
                "data.loader_timeout_s if batches are genuinely that slow, or load in the main "
                f"process: {_without_workers()}"
            ) from exc


def _without_workers() -> str:
    """The user's command again, loading in the main process (no worker to die or hang)."""
    return rerun_with({"data.num_workers": "0"}, {"data.num_workers": "--workers"})


def _own_words(exc: DataError) -> str:
    """A worker's DataError without the worker's traceback, which PyTorch puts into the
    message it re-raises, so the stage still reports it in one line."""
    text = str(exc)
    if not text.startswith("Caught DataError"):
        return text
    return text.rstrip().splitlines()[-1].split(": ", 1)[-1]


def cores_available() -> int:
    """The cores this process may run on (its CPU affinity, as a container or `taskset`
    limits it), which is also the count torch's DataLoader warns above."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers(asked: int) -> int:
    """The workers a loader starts for `data.num_workers` = `asked`: at most one per core
    available. More only queue for the same cores (torch warns of slowness or a freeze),
    and since every draw is seeded per sample the batches are the same with fewer."""
    cores = cores_available()
    if asked > cores:
        _say_capped(asked, cores)
    return min(asked, cores)


@functools.cache
def _say_capped(asked: int, cores: int) -> None:
    log.info(
        "data.num_workers %d: %d core(s) available here, so %d loader workers", asked, cores, cores
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    sampler: Any,
    drop_last: bool = False,
    *,
    name: str = "data loader",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DataLoader:
    """A loader whose workers start clean (fork server) and whose stalls are errors, with
    at most one worker per core (`loader_workers`)."""
    num_workers = loader_workers(num_workers)
    workers = num_workers > 0
    return WatchedLoader(
        dataset,
        name=name,
        stall_s=float(timeout_s),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        worker_init_fn=_init_worker if workers else None,
        multiprocessing_context=worker_context() if workers else None,
        timeout=min(POLL_S, float(timeout_s)) if workers else 0,
    )


def config_loader(
    cfg: dict[str, Any],
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    sampler: Any,
    *,
    name: str,
    drop_last: bool = False,
) -> DataLoader:
    """`make_loader` with the experiment's worker count and stall timeout."""
    data = DataSettings.from_config(cfg)
    return make_loader(
        dataset,
        batch_size,
        data.num_workers,
        device,
        sampler,
        drop_last,
        name=name,
        timeout_s=data.loader_timeout_s,
    )
