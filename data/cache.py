"""Preprocessed cache: every image decoded and resized once, every mask decoded once.

Decoding a 1280×~1000 JPEG, decoding its JPEG mask and resizing both costs far more than
the augmentations, and it would be repeated every epoch by every model and fold. Here it
is done once per item and stored as uint8 `.npy` files at the working size (images with
INTER_AREA; masks decoded at full size, then resized nearest-neighbour so no class is
invented at boundaries). Each item is keyed on its source files (path, mtime, ctime, byte size),
the working size and the mask thresholds, so a changed file re-processes just that item.

Alongside the arrays each item records its original (h, w), needed to bring predictions
back to full size, its stratum, needed by the folds, and the sha256 of its source files,
a fold's identity (recipe.py): hashed from the bytes read for decoding, so knowing that
a file is unchanged costs nothing beyond the stat of its key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from core.settings import DataSettings, ExperimentSettings, layout_of
from core.ticker import Ticker
from data.atomic import atomic_write, write_json
from data.reader import (
    DataError,
    MaskThresholds,
    Sample,
    check_image_file,
    decode_image,
    decode_mask,
    list_train,
    stratum,
)

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: the items record their files' sha256
# Stratum recorded for items without a mask (test images).
UNKNOWN = "unknown"


@dataclass(frozen=True)
class CachedItem:
    id: str
    orig_size: tuple[int, int]
    classes: str
    image_file: Path
    mask_file: Path | None
    ambiguous_pixels: int = 0
    image_sha256: str = ""
    mask_sha256: str | None = None


def resize_pair(
    image: np.ndarray, class_map: np.ndarray | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image with INTER_AREA (no aliasing), class map nearest (only existing classes)."""
    h, w = size
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    if class_map is not None:
        class_map = cv2.resize(class_map, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, class_map


def _file_key(path: Path) -> list[str | int]:
    """A file's identity without reading it. The change time is in it because a file
    replaced by one of the same size and modification time (`cp -p`, a restored backup)
    still gets a new one: no program can set it."""
    st = path.stat()
    return [str(path.resolve()), st.st_mtime_ns, st.st_ctime_ns, st.st_size]


def item_key(sample: Sample, size: tuple[int, int], thresholds: MaskThresholds) -> str:
    """Hash of everything the cached arrays depend on."""
    parts = {
        "version": CACHE_VERSION,
        "image": _file_key(sample.image),
        "mask": _file_key(sample.mask) if sample.mask is not None else None,
        "size": list(size),
        "thresholds": thresholds.key(),
    }
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _paths(folder: Path, item_id: str) -> tuple[Path, Path, Path]:
    return (
        folder / f"{item_id}.json",
        folder / f"{item_id}.image.npy",
        folder / f"{item_id}.mask.npy",
    )


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as fh:
        np.save(fh, array)


def _readable_npy(path: Path) -> bool:
    """The array's header parses and the file holds all its bytes (a cheap memory map).

    A damaged or truncated array is then simply processed again, instead of failing later
    inside a loader worker.
    """
    try:
        np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return True


def _read(path: Path) -> tuple[np.ndarray, str]:
    """The decoded image and the sha256 of the bytes it was decoded from (one read)."""
    data = check_image_file(path)
    return decode_image(data, path), hashlib.sha256(data).hexdigest()


def _from_cache(sample: Sample, folder: Path, key: str) -> CachedItem | None:
    meta_file, image_file, mask_file = _paths(folder, sample.id)
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return None
    has_mask = sample.mask is not None
    if meta.get("key") != key or not _readable_npy(image_file):
        return None
    if has_mask and not _readable_npy(mask_file):
        return None
    h, w = meta["orig_size"]
    return CachedItem(
        sample.id,
        (h, w),
        meta["classes"],
        image_file,
        mask_file if has_mask else None,
        int(meta.get("ambiguous_pixels", 0)),
        meta["sha256"]["image"],
        meta["sha256"]["mask"],
    )


def _process(
    sample: Sample, size: tuple[int, int], folder: Path, thresholds: MaskThresholds, key: str
) -> CachedItem:
    meta_file, image_file, mask_file = _paths(folder, sample.id)
    image, image_sha = _read(sample.image)
    class_map, classes, n_ambiguous, mask_sha = None, UNKNOWN, 0, None
    if sample.mask is not None:
        rgb, mask_sha = _read(sample.mask)
        class_map, n_ambiguous = decode_mask(rgb, thresholds)
        if class_map.shape != image.shape[:2]:
            raise DataError(
                f"{sample.mask}: mask size {class_map.shape} differs from image size "
                f"{image.shape[:2]} of {sample.image}"
            )
        classes = stratum(class_map)
    small_image, small_mask = resize_pair(image, class_map, size)
    _save_npy(image_file, small_image)
    if small_mask is not None:
        _save_npy(mask_file, small_mask)
    h, w = image.shape[:2]
    # The metadata goes last: its key vouches for the arrays written before it.
    write_json(
        meta_file,
        {
            "key": key,
            "orig_size": [h, w],
            "classes": classes,
            "ambiguous_pixels": n_ambiguous,
            "sha256": {"image": image_sha, "mask": mask_sha},
        },
    )
    return CachedItem(
        sample.id,
        (h, w),
        classes,
        image_file,
        mask_file if class_map is not None else None,
        n_ambiguous,
        image_sha,
        mask_sha,
    )


def _try_process(*args) -> CachedItem | DataError:
    try:
        return _process(*args)
    except DataError as exc:
        return exc


def prepare(
    samples: Sequence[Sample],
    size: tuple[int, int],
    cache_dir: str | Path,
    thresholds: MaskThresholds | None = None,
    workers: int | None = None,
) -> list[CachedItem]:
    """Cached items for `samples` (same order), processing only new or changed ones.

    Every unusable file is reported in one DataError, not just the first.
    """
    thresholds = thresholds or MaskThresholds()
    size = (int(size[0]), int(size[1]))
    folder = Path(cache_dir) / f"{size[0]}x{size[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    items: list[CachedItem | None] = []
    todo: list[tuple[int, Sample, str]] = []
    for index, sample in enumerate(samples):
        key = item_key(sample, size, thresholds)
        cached = _from_cache(sample, folder, key)
        items.append(cached)
        if cached is None:
            todo.append((index, sample, key))
    if todo:
        jobs = (delayed(_try_process)(s, size, folder, thresholds, k) for _, s, k in todo)
        results = Parallel(
            n_jobs=workers or os.cpu_count() or 1, prefer="threads", return_as="generator"
        )(jobs)
        errors = []
        with Ticker(f"cache {folder.name}", len(todo), "images", logger=log) as ticker:
            bar = tqdm(results, total=len(todo), desc="cache", unit="img", disable=None)
            for (index, _, _), result in zip(todo, ticker.track(bar), strict=True):
                if isinstance(result, DataError):
                    errors.append(str(result))
                else:
                    items[index] = result
        if errors:
            raise DataError("cannot cache:\n  " + "\n  ".join(errors))
    log.info("cache %s: %d reused, %d processed", folder, len(samples) - len(todo), len(todo))
    return [item for item in items if item is not None]


def check_masks(
    items: Sequence[CachedItem], mask_files: dict[str, Path], data: DataSettings
) -> None:
    """Refuse masks that decode to no polyp, or mostly to colours that are neither class.

    Every NeoPolyp training image shows a polyp, so an all-background mask is a wrong
    file or wrong thresholds, and training on it silently teaches "no polyp here".
    `data.allow_empty_masks: true` and `data.max_ambiguous_frac` (default 0.02 of the
    image) accept them knowingly.
    """
    allow_empty = data.allow_empty_masks
    limit = data.max_ambiguous_frac
    problems = []
    for it in items:
        frac = it.ambiguous_pixels / (it.orig_size[0] * it.orig_size[1])
        if it.classes == "none" and not allow_empty:
            problems.append(f"{mask_files[it.id]}: no red or green polyp pixels")
        if frac > limit:
            problems.append(
                f"{mask_files[it.id]}: {frac:.1%} of pixels are neither black, red nor green "
                f"(data.max_ambiguous_frac is {limit:.1%})"
            )
    if problems:
        raise DataError(
            "masks that would train as something else:\n  "
            + "\n  ".join(problems)
            + "\nFix the files or the thresholds (data.mask), or accept them with "
            "data.allow_empty_masks: true / a larger data.max_ambiguous_frac"
        )


def load_item(item: CachedItem) -> tuple[np.ndarray, np.ndarray | None]:
    """Image (uint8 HxWx3) and class map (uint8 HxW, or None) at the working size.

    A file gone or damaged since the cache was checked (another run cleaning the cache,
    a disk error) is a DataError naming it: a rerun rebuilds that item.
    """
    try:
        image = np.load(item.image_file)
        mask = np.load(item.mask_file) if item.mask_file is not None else None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cache of {item.id} unreadable during the run ({exc}); "
            "run the command again: it rebuilds the item"
        ) from exc
    return image, mask


