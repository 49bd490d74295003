"""Probability maps → class maps at original size, and the submission file.

The library part, `postprocess(probs, orig_size, params)`, turns one (3, h, w) probability
map at working resolution into a uint8 class map at the image's original size. Steps, each
switchable in `PostprocessParams` (tuned on OOF predictions by tune.py):

1. resize the *probabilities* bilinearly to the original size (never the class map:
   nearest-neighbour upsampling of labels gives blocky, shifted borders);
2. foreground: plain argmax, or `fg_threshold` (polyp where 1 − p_bg > t) with the class
   then chosen between the two polyp classes;
3. morphological opening / closing of the polyp foreground, kernel sizes a fraction of
   the image's shorter side so that they mean the same at every resolution;
4. hole filling (pixels that closing or filling add take the local polyp argmax, or their
   region's class when `region_mode` is on, the combination tune.py usually picks);
5. connected components: regions smaller than `min_area_frac` of the image are dropped,
   and each remaining region gets one class (`region_mode`), by summed probability or
   by majority vote, because a lesion in the ground truth is almost always one class.

Every step runs at the original size, after the resize: measured in
bench/postprocess_speed.py it is still fast enough (see BENCHMARKS.md) and keeps region
borders exact. uint8 store codes are accepted as they are (value/255): all steps compare
probabilities, so working on the codes avoids a float copy of every map.

The CLI applies `postprocess.json` to the blended test probabilities and writes the
checked `submission.csv`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from config import (
    ConfigError,
    add_config_arguments,
    experiment_dir,
    reports_environment_errors,
    resolve_cli_config,
    setup_logging,
)
from data.probstore import ProbMaps, load_probs
from data.reader import DataError, list_test
from data.submission import check_submission, image_size, write_submission

log = logging.getLogger("postprocess")

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

    # Step name -> the field values that switch it off (used by tune.py's ablation).
    STEPS: ClassVar[dict[str, dict[str, Any]]] = {
        "fg_threshold": {"fg_threshold": None},
        "min_area": {"min_area_frac": 0.0},
        "region": {"region_mode": "none"},
        "open": {"open_frac": 0.0},
        "close": {"close_frac": 0.0},
        "fill_holes": {"fill_holes": False},
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
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= params.min_area_frac * h * w
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


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """table[labels] for a uint8 table; cv2.LUT when labels fit in uint8 (~2x faster)."""
    if len(table) > 256:
        return table[labels]
    lut = np.zeros(256, np.uint8)
    lut[: len(table)] = table
    return cv2.LUT(labels.astype(np.uint8), lut)


def load_params(path: Path) -> PostprocessParams:
    """Parameters from a tune.py `postprocess.json`; plain argmax (with a warning) if absent."""
    if not path.is_file():
        log.warning("%s not found: using plain argmax (run tune.py to tune post-processing)", path)
        return PostprocessParams()
    try:
        doc = json.loads(path.read_text())
        return PostprocessParams.from_dict(doc.get("params", doc))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not valid post-processing parameters ({exc})") from exc


def class_maps(
    store: ProbMaps, params: PostprocessParams, n_jobs: int = -1
) -> Iterator[tuple[str, np.ndarray]]:
    """(id, class map at original size) for every image of a store, in store order.

    Threads suffice: OpenCV and the numpy reductions release the GIL.
    """
    run = Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator")
    maps = run(
        delayed(postprocess)(store.raw[i], store.orig_sizes[i], params) for i in range(len(store))
    )
    return zip(store.ids, maps, strict=True)


def check_store_matches_test(store: ProbMaps, data_dir: Path) -> None:
    """The store must hold exactly the test images, each at its true size, before writing."""
    samples = {s.id: s for s in list_test(data_dir)}
    missing = sorted(samples.keys() - set(store.ids))
    extra = sorted(set(store.ids) - samples.keys())
    if missing or extra:
        raise DataError(
            f"{store.where}: ids differ from the test images in {data_dir} "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} extra, e.g. {extra[:1]})"
        )
    for image_id, size in zip(store.ids, store.orig_sizes, strict=True):
        true = image_size(samples[image_id].image)
        if tuple(size) != true:
            raise DataError(f"{store.where}: {image_id} recorded at {size}, image is {true}")


def make_submission(
    store: ProbMaps, params: PostprocessParams, data_dir: Path, out: Path, n_jobs: int = -1
) -> list[str]:
    """Write `out` only if it passes `check_submission`; returns the problems otherwise."""
    check_store_matches_test(store, data_dir)
    tmp = out.with_name(f".{out.name}.unchecked")
    items = tqdm(
        class_maps(store, params, n_jobs), total=len(store), desc="post-process", disable=None
    )
    write_submission(tmp, items)
    problems = check_submission(tmp, data_dir)
    if problems:
        tmp.unlink()
        return problems
    os.replace(tmp, out)
    return []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Post-process the blended test probabilities and write submission.csv."
    )
    add_config_arguments(p, default_config=None)
    p.add_argument(
        "--probs", type=Path, help="test probability store (default <out>/<exp>/ensemble/test)"
    )
    p.add_argument(
        "--params",
        type=Path,
        help="tuned parameters (default <out>/<exp>/postprocess.json; missing = plain argmax)",
    )
    p.add_argument("--jobs", type=int, default=-1, help="threads over images (-1 = all cores)")
    p.add_argument(
        "--message", default=None, help="submission message for the printed kaggle command"
    )
    return p


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = resolve_cli_config(args)
        exp = experiment_dir(cfg)
        if not cfg.get("data_dir"):
            raise ConfigError("no data dir: give --data-dir or set data_dir in the config")
        data_dir = Path(cfg["data_dir"])
        store = load_probs(args.probs or exp / "ensemble" / "test")
        params = load_params(args.params or exp / "postprocess.json")
        out = exp / "submission.csv"
        problems = make_submission(store, params, data_dir, out, args.jobs)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"error: the submission failed its check; {out} not written", file=sys.stderr)
        return 1
    steps = ", ".join(params.active_steps()) or "plain argmax"
    message = args.message or f"{cfg['experiment']}: {store.meta.get('model', '?')}, {steps}"
    print(f"wrote {out} ({len(store)} images; post-processing: {steps})")
    print(f'kaggle competitions submit -c bkai-igh-neopolyp -f {out} -m "{message}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
