"""Torch dataset over cached items: augment image and mask together.

Batches stay uint8 until they reach the device (`normalise` runs there, in
runtime.to_device): a quarter of the bytes through pinned memory and the PCIe bus, and
the loader workers do no float work. Normalisation uses fixed ImageNet statistics, never
per-image min–max, so a picture is scaled the same way in training, validation and test.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from core.runtime import Precision
from data.cache import CachedItem, load_item

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@functools.cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and inverse std (0..255 scale) on `device`, copied there once: a copy per batch
    would be a blocking host-to-device transfer in every training step."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1) * 255
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1) * 255
    return mean.to(device), (1 / std).to(device)


def chw_uint8(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> uint8 (3, H, W), what the dataset hands the loader."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) on any device -> float32 with the ImageNet statistics."""
    mean, inv_std = _statistics(images.device)
    return (images.float() - mean) * inv_std


def to_device(
    batch: dict[str, Any], device: torch.device, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and masks to the device, then normalised and widened there."""
    return images_to_device(batch["image"], device, precision), batch["mask"].to(
        device, non_blocking=True
    ).long()


def images_to_device(
    images: torch.Tensor, device: torch.device, precision: Precision
) -> torch.Tensor:
    """uint8 (N, 3, H, W) images to the device, normalised there, in the model's layout."""
    images = normalise(images.to(device, non_blocking=True))
    if precision.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> normalised float32 (3, H, W), for one image outside a loader."""
    return normalise(chw_uint8(image))


class SegDataset(Dataset):
    """Items from `data.cache.prepare`; `transform` is an albumentations Compose.

    `paste` (training only, e.g. `data.paste.PolypPaste`) edits the image and mask
    together before the transform, so the pasted polyp is augmented like the rest.
    """

    def __init__(
        self,
        items: Sequence[CachedItem],
        transform: Callable[..., dict[str, Any]],
        paste: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    ):
        self.items = list(items)
        self.transform = transform
        self.paste = paste

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = load_item(self.items[index])
        if mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        elif self.paste is not None:
            image, mask = self.paste(image, mask)
        out = self.transform(image=image, mask=mask)
        return {
            "image": chw_uint8(out["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])),
            "index": index,
        }
