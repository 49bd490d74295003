"""Applying region refiners to probability maps, and keeping them on disk.

refine.py trains one refiner per fold and refines the blend's maps with them; infer.py
applies the same refiners, loaded from an exported package, to new images. Both go
through here, so that a package refines exactly as the experiment did: the same crops,
the same paste, and the same numerics (`portable_numerics`).

The refiners are stored as one safetensors file (tensors only, nothing that runs code
on load), one key prefix per fold, with the network's width in its metadata.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import safetensors.torch
import torch

from chain.regions import (
    CROP_CHANNELS,
    Region,
    crop_target,
    paste_region,
    predicted_regions,
    region_crop,
    true_labels,
)
from core.settings import RefineSettings
from data.atomic import atomic_write
from data.reader import DataError
from models.refiner import RegionRefiner


@dataclass
class RegionSet:
    """The regions of some images, as crops, with their truth when the images have one."""

    image_ids: list[str]  # per region
    image_index: np.ndarray  # per region: the image's row in the store
    regions: list[Region]
    crops: np.ndarray  # float16 (M, CROP_CHANNELS, side, side)
    labels: np.ndarray | None  # (M,) true label: FALSE_POSITIVE, 1 or 2
    masks: np.ndarray | None  # float16 (M, side, side) mask targets

    def __len__(self) -> int:
        return len(self.regions)

    def take(self, rows: np.ndarray) -> RegionSet:
        return RegionSet(
            [self.image_ids[r] for r in rows],
            self.image_index[rows],
            [self.regions[r] for r in rows],
            self.crops[rows],
            None if self.labels is None else self.labels[rows],
            None if self.masks is None else self.masks[rows],
        )


def collect_regions(
    ids: Sequence[str],
    images: Sequence[np.ndarray],
    probs: np.ndarray,
    targets: np.ndarray | None,
    settings: RefineSettings,
) -> RegionSet:
    """Every predicted region of every image as a crop (and its truth when `targets`)."""
    image_ids, index, regions, crops, labels, masks = [], [], [], [], [], []
    for i, image_id in enumerate(ids):
        p = probs[i].astype(np.float32) / 255.0 if probs.dtype == np.uint8 else probs[i]
        region_labels, found, _ = predicted_regions(probs[i], settings.margin)
        truth = None if targets is None else true_labels(region_labels, len(found), targets[i])
        for region in found:
            mask = region_labels == region.label
            image_ids.append(image_id)
            index.append(i)
            regions.append(region)
            crops.append(region_crop(images[i], p, mask, region.box, settings.crop))
            if truth is not None:
                labels.append(truth[region.label])
                masks.append(crop_target(targets[i], region_labels, region, settings.crop))
    side = settings.crop
    return RegionSet(
        image_ids,
        np.asarray(index, np.int64),
        regions,
        np.asarray(crops, np.float16).reshape(-1, CROP_CHANNELS, side, side),
        None if targets is None else np.asarray(labels, np.int64),
        None if targets is None else np.asarray(masks, np.float16).reshape(-1, side, side),
    )


def tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32)).to(device)


@torch.no_grad()
def predict_regions(
    models: Sequence[RegionRefiner], data: RegionSet, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (M, 3), polyp probabilities (M, side, side)), mean over models.

    Each forward pass holds the regions of one image only: a kernel may sum in another
    order for another batch, so an image refined alone (infer.py streams its images)
    gets the same maps as inside the whole test set (refine.py).
    """
    side = data.crops.shape[-1]
    classes = np.zeros((len(data), 3), np.float32)
    polyp = np.zeros((len(data), side, side), np.float32)
    starts = np.flatnonzero(np.diff(data.image_index, prepend=-1)).tolist()
    for first, end in zip(starts, [*starts[1:], len(data)][: len(starts)], strict=True):
        for lo in range(first, end, batch_size):
            hi = min(lo + batch_size, end)
            for model in models:
                x = tensor(data.crops[lo:hi], next(model.parameters()).device)
                class_logits, mask_logits = model(x)
                classes[lo:hi] += class_logits.softmax(1).cpu().numpy() / len(models)
                polyp[lo:hi] += torch.sigmoid(mask_logits).cpu().numpy() / len(models)
    return classes, polyp


def paste(
    probs: np.ndarray, data: RegionSet, classes: np.ndarray, polyp: np.ndarray | None
) -> np.ndarray:
    """Refined uint8 maps: `probs` (uint8 codes) with every region of `data` rewritten;
    `polyp` None keeps the first stage's masks and refines only the regions' classes."""
    out = probs.copy()
    by_image: dict[int, list[int]] = {}
    for row, i in enumerate(data.image_index.tolist()):
        by_image.setdefault(i, []).append(row)
    for i, rows in by_image.items():
        labels, _, _ = predicted_regions(probs[i])
        refined = probs[i].astype(np.float32) / 255.0
        for row in rows:
            mask = None if polyp is None else polyp[row]
            paste_region(refined, labels, data.regions[row], classes[row], mask)
        out[i] = np.rint(np.clip(refined, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def refine_test(
    models: Sequence[RegionRefiner],
    ids: Sequence[str],
    images: Sequence[np.ndarray],
    probs: np.ndarray,
    settings: RefineSettings,
    use_mask: bool,
) -> np.ndarray:
    """Test maps refined with the mean of the fold refiners' outputs (their masks too
    only when `use_mask`, the OOF decision in refine.json's `refined_mask`)."""
    data = collect_regions(ids, images, probs, None, settings)
    classes, polyp = predict_regions(models, data)
    return paste(probs, data, classes, polyp if use_mask else None)


@contextmanager
def portable_numerics(threads: int) -> Iterator[None]:
    """Refiner numerics that do not depend on the machine: `threads` torch threads, and
    OpenCV's portable code path (the crops are resized in float, where its AVX2 and
    AVX-512 paths round differently, 1e-5, enough to move a trained refiner). The
    caller's settings are given back: the pipeline runs refine.py in-process."""
    saved, optimized = torch.get_num_threads(), cv2.useOptimized()
    torch.set_num_threads(threads)
    cv2.setUseOptimized(False)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
        cv2.setUseOptimized(optimized)


def save_refiners(path: Path, models: Sequence[RegionRefiner], width: int) -> None:
    """The fold refiners as one safetensors file (`fold<k>.` prefixes), written atomically."""
    tensors = {
        f"fold{k}.{name}": value.detach().cpu().contiguous()
        for k, model in enumerate(models)
        for name, value in model.state_dict().items()
    }
    meta = {"folds": str(len(models)), "width": str(width), "in_channels": str(CROP_CHANNELS)}
    with atomic_write(path, "wb") as fh:
        fh.write(safetensors.torch.save(tensors, meta))


def load_refiners(path: Path, device: torch.device | str = "cpu") -> list[RegionRefiner]:
    """The fold refiners of `save_refiners`, in eval mode; DataError naming the file."""
    try:
        with safetensors.safe_open(str(path), "pt", device=str(device)) as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        folds, width = int(meta["folds"]), int(meta["width"])
        models = []
        for k in range(folds):
            prefix = f"fold{k}."
            state = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
            model = RegionRefiner(int(meta.get("in_channels", CROP_CHANNELS)), width)
            model.load_state_dict(state)
            models.append(model.to(device).eval())
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path}: not a file of fold refiners ({exc})") from exc
    return models
