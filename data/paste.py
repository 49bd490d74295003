"""Copy-paste of whole polyps into free space of other images ("spatially exclusive paste").

One team reported +2% on the NeoPolyp leaderboard from it: the non-neoplastic class is
rare (257 + 50 of 1000 images), and pasting those polyps into other frames shows the model
more of them, in new surroundings, without inventing anything the data does not contain.

A pasted polyp never touches an existing one (a margin around every polyp is kept free)
and stays inside the endoscope's field of view (no pixel lands on the black border), so
the ground truth stays a true drawing of the picture: every pasted pixel is labelled with
the donor's class and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from data.cache import CachedItem, load_item

# Pixels darker than this (mean of RGB) count as the black border around the view.
_BORDER_LEVEL = 20


@dataclass(frozen=True)
class Placed:
    """Where a polyp was pasted: top-left corner, its pixel mask there, and its class."""

    y: int
    x: int
    region: np.ndarray  # bool, the donor polyp's pixels within its bounding box
    cls: int


def donor_regions(mask: np.ndarray, classes: Sequence[int]) -> list[tuple[slice, slice, int]]:
    """Bounding boxes (and class) of each connected polyp region of `classes`."""
    out = []
    for cls in classes:
        n, _, stats, _ = cv2.connectedComponentsWithStats((mask == cls).astype(np.uint8))
        for k in range(1, n):
            x, y, w, h, area = stats[k]
            if area >= 16:
                out.append((slice(y, y + h), slice(x, x + w), cls))
    return out


def free_space(image: np.ndarray, mask: np.ndarray, margin: int) -> np.ndarray:
    """True where a pasted pixel may go: in the field of view, `margin` px from any polyp."""
    polyps = (mask > 0).astype(np.uint8)
    if margin > 0:
        polyps = cv2.dilate(polyps, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    return (polyps == 0) & (image.mean(axis=2) > _BORDER_LEVEL)


def paste_one(
    image: np.ndarray,
    mask: np.ndarray,
    donor_image: np.ndarray,
    donor_mask: np.ndarray,
    rng: np.random.Generator,
    classes: Sequence[int] = (1, 2),
    tries: int = 20,
    margin: int = 4,
) -> tuple[np.ndarray, np.ndarray, Placed | None]:
    """Paste one donor polyp into free space of `image`; (image, mask, where) or unchanged.

    The donor's pixels replace the target's exactly where the donor's region is, and the
    mask gets the donor's class there; a place is accepted only if every one of those
    pixels is free (`free_space`). None when no region or no free place was found.
    """
    regions = donor_regions(donor_mask, classes)
    if not regions:
        return image, mask, None
    ys, xs, cls = regions[int(rng.integers(len(regions)))]
    region = donor_mask[ys, xs] == cls
    h, w = region.shape
    height, width = mask.shape
    if h >= height or w >= width:
        return image, mask, None
    free = free_space(image, mask, margin)
    for _ in range(tries):
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        if free[y : y + h, x : x + w][region].all():
            image, mask = image.copy(), mask.copy()
            image[y : y + h, x : x + w][region] = donor_image[ys, xs][region]
            mask[y : y + h, x : x + w][region] = cls
            return image, mask, Placed(y, x, region, cls)
    return image, mask, None


class PolypPaste:
    """Called on a training sample: with probability `p`, paste a polyp of a donor image.

    Donors are the training items that contain one of `classes` (by default the rare
    non-neoplastic class). Random draws use numpy's global generator, which the seeded
    loader reseeds per sample, so a resumed run pastes the same polyps.
    """

    def __init__(self, items: Sequence[CachedItem], p: float = 0.5, classes: Sequence[int] = (2,)):
        wanted = {1: {"red", "both"}, 2: {"green", "both"}}
        self.donors = [it for it in items if any(it.classes in wanted[c] for c in classes)]
        self.p = p
        self.classes = tuple(classes)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.donors or np.random.random() >= self.p:
            return image, mask
        rng = np.random.default_rng(np.random.randint(2**31))
        donor = self.donors[int(rng.integers(len(self.donors)))]
        donor_image, donor_mask = load_item(donor)
        if donor_image.shape != image.shape:
            return image, mask
        image, mask, _ = paste_one(image, mask, donor_image, donor_mask, rng, self.classes)
        return image, mask
