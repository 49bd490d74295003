"""Polyp regions of a probability map: finding, ground-truth matching, crops, paste-back.

The refinement stage (refine.py) looks at one predicted region at a time. This module is
the geometry it needs, kept apart from the network and the stage so that it can be tested
on hand-made masks:

- `predicted_regions`: the connected regions of the argmax foreground, found by
  `postprocessing.find_regions` (the one function every stage uses for regions);
- `true_labels`: each region's true label by majority of the ground-truth polyp pixels it
  overlaps, or `FALSE_POSITIVE` when it overlaps none;
- `crop_box` / `region_crop`: a square window around a region with a margin, resized to a
  fixed side, holding RGB, the three class probabilities and the region's mask;
- `paste_region`: a refined region (class probabilities and polyp probability in the
  crop) written back into a working-resolution probability map.

Labels reuse the class ids: 1 neoplastic, 2 non-neoplastic, and 0 (background) for a
region that is no polyp at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from chain.postprocessing import find_regions
from data.dataset import MEAN, STD

FALSE_POSITIVE = 0
# Channels of a crop: normalised RGB, the three class probabilities, the region's mask.
CROP_CHANNELS = 7


@dataclass(frozen=True)
class Region:
    """One predicted region of one image: its label in the image and its square window."""

    label: int
    box: tuple[int, int, int, int]  # y0, y1, x0, x1 (end-exclusive)


def predicted_regions(
    probs: np.ndarray, margin: float = 0.25
) -> tuple[np.ndarray, list[Region], np.ndarray]:
    """Regions of the argmax foreground of (3, H, W) probabilities (floats or uint8 codes),
    each with its square window (`margin`: context per side, as in `crop_box`).

    Returns (labels (H, W) int32, regions, foreground). Ties go to background, as in
    `np.argmax` and `postprocessing.postprocess`.
    """
    fg = (np.maximum(probs[1], probs[2]) > probs[0]).astype(np.uint8)
    n, labels, stats = find_regions(fg)
    return labels, [_region(r, stats[r], fg.shape, margin) for r in range(1, n)], fg


def _region(label: int, stat: np.ndarray, shape: tuple[int, int], margin: float) -> Region:
    x, y, w, h = (int(v) for v in stat[:4])
    return Region(label, crop_box((y, y + h, x, x + w), shape, margin))


def crop_box(
    bbox: tuple[int, int, int, int],
    shape: tuple[int, int],
    margin: float = 0.25,
    min_side: int = 16,
) -> tuple[int, int, int, int]:
    """Square window around a bounding box: side = longer box side × (1 + 2·margin).

    Square, so resizing to the fixed crop keeps the region's proportions; shifted to stay
    inside the image, and clipped only when the image is smaller than the square.
    """
    y0, y1, x0, x1 = bbox
    side = max(min_side, round(max(y1 - y0, x1 - x0) * (1 + 2 * margin)))
    out = []
    for lo, hi, limit in ((y0, y1, shape[0]), (x0, x1, shape[1])):
        start = (lo + hi) // 2 - side // 2
        start = max(0, min(start, limit - side))
        out += [start, min(limit, start + side)]
    return out[0], out[1], out[2], out[3]


def true_labels(labels: np.ndarray, n_regions: int, target: np.ndarray) -> np.ndarray:
    """True label of regions 1..n_regions (array of length n_regions + 1; index 0 unused).

    Majority class of the ground-truth polyp pixels under the region (neoplastic wins a
    tie, as in post-processing); FALSE_POSITIVE when it covers no ground-truth polyp.
    """
    counts = np.zeros((n_regions + 1, 3), np.int64)
    np.add.at(counts, (labels.ravel(), target.ravel().astype(np.int64)), 1)
    out = np.where(counts[:, 2] > counts[:, 1], 2, 1)
    out[counts[:, 1:].sum(axis=1) == 0] = FALSE_POSITIVE
    out[0] = FALSE_POSITIVE
    return out


def region_crop(
    image: np.ndarray, probs: np.ndarray, region_mask: np.ndarray, box: tuple, side: int
) -> np.ndarray:
    """float32 (CROP_CHANNELS, side, side): normalised RGB, probabilities (0..1), region mask.

    `image` uint8 (H, W, 3) RGB, `probs` (3, H, W) floats in [0, 1], `region_mask` (H, W).
    """
    y0, y1, x0, x1 = box
    rgb = _resize(image[y0:y1, x0:x1].astype(np.float32) / 255.0, side)
    rgb = ((rgb - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).transpose(2, 0, 1)
    p = _resize(probs[:, y0:y1, x0:x1].transpose(1, 2, 0).astype(np.float32), side)
    mask = _resize(region_mask[y0:y1, x0:x1].astype(np.float32), side)
    return np.concatenate([rgb, p.transpose(2, 0, 1), mask[None]]).astype(np.float32)


def crop_target(target: np.ndarray, labels: np.ndarray, region: Region, side: int) -> np.ndarray:
    """The refined mask's training target: ground-truth polyp pixels the region may claim.

    Pixels of other predicted regions are excluded, because `paste_region` never writes
    them; the result is resized like the crop (float, 0..1).
    """
    y0, y1, x0, x1 = region.box
    own = _claimable(labels[y0:y1, x0:x1], region.label)
    return _resize(((target[y0:y1, x0:x1] > 0) & own).astype(np.float32), side)


def _claimable(labels: np.ndarray, label: int) -> np.ndarray:
    return (labels == label) | (labels == 0)


def _resize(a: np.ndarray, side: int) -> np.ndarray:
    return cv2.resize(a, (side, side), interpolation=cv2.INTER_LINEAR)


def paste_region(
    out: np.ndarray,
    labels: np.ndarray,
    region: Region,
    class_probs: np.ndarray,
    polyp: np.ndarray | None,
) -> None:
    """Write one refined region into `out` (3, H, W) float probabilities, in place.

    `class_probs`: (3,) over (false positive, neoplastic, non-neoplastic); `polyp`:
    (side, side) refined polyp probability in the crop, or None to keep the current
    polyp probability (only the class is refined). The region gets one class, so
    p_polyp = polyp × (1 − p_fp) is split between the two classes in the region's
    proportion. Pixels of the region are always rewritten; background pixels in the
    window only where the refined polyp probability exceeds the current one (the most
    confident claim wins where windows overlap); other regions' pixels never.
    """
    y0, y1, x0, x1 = region.box
    window = out[:, y0:y1, x0:x1]
    lab = labels[y0:y1, x0:x1]
    if polyp is None:
        p = 1.0 - window[0]
    else:
        p = cv2.resize(polyp.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    p_polyp = p * (1.0 - float(class_probs[0]))
    share = float(class_probs[1]) / max(float(class_probs[1] + class_probs[2]), 1e-6)
    write = (lab == region.label) | ((lab == 0) & (p_polyp > 1.0 - window[0]))
    window[0][write] = 1.0 - p_polyp[write]
    window[1][write] = p_polyp[write] * share
    window[2][write] = p_polyp[write] * (1.0 - share)
