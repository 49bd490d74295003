"""Torch dataset over cached items: augment image and mask together, then normalise.

Normalisation uses fixed ImageNet statistics, never per-image min–max, so a picture is
scaled the same way in training, validation and test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data.cache import CachedItem, load_item

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

_MEAN = np.array(MEAN, np.float32) * 255
_INV_STD = 1 / (np.array(STD, np.float32) * 255)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> normalised float32 (3, H, W)."""
    normalised = (image.astype(np.float32) - _MEAN) * _INV_STD
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


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
            "image": to_tensor(out["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])).long(),
            "index": index,
        }
