"""Run-length encoding and the Kaggle submission file (`Id,Expected`).

Each test image gives two rows: `{id}_0` for the neoplastic mask (class 1) and `{id}_1`
for the non-neoplastic mask (class 2), each the RLE of a binary mask at the image's
original size, flattened row-major (C order), as space-separated `start length` pairs
with 1-indexed starts in increasing order; an empty mask is an empty string.

`check_submission` re-reads a written file against the test folder, so a submission is
only uploaded once every row is known to be well formed and at the right size.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from core.config import reports_environment_errors
from data.atomic import atomic_write
from data.reader import DataError, list_test

HEADER = ("Id", "Expected")
# Row suffix -> class id in the class map.
ROW_CLASSES = {"0": 1, "1": 2}


def rle_encode(mask: np.ndarray) -> str:
    """RLE of the non-zero pixels of a 2-D mask (C order, 1-indexed starts)."""
    flat = np.asarray(mask).ravel() != 0
    padded = np.concatenate(([False], flat, [False]))
    # Positions where the value changes: run starts (0-indexed + 1) and run ends, alternating.
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    edges[1::2] -= edges[::2]
    edges[::2] += 1
    return " ".join(map(str, edges.tolist()))


def parse_runs(text: str, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated (0-indexed starts, lengths) of an RLE string; ValueError says what is wrong."""
    parts = text.split()
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        values = np.asarray(parts).astype(np.int64)
    except ValueError as exc:
        raise ValueError(f"non-integer value in runs ({exc})") from None
    if values.size % 2:
        raise ValueError(f"odd number of values ({values.size}); runs are start/length pairs")
    starts, lengths = values[::2] - 1, values[1::2]
    if (starts < 0).any():
        raise ValueError("a run starts before pixel 1")
    if (lengths <= 0).any():
        raise ValueError("a run has a non-positive length")
    ends = starts + lengths
    if (starts[1:] < ends[:-1]).any():
        raise ValueError("runs overlap or are not in increasing order")
    if ends[-1] > n_pixels:
        raise ValueError(f"a run ends at pixel {int(ends[-1])}, beyond the {n_pixels} pixels")
    return starts, lengths


def rle_decode(text: str, size: tuple[int, int]) -> np.ndarray:
    """Binary uint8 mask of shape `size` = (h, w) from an RLE string."""
    h, w = size
    starts, lengths = parse_runs(text, h * w)
    delta = np.zeros(h * w + 1, np.int8)
    # Validated runs have distinct starts and distinct ends, so plain fancy updates suffice.
    delta[starts] += 1
    delta[starts + lengths] -= 1
    return np.cumsum(delta[:-1], dtype=np.int8).astype(np.uint8).reshape(h, w)


def write_submission(path: str | Path, items: Iterable[tuple[str, np.ndarray]]) -> int:
    """Write `Id,Expected` rows for (image_id, class map at original size); returns #images.

    Atomic: a run killed half-way leaves any previous submission in place.
    """
    count = 0
    with atomic_write(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADER)
        for image_id, class_map in items:
            for suffix, cls in ROW_CLASSES.items():
                writer.writerow((f"{image_id}_{suffix}", rle_encode(class_map == cls)))
            count += 1
    return count


def image_size(path: Path) -> tuple[int, int]:
    """(h, w) from the file header only, so checking 200 test images takes milliseconds."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except OSError as exc:
        raise DataError(f"{path}: cannot read image header ({exc})") from exc
    return h, w


def check_submission(path: str | Path, data_dir: str | Path) -> list[str]:
    """Every reason `path` is not a valid submission for the test images in `data_dir`."""
    return check_rows(path, {s.id: image_size(s.image) for s in list_test(data_dir)})


def check_rows(path: str | Path, sizes: Mapping[str, tuple[int, int]]) -> list[str]:
    """Every reason `path` is not a valid submission for images of these ids and (h, w)."""
    path = Path(path)
    try:
        # csv's default field limit (128 KiB) refused the valid runs of a large detailed
        # image; no field is longer than the file
        csv.field_size_limit(max(csv.field_size_limit(), path.stat().st_size))
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [f"{path}: cannot read ({exc})"]
    if not rows or tuple(rows[0]) != HEADER:
        got = rows[0] if rows else "an empty file"
        return [f"{path}: header must be {','.join(HEADER)}, got {got}"]

    problems: list[str] = []
    seen: set[str] = set()
    # An image's first valid row, bit-packed, until its other row comes: holding every
    # decoded mask took 2 bytes per test pixel (0.8 GB for eight 8000 x 6000 frames).
    waiting: dict[str, np.ndarray] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        where = f"line {line_no}"
        if len(row) != 2:
            problems.append(f"{where}: expected 2 fields, got {len(row)}")
            continue
        row_id, runs = row
        image_id, _, suffix = row_id.rpartition("_")
        if image_id not in sizes or suffix not in ROW_CLASSES:
            problems.append(f"{where}: {row_id!r} is not a test image row (extra row)")
            continue
        if row_id in seen:
            problems.append(f"{where}: duplicate row {row_id}")
            continue
        seen.add(row_id)
        try:
            mask = np.packbits(rle_decode(runs, sizes[image_id]))
        except ValueError as exc:
            problems.append(f"{where}: {row_id}: {exc}")
            continue
        other = waiting.pop(image_id, None)
        if other is None:
            waiting[image_id] = mask
            continue
        both = int(np.unpackbits(mask & other).sum())
        if both:
            problems.append(f"{image_id}: _0 and _1 masks overlap on {both} pixels")

    for image_id in sorted(sizes):
        problems += [
            f"missing row {image_id}_{s}" for s in ROW_CLASSES if f"{image_id}_{s}" not in seen
        ]
    return problems


@reports_environment_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a submission file for the test images.")
    parser.add_argument("--check", required=True, type=Path, help="submission CSV to check")
    parser.add_argument(
        "--data-dir", required=True, type=Path, help="dataset folder holding test/ (any layout)"
    )
    args = parser.parse_args(argv)
    try:
        problems = check_submission(args.check, args.data_dir)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if problems:
        for line in problems:
            print(line)
        print(f"INVALID: {len(problems)} problem(s) in {args.check}")
        return 1
    n = len(list_test(args.data_dir))
    print(f"OK: {args.check} has both rows for all {n} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