def prepare_for_config(
    cfg: dict[str, Any], samples: Sequence[Sample], size: Sequence[int] | None = None
) -> list[CachedItem]:
    """`prepare` with an experiment config's cache folder, working size, thresholds, workers.

    Every stage goes through here, so all of them read the same cache entries.
    """
    data = DataSettings.from_config(cfg)
    return prepare(
        samples,
        size=tuple(size or data.img_size),
        cache_dir=layout_of(cfg).cache,
        thresholds=MaskThresholds.from_mapping(data.mask),
        workers=max(1, data.num_workers),
    )


def train_items(
    cfg: dict[str, Any], ids: Sequence[str], size: Sequence[int] | None = None
) -> list[CachedItem]:
    """The cached training items of `ids`, in that order (e.g. an OOF store's order)."""
    samples = {s.id: s for s in list_train(ExperimentSettings.from_config(cfg).data())}
    missing = [i for i in ids if i not in samples]
    if missing:
        raise DataError(f"{len(missing)} ids have no training image, e.g. {missing[0]}")
    return prepare_for_config(cfg, [samples[i] for i in ids], size)


def load_targets(cfg: dict[str, Any], ids: Sequence[str], size: Sequence[int]) -> np.ndarray:
    """Ground-truth class maps (N, H, W) of `ids` at working `size`, from the cache.

    What the optuna stages (ensemble.py, tune.py) score their OOF maps against.
    """
    return np.stack([load_item(it)[1] for it in train_items(cfg, ids, size)])
