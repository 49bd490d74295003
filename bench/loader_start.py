"""Benchmark: how long loader workers take to deliver their first batch, by start method.

`data.loader` starts workers from a fork server with torch, OpenCV and albumentations
preloaded, because workers forked from a stage that has run OpenCV's thread pool deadlock
(tests/test_loader.py). This measures what that costs against plain `fork` (fast but
unsafe after threads) and `spawn` (safe, but every worker imports torch again), on a
cached full-size dataset, so the choice is made on numbers. Writes its BENCHMARKS.md
section.

    python -m bench.loader_start
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader

from bench.report import update_section
from data.augment import build_transforms
from data.cache import prepare
from data.dataset import SegDataset
from data.loader import _init_worker, worker_context
from data.reader import list_train
from data.synthetic import generate

SIZE = (256, 320)


def first_batch_s(dataset: SegDataset, workers: int, context: object, batch: int) -> float:
    """Seconds from building the loader to holding its first batch (workers started)."""
    start = time.perf_counter()
    loader = DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        worker_init_fn=_init_worker,
        multiprocessing_context=context,
    )
    next(iter(loader))
    elapsed = time.perf_counter() - start
    del loader
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="loaders built per method")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        # With OpenCV's pool off in this process, a fork is safe, so `fork` can be timed at
        # all; in the stages the cache's resizes run that pool and `fork` deadlocks.
        cv2.setNumThreads(0)
        data = generate(Path(tmp) / "data", 8, 0, seed=0)
        items = prepare(list_train(data), SIZE, Path(tmp) / "cache", workers=1)
        dataset = SegDataset(items, build_transforms(SIZE, train=False))
        methods = {
            "fork (unsafe after OpenCV threads)": multiprocessing.get_context("fork"),
            "spawn": multiprocessing.get_context("spawn"),
            "forkserver + preload (used)": worker_context(),
        }
        rows = []
        for label, context in methods.items():
            for workers in args.workers:
                times = [first_batch_s(dataset, workers, context, 2) for _ in range(args.repeats)]
                rows.append((label, workers, times[0], min(times[1:] or times)))
    lines = [
        f"Time to the first batch of a new DataLoader over 8 cached full-size images "
        f"(working size {SIZE[0]}×{SIZE[1]}, batch 2), {args.repeats} loaders per row. "
        "The first loader of a forkserver row also starts the server.",
        "",
        "| start method | workers | first loader, s | later loaders (best), s |",
        "|---|---:|---:|---:|",
        *(f"| {m} | {w} | {a:.2f} | {b:.2f} |" for m, w, a, b in rows),
        "",
        "A stage builds 2–4 loaders per fold, each once (persistent workers), so the "
        "difference is paid a few times per fold, not per batch.",
    ]
    update_section("loader_start", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
