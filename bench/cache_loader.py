"""Benchmark: DataLoader throughput from raw JPEGs versus from the preprocessed cache.

Both loaders use the same training transforms, batch size and worker count. The raw one
decodes each full-size JPEG image and JPEG mask, decodes the mask colours and resizes
both for every sample (what a loader without `data.cache` would do); the cached one only
`np.load`s arrays already at the working size. Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench.report import update_section
from data.augment import build_transforms
from data.cache import prepare, resize_pair
from data.dataset import SegDataset, to_tensor
from data.reader import Sample, list_train, load_image, load_mask
from data.synthetic import generate, parse_size

log = logging.getLogger(__name__)


class RawDataset(Dataset):
    """The uncached baseline: decode and resize every sample from the JPEG files."""

    def __init__(self, samples: list[Sample], size: tuple[int, int], transform: Any):
        self.samples, self.size, self.transform = samples, size, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image, mask = resize_pair(load_image(sample.image), load_mask(sample.mask), self.size)
        out = self.transform(image=image, mask=mask)
        return {
            "image": to_tensor(out["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])).long(),
            "index": index,
        }


def throughput(dataset: Dataset, batch_size: int, workers: int, passes: int) -> float:
    """Samples per second over `passes` epochs, after one untimed warm-up epoch."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in range(passes):
        for _ in loader:
            pass
    return passes * len(dataset) / (time.perf_counter() - start)


def run(
    n_images: int, size: tuple[int, int], batch_size: int, workers: int, passes: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = generate(Path(tmp) / "data", n_images, 0, seed=0, workers=max(workers, 1))
        samples = list_train(data_dir)
        start = time.perf_counter()
        items = prepare(samples, size, Path(tmp) / "cache", workers=max(workers, 1))
        prepare_s = time.perf_counter() - start
        transform = build_transforms(size, train=True)
        raw = throughput(RawDataset(samples, size, transform), batch_size, workers, passes)
        cached = throughput(SegDataset(items, transform), batch_size, workers, passes)
    return {"raw": raw, "cached": cached, "prepare_s": prepare_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=64, help="synthetic full-size images")
    parser.add_argument(
        "--size", type=parse_size, default=(352, 448), help="working size HxW (default 352x448)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="DataLoader batch size")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers"
    )
    parser.add_argument("--passes", type=int, default=3, help="timed epochs per loader")
    parser.add_argument(
        "--no-report", action="store_true", help="print only; leave BENCHMARKS.md alone"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    r = run(args.n_images, args.size, args.batch_size, args.workers, args.passes)
    h, w = args.size
    markdown = f"""
{args.n_images} synthetic images of 1280×959–1024 (JPEG image + JPEG mask), working size
{h}×{w}, training transforms, batch {args.batch_size}, {args.workers} DataLoader workers,
{args.passes} timed epochs after one warm-up; shared CPU cores, so expect some noise.

| loader | samples/s |
|---|---|
| raw: decode JPEGs + decode mask + resize per sample | {r["raw"]:.1f} |
| cache: `np.load` of arrays at working size (`data.cache`) | {r["cached"]:.1f} |

The cache is {r["cached"] / r["raw"]:.1f}× faster; building it took {r["prepare_s"]:.1f} s
for the {args.n_images} images (once per dataset and working size).
"""
    print(markdown)
    if not args.no_report:
        update_section("cache_loader", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
