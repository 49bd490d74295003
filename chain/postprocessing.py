"""Probability maps → class maps at original size: the post-processing operations.

`postprocess(probs, orig_size, params)` turns one (3, h, w) probability map at working
resolution into a uint8 class map at the image's original size. Steps, each switchable in
`PostprocessParams` (tuned on OOF predictions by tune.py):

1. resize the *probabilities* bilinearly to the original size (never the class map:
   nearest-neighbour upsampling of labels gives blocky, shifted borders);
2. foreground: plain argmax, or `fg_threshold` (polyp where 1 − p_bg > t) with the class
   then chosen between the two polyp classes;
3. morphological opening / closing of the polyp foreground, kernel sizes a fraction of
   the image's shorter side so that they mean the same at every resolution; with
   `adaptive`, each region's kernels are scaled by its own size, and the minimum area of
   step 5 is relative to the image's largest region (`adaptive_morphology`);
4. hole filling (pixels that closing or filling add take the local polyp argmax, or their
   region's class when `region_mode` is on, the combination tune.py usually picks);
5. connected components (`find_regions`, shared with the refinement stage): regions
   smaller than `min_area_frac` of the image are dropped, and each remaining region gets
   one class (`region_mode`), by summed probability or by majority vote, because a lesion
   in the ground truth is almost always one class.

Every step runs at the original size, after the resize: measured in
bench/postprocess_speed.py it is still fast enough (see BENCHMARKS.md) and keeps region
borders exact. uint8 store codes are accepted as they are (value/255): all steps compare
probabilities, so working on the codes avoids a float copy of every map.

This is a library shared by tune.py, postprocess.py and pipeline.py; no stage script
imports another. What `postprocess.json` records (the parameters, the store the chain
starts from) is read by `records.PostprocessRecord`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np
from joblib import effective_n_jobs

from data.probstore import ProbMaps

REGION_MODES = ("none", "prob", "majority")


@dataclass
class PostprocessParams:
    """Which post-processing steps run, and with what strength. Defaults = plain argmax."""

    fg_threshold: float | None = None  # None: argmax over 3 classes; else polyp if 1-p_bg > t
    min_area_frac: float = 0.0  # drop polyp regions smaller than this fraction of the image
    region_mode: str = "none"  # one class per connected region: "prob", "majority" or "none"
    open_frac: float = 0.0  # opening kernel, fraction of the shorter image side (0 = off)
    close_frac: float = 0.0  # closing kernel, same scale (0 = off)
    fill_holes: bool = False
    # Kernels and minimum area follow each region's size (see `adaptive_morphology`).
    adaptive: bool = False

    # Step name -> the field values that switch it off (used by tune.py's ablation).
    STEPS: ClassVar[dict[str, dict[str, Any]]] = {
        "fg_threshold": {"fg_threshold": None},
        "min_area": {"min_area_frac": 0.0},
        "region": {"region_mode": "none"},
        "open": {"open_frac": 0.0},
        "close": {"close_frac": 0.0},
        "fill_holes": {"fill_holes": False},
        "adaptive": {"adaptive": False},
    }

    def __post_init__(self) -> None:
        if self.region_mode not in REGION_MODES:
            raise ValueError(f"region_mode must be one of {REGION_MODES}, got {self.region_mode!r}")
        if self.fg_threshold is not None and not 0.0 < self.fg_threshold < 1.0:
            raise ValueError(f"fg_threshold must be in (0, 1) or None, got {self.fg_threshold}")
        for name in ("min_area_frac", "open_frac", "close_frac"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PostprocessParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown post-processing parameters: {', '.join(unknown)}")
        return cls(**d)

    def active_steps(self) -> list[str]:
        off = PostprocessParams()
        return [
            s
            for s, fields in self.STEPS.items()
            if any(getattr(self, k) != getattr(off, k) for k in fields)
        ]

    def without(self, step: str) -> PostprocessParams:
        return dataclasses.replace(self, **self.STEPS[step])


def _kernel(frac: float, h: int, w: int) -> np.ndarray | None:
    """Elliptic kernel of odd size ≈ frac × shorter side; None when that is under 2 px."""
    size = round(frac * min(h, w))
    if size < 2:
        return None
    size += 1 - size % 2
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _fill_holes(fg: np.ndarray) -> np.ndarray:
    """Background not reachable from the border becomes foreground (one flood fill)."""
    padded = cv2.copyMakeBorder(fg, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(padded, None, (0, 0), 1)  # every background pixel reachable from outside
    return fg | (padded[1:-1, 1:-1] == 0)


def postprocess(
    probs: np.ndarray, orig_size: tuple[int, int], params: PostprocessParams | None = None
) -> np.ndarray:
    """Class map uint8 (h, w) at `orig_size` from probabilities (3, H, W).

    `probs` may be float in [0, 1] or uint8 store codes (value/255). After the resize and
    the foreground test, the region steps run only on the bounding box of the foreground
    plus a margin wider than any kernel: polyps cover a small part of most images, and
    the result is the same as on the whole image (checked in tests/test_postprocess.py).
    """
    params = params or PostprocessParams()
    h, w = int(orig_size[0]), int(orig_size[1])
    if probs.ndim != 3 or probs.shape[0] != 3:
        raise ValueError(f"probs must be (3, H, W), got {probs.shape}")
    if probs.dtype != np.uint8:
        probs = probs.astype(np.float32, copy=False)
    # Per-channel planes (not HWC): a CHW->HWC copy of uint8 maps costs more than the resize.
    p0, p1, p2 = (np.ascontiguousarray(c) for c in probs)
    if p0.shape != (h, w):
        p0, p1, p2 = (cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in (p0, p1, p2))
    if params.fg_threshold is None:
        fg = np.maximum(p1, p2) > p0  # same tie rule as np.argmax: background wins ties
    else:
        full = 255.0 if probs.dtype == np.uint8 else 1.0
        fg = p0 < (1.0 - params.fg_threshold) * full
    fg = fg.view(np.uint8)
    out = np.zeros((h, w), np.uint8)
    x, y, bw, bh = cv2.boundingRect(fg)
    if bw == 0:
        return out
    margin = 2 + sum(
        k.shape[0]
        for k in (_kernel(params.open_frac, h, w), _kernel(params.close_frac, h, w))
        if k is not None
    )
    y0, y1 = max(0, y - margin), min(h, y + bh + margin)
    x0, x1 = max(0, x - margin), min(w, x + bw + margin)
    window = np.s_[y0:y1, x0:x1]
    out[window] = apply_steps(fg[window], p1[window], p2[window], params, (h, w))
    return out


def find_regions(fg: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Connected polyp regions of a 0/1 uint8 mask: (count incl. background, labels, stats).

    8-connectivity, so a polyp touching itself only at a corner stays one region; label 0
    is the background. Every stage that reasons about regions calls this one function.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    return n, labels, stats


def apply_steps(
    fg: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
    params: PostprocessParams,
    image_size: tuple[int, int],
) -> np.ndarray:
    """Class map of a window: foreground (uint8 0/1) and the two polyp probabilities.

    Kernel sizes and the minimum area are relative to the whole image (`image_size`).
    """
    h, w = image_size
    if params.adaptive:
        fg = adaptive_morphology(fg, params.open_frac, params.close_frac, min(h, w))
    else:
        kernel = _kernel(params.open_frac, h, w)
        if kernel is not None:
            fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel)
        kernel = _kernel(params.close_frac, h, w)
        if kernel is not None:
            fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, kernel)
    if params.fill_holes:
        fg = _fill_holes(fg)
    is_cls2 = p2 > p1  # argmax of the two polyp classes (class 1 wins ties)
    if params.region_mode == "none" and params.min_area_frac <= 0:
        return (is_cls2.view(np.uint8) + 1) * fg
    n, labels, stats = find_regions(fg)
    areas = stats[:, cv2.CC_STAT_AREA]
    # adaptive: a fraction of the image's largest region (a speck beside a large lesion
    # goes, a lone small polyp stays); else a fraction of the image
    reference = (areas[1:].max() if n > 1 else 0) if params.adaptive else h * w
    keep = areas >= params.min_area_frac * reference
    keep[0] = False  # label 0 is the background
    if params.region_mode == "none":
        return (is_cls2.view(np.uint8) + 1) * _lookup(keep.view(np.uint8), labels)
    on = fg.view(bool)  # sums over foreground pixels only: most of a window is background
    if params.region_mode == "prob":
        # summed p2 - p1 per region: > 0 means class 2 carries more probability mass
        diff = p2[on].astype(np.float32) - p1[on]
        margin = np.bincount(labels[on], weights=diff, minlength=n)
    else:
        votes2 = np.bincount(labels[on & is_cls2], minlength=n)
        margin = 2 * votes2 - stats[:, cv2.CC_STAT_AREA]
    region_cls = np.where(margin > 0, np.uint8(2), np.uint8(1)) * keep
    return _lookup(region_cls.astype(np.uint8), labels)


def adaptive_morphology(
    fg: np.ndarray, open_frac: float, close_frac: float, short: int
) -> np.ndarray:
    """Opening then closing of each region alone, its kernels scaled by its own size.

    A region's kernel is the image-scale one (fraction × shorter side) times
    √(its area / the largest region's area): the main lesion gets the full kernel, a small
    polyp beside it a proportionally smaller one, which smooths it instead of erasing it
    as a kernel sized for the image would. Regions are treated one by one, in a window
    around each wider than its kernels, so closing never merges two of them.
    """
    n, labels, stats = find_regions(fg)
    if n <= 1 or (open_frac <= 0 and close_frac <= 0):
        return fg
    h, w = fg.shape
    largest = stats[1:, cv2.CC_STAT_AREA].max()
    out = np.zeros_like(fg)
    for r in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[r, :5])
        scale = math.sqrt(area / largest)
        kernels = [_kernel(f * scale, short, short) for f in (open_frac, close_frac)]
        pad = 1 + sum(k.shape[0] for k in kernels if k is not None)
        window = np.s_[
            max(0, y - pad) : min(h, y + bh + pad), max(0, x - pad) : min(w, x + bw + pad)
        ]
        region = (labels[window] == r).view(np.uint8)
        for op, kernel in zip((cv2.MORPH_OPEN, cv2.MORPH_CLOSE), kernels, strict=True):
            if kernel is not None:
                region = cv2.morphologyEx(region, op, kernel)
        out[window] |= region
    return out


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """table[labels] for a uint8 table; cv2.LUT when labels fit in uint8 (~2x faster)."""
    if len(table) > 256:
        return table[labels]
    lut = np.zeros(256, np.uint8)
    lut[: len(table)] = table
    return cv2.LUT(labels.astype(np.uint8), lut)


# Pixels post-processed or held at once by class_maps. A map costs 5 to 14 bytes per
# pixel while it is made (40 for a map of pure noise): one 8000 x 6000 frame took 0.25 to
# 0.65 GB, and threads working on several at once took the stage past 3 GB. 64 M is one
# such frame, or 50 of the real 1280 x 959 ones, more than any window of workers here.
PIXEL_BUDGET = 64_000_000


def class_maps(
    store: ProbMaps, params: PostprocessParams, n_jobs: int = -1
) -> Iterator[tuple[str, np.ndarray]]:
    """(id, class map at original size) for every image of a store, in store order.

    Threads suffice: OpenCV and the numpy reductions release the GIL. A plain executor,
    not joblib's thread pool: its workers are joined when the generator closes (a failed
    write), whereas daemon workers still inside OpenCV at interpreter exit aborted the
    process (exit 134) after the error was printed. A window of twice the workers keeps
    memory to a few maps whatever the store's length, and PIXEL_BUDGET to one at a time
    when the images are huge.
    """
    workers = effective_n_jobs(n_jobs)
    pending: deque[tuple[str, int, Future[np.ndarray]]] = deque()
    in_flight = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="postprocess")
    try:
        for i, image_id in enumerate(store.ids):
            h, w = store.orig_sizes[i]
            while pending and (len(pending) >= 2 * workers or in_flight + h * w > PIXEL_BUDGET):
                done_id, pixels, done = pending.popleft()
                in_flight -= pixels
                yield done_id, done.result()
            job = pool.submit(postprocess, store.raw[i], (h, w), params)
            pending.append((image_id, h * w, job))
            in_flight += h * w
        for done_id, _, done in pending:
            yield done_id, done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
