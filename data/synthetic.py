"""Synthetic NeoPolyp-like data: the competition layout, with images that look like
colonoscopy frames, so the whole pipeline can be run and tested without the real data.

Each image has a dark octagonal frame, light falloff, pinkish mucosa with folds (bright
ridges that resemble polyp edges) and vessels, specular highlights, and 1–3 polyps of very
different sizes. The class cue is built so that a CNN can learn it but a colour threshold
cannot: neoplastic (red) polyps carry a fine branching/dotted pit-pattern texture,
non-neoplastic (green) ones are smooth, and their tints are drawn from overlapping
distributions. Masks are pure red/green drawings saved as JPEG, so they carry the same
compression noise as the real ones. The test ground truth goes to a separate `test_gt/`
that the pipeline never reads (only demo scoring does).

Everything derives from one seed through `numpy.random.SeedSequence`, so the output is
byte-identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from core.config import reports_environment_errors
from data.atomic import atomic_dir, atomic_write
from data.reader import DataError, list_train, load_image, load_mask

log = logging.getLogger(__name__)

# Share of train images per stratum in the real NeoPolyp train set (693/257/50 of 1000).
STRATUM_P = {"red": 0.693, "green": 0.257, "both": 0.05}
DEFAULT_WIDTH = 1280
# Full-size frames are 1280 wide; the real data has a handful of heights between 959 and 1024.
DEFAULT_HEIGHTS = (959, 966, 995, 1024)
IMAGE_QUALITY = 90
MASK_QUALITY = 75
CLASS_RGB = {1: (255, 0, 0), 2: (0, 255, 0)}
# Mean tint shift of a polyp against the mucosa per class; the spread is larger than the
# gap, so colour alone classifies a polyp only a little better than chance.
TINT_MEAN = {1: 0.03, 2: -0.03}
TINT_SD = 0.06


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # uint8 HxWx3 RGB
    class_map: np.ndarray  # uint8 HxW in {0, 1, 2}


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    """A uniform draw as a Python float, so float32 arrays are not promoted to float64."""
    return float(rng.uniform(low, high))


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float, octaves: int = 1):
    """Smooth noise with unit spread: random grids upsampled with cubic interpolation."""
    h, w = shape
    out = np.zeros(shape, np.float32)
    amp = 1.0
    for _ in range(octaves):
        grid = rng.standard_normal(
            (max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)), dtype=np.float32
        )
        out += np.float32(amp) * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        amp, cell = amp * 0.5, max(cell / 2, 1.0)
    return out / np.float32(out.std() + 1e-6)


def _frame(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Soft octagonal field of view, 1 inside and 0 in the black border."""
    h, w = shape
    v = (np.arange(h, dtype=np.float32)[:, None] - h / 2) / (h / 2)
    u = (np.arange(w, dtype=np.float32)[None, :] - w / 2) / (w / 2)
    a, b, c = _u(rng, 0.9, 1.0), _u(rng, 0.93, 1.02), _u(rng, 1.45, 1.7)
    dist = np.minimum(np.minimum(a - np.abs(u), b - np.abs(v)), (c - np.abs(u) - np.abs(v)) / 1.5)
    return np.clip(dist * (min(h, w) / 3), 0, 1)


def _mucosa(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Lit pinkish tissue (HxWx3 float, 0..1) without and with folds and vessels.

    Tissue has no detail finer than a couple of pixels, so large frames are rendered at
    half resolution and upsampled, which makes full-size generation about four times faster.
    """
    full_h, full_w = shape
    factor = 2 if min(shape) >= 400 else 1
    h, w = shape = (math.ceil(full_h / factor), math.ceil(full_w / factor))
    scale = max(h, w)
    base = np.array([_u(rng, 0.72, 0.9), _u(rng, 0.36, 0.5), _u(rng, 0.3, 0.42)], np.float32)
    hue = _noise(rng, shape, scale / 4, 2)
    colour = base * (1 + 0.06 * hue[..., None] * np.array([0.4, -1.0, -0.6], np.float32))
    ly, lx = _u(rng, 0.35, 0.65) * h, _u(rng, 0.35, 0.65) * w
    yy = (np.arange(h, dtype=np.float32)[:, None] - ly) / (scale / 2)
    xx = (np.arange(w, dtype=np.float32)[None, :] - lx) / (scale / 2)
    light = 1 / (1 + _u(rng, 0.8, 2.0) * (yy * yy + xx * xx))
    light *= 1 + 0.12 * _noise(rng, shape, scale / 3)
    smooth = colour * light[..., None]

    fold_field = _noise(rng, shape, scale / _u(rng, 3, 6), 2)
    ridge = np.exp(-(((fold_field - _u(rng, -0.6, 0.6)) / 0.18) ** 2))
    ridge += np.exp(-(((fold_field - _u(rng, -0.8, 0.8)) / 0.12) ** 2))
    slope = cv2.Sobel(ridge, cv2.CV_32F, 0, 1, ksize=3) * (scale / 60)
    shading = 1 + 0.18 * ridge - np.clip(slope, -1, 1) * 0.12

    vessels = np.exp(-((_noise(rng, shape, scale / 22, 2) / 0.07) ** 2))
    vessels *= np.clip(_noise(rng, shape, scale / 5) + 0.3, 0, 1)
    tissue = smooth * shading[..., None]
    tissue *= 1 - vessels[..., None] * np.array([0.12, 0.3, 0.25], np.float32)
    tissue *= 1 + 0.015 * rng.standard_normal((h, w, 1), dtype=np.float32)
    if factor == 1:
        return smooth, tissue
    return tuple(
        cv2.resize(a, (full_w, full_h), interpolation=cv2.INTER_LINEAR) for a in (smooth, tissue)
    )


def _polyp_shape(rng, cls: int, radius: float, centre, shape):
    """Bounding box, normalised radius field t (t < 1 inside) and harmonics of one polyp."""
    h, w = shape
    cy, cx = centre
    extent = radius * 1.35
    y0, y1 = max(0, int(cy - extent)), min(h, int(cy + extent) + 1)
    x0, x1 = max(0, int(cx - extent)), min(w, int(cx + extent) + 1)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    angle, aspect = _u(rng, 0, np.pi), _u(rng, 0.6, 1.0)
    ca, sa = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    pu, pv = (dx * ca + dy * sa) / radius, (-dx * sa + dy * ca) / (radius * aspect)
    rho = np.sqrt(pu * pu + pv * pv)
    # cos(k·θ + φ) = Re(e^{iθ})^k · e^{iφ}: powers of the unit direction, no trigonometry.
    direction = (pu + 1j * pv).astype(np.complex64) / np.maximum(rho, 1e-6)
    wobble = 0.12 if cls == 1 else 0.08
    edge, power = np.ones_like(rho), direction
    for k in range(2, 6):
        power = power * direction
        phase = np.complex64(np.exp(1j * _u(rng, 0, 2 * np.pi)))
        edge += np.float32(_u(rng, 0, wobble / (k - 1))) * (power * phase).real
    return (slice(y0, y1), slice(x0, x1)), rho / edge


def _texture(rng, cls: int, box_shape: tuple[int, int], period: float) -> np.ndarray:
    """Multiplicative surface texture: pit pattern for neoplastic, faint mottle otherwise."""
    if cls == 1:
        lines = np.exp(-((_noise(rng, box_shape, period) / 0.28) ** 2))
        dots = np.clip((_noise(rng, box_shape, period * 0.7) - 1.3) * 3, 0, 1)
        pits = np.maximum(lines, dots)
        return 1 - _u(rng, 0.18, 0.3) * pits
    return 1 - 0.04 * _noise(rng, box_shape, period * 4)


def _place_polyps(rng, classes, frame, smooth, image, class_map) -> None:
    """Draw polyps in place on `image` and `class_map`, without overlaps."""
    h, w = class_map.shape
    short = min(h, w)
    period = float(np.clip(max(h, w) / 100, 4, 14))
    for cls in classes:
        radius = math.exp(_u(rng, math.log(max(5, 0.04 * short)), math.log(0.3 * short)))
        for _ in range(30):
            u, v = _u(rng, -0.6, 0.6), _u(rng, -0.6, 0.6)
            centre = ((1 + v) * h / 2, (1 + u) * w / 2)
            box, t = _polyp_shape(rng, cls, radius, centre, (h, w))
            inside = t < 1
            if not (class_map[box][inside]).any() and frame[box][inside].mean() > 0.6:
                break
            radius = max(5, radius * 0.85)
        else:
            continue
        dome = np.sqrt(np.clip(1 - t * t, 0, 1))
        gy, gx = np.gradient(dome)
        lit = 1 + 0.25 * dome - np.clip((gy * 0.7 + gx * 0.3) * radius * 0.15, -0.35, 0.35)
        shadow = np.exp(-(((t - 1.08) / 0.1) ** 2)) * 0.25
        tint = float(rng.normal(TINT_MEAN[cls], TINT_SD))
        gain = _u(rng, 0.95, 1.15) * np.array(
            [1 + 0.6 * tint, 1 - 0.9 * tint, 1 - 0.6 * tint], np.float32
        )
        colour = smooth[box] * gain * (lit * _texture(rng, cls, t.shape, period))[..., None]
        alpha = np.clip((1 - t) * radius / 1.5, 0, 1)[..., None]
        region = image[box] * (1 - shadow[..., None])
        image[box] = region * (1 - alpha) + colour * alpha
        class_map[box][inside] = cls


def _highlights(rng, image: np.ndarray, class_map: np.ndarray) -> None:
    """Specular reflections: small white blobs, more of them on polyps."""
    h, w = class_map.shape
    spots = np.zeros((h, w), np.float32)
    size = max(h, w) / 400
    ys, xs = (c * 4 for c in np.nonzero(class_map[::4, ::4]))
    n_random, n_polyp = rng.integers(4, 20), rng.integers(2, 8) if len(ys) else 0
    points = [(rng.integers(0, h), rng.integers(0, w)) for _ in range(n_random)]
    points += [(ys[i], xs[i]) for i in rng.integers(0, max(len(ys), 1), size=n_polyp)]
    for y, x in points:
        axes = (max(1, int(_u(rng, 0.5, 4) * size)), max(1, int(_u(rng, 0.5, 2) * size)))
        cv2.ellipse(spots, (int(x), int(y)), axes, _u(rng, 0, 180), 0, 360, 1.0, -1)
    spots = cv2.GaussianBlur(spots, (0, 0), max(0.8, size * 0.6))
    image += (1 - image) * np.clip(spots * 1.5, 0, 1)[..., None]


def render(rng: np.random.Generator, shape: tuple[int, int], classes: list[int]) -> Rendered:
    """One frame with the given polyp classes (1 red, 2 green), and its class map."""
    frame = _frame(shape, rng)
    smooth, image = _mucosa(shape, rng)
    class_map = np.zeros(shape, np.uint8)
    _place_polyps(rng, classes, frame, smooth, image, class_map)
    _highlights(rng, image, class_map)
    image *= frame[..., None]
    class_map[frame < 0.5] = 0
    return Rendered(np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), class_map)


def _classes_for(rng: np.random.Generator, stratum: str) -> list[int]:
    if stratum == "both":
        rest = list(rng.choice([1, 2], size=rng.integers(0, 2)))
        return [1, 2, *rest]
    return [1 if stratum == "red" else 2] * int(rng.integers(1, 4))


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(
        ".jpeg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def mask_rgb(class_map: np.ndarray) -> np.ndarray:
    """The competition's mask drawing: pure red / green on black."""
    palette = np.array([(0, 0, 0), CLASS_RGB[1], CLASS_RGB[2]], np.uint8)
    return palette[class_map]


def _make_one(seed_seq, stratum: str, size, image_path: Path, mask_path: Path) -> None:
    rng = np.random.default_rng(seed_seq)
    shape = size or (int(rng.choice(DEFAULT_HEIGHTS)), DEFAULT_WIDTH)
    classes = _classes_for(rng, stratum)
    while True:
        sample = render(rng, shape, classes)
        present = np.flatnonzero(np.bincount(sample.class_map.ravel(), minlength=3)[1:]) + 1
        if set(present.tolist()) == set(classes):
            break
    image_path.write_bytes(encode_jpeg(sample.image, IMAGE_QUALITY))
    mask_path.write_bytes(encode_jpeg(mask_rgb(sample.class_map), MASK_QUALITY))


def _dirs(root: Path, nested: bool) -> dict[str, Path]:
    names = ("train", "train_gt", "test", "test_gt")
    dirs = {n: root / n / n if nested else root / n for n in names}
    for d in dirs.values():
        d.mkdir(parents=True)
    return dirs


def generate(
    out: str | Path,
    n_train: int,
    n_test: int,
    seed: int,
    nested: bool = False,
    size: tuple[int, int] | None = None,
    workers: int = 1,
) -> Path:
    """Write a synthetic dataset at `out` (which must not exist yet or be empty)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: already exists and is not empty; choose another --out")
    if n_train < 1 or n_test < 0:
        raise DataError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    if size is not None and min(size) < 48:
        raise DataError(f"--size {size[0]}x{size[1]} is too small (at least 48 pixels a side)")
    id_seq, image_seq = np.random.SeedSequence(seed).spawn(2)
    id_rng = np.random.default_rng(id_seq)
    n = n_train + n_test
    ids = [id_rng.bytes(16).hex() for _ in range(n)]
    strata = id_rng.choice(list(STRATUM_P), size=n, p=list(STRATUM_P.values()))
    with atomic_dir(out) as tmp:
        dirs = _dirs(tmp, nested)
        jobs = []
        for i, (seq, sid, stratum) in enumerate(zip(image_seq.spawn(n), ids, strata, strict=True)):
            img_dir, gt_dir = ("train", "train_gt") if i < n_train else ("test", "test_gt")
            name = f"{sid}.jpeg"
            jobs.append(
                delayed(_make_one)(seq, stratum, size, dirs[img_dir] / name, dirs[gt_dir] / name)
            )
        results = Parallel(n_jobs=workers, prefer="threads", return_as="generator")(jobs)
        for _ in tqdm(results, total=n, desc="synthetic", unit="img", disable=None):
            pass
    log.info("wrote %d train + %d test images to %s", n_train, n_test, out)
    return out


def overlay(image: np.ndarray, class_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with each class tinted in its mask colour and outlined."""
    out = image.astype(np.float32)
    for cls, colour in CLASS_RGB.items():
        sel = class_map == cls
        out[sel] = out[sel] * (1 - alpha) + np.array(colour, np.float32) * alpha
    out = out.astype(np.uint8)
    for cls, colour in CLASS_RGB.items():
        contours, _ = cv2.findContours(
            (class_map == cls).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(out, contours, -1, colour, max(1, image.shape[1] // 300))
    return out


def preview(data_dir: str | Path, png: str | Path, n: int = 4, cell_width: int = 240) -> None:
    """A grid of `n` training samples (image | overlay per row), as a small PNG."""
    samples = list_train(data_dir)[:n]
    cell_height = round(cell_width * 0.78)
    rows = []
    for s in samples:
        image, class_map = load_image(s.image), load_mask(s.mask)
        cells = [image, overlay(image, class_map)]
        rows.append(
            np.hstack(
                [
                    cv2.resize(c, (cell_width, cell_height), interpolation=cv2.INTER_AREA)
                    for c in cells
                ]
            )
        )
    ok, buf = cv2.imencode(
        ".png", cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]
    )
    if not ok:
        raise RuntimeError("PNG encoding failed")
    with atomic_write(png) as fh:
        fh.write(buf.tobytes())


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 256x320, got {text!r}") from exc
    return h, w


@reports_environment_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="new folder to write the dataset to"
    )
    parser.add_argument(
        "--n-train", type=int, default=1000, help="number of train images with masks"
    )
    parser.add_argument(
        "--n-test", type=int, default=200, help="number of test images (ground truth in test_gt/)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed; the same seed gives byte-identical files"
    )
    parser.add_argument(
        "--nested", action="store_true", help="Kaggle layout train/train/, train_gt/train_gt/, ..."
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="fixed size HxW, e.g. 256x320 (default: width 1280, heights 959-1024 as real data)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="threads to render with, default all cores (output does not depend on it)",
    )
    parser.add_argument(
        "--preview", type=Path, default=None, help="also write a PNG grid of 4 samples to this path"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        generate(args.out, args.n_train, args.n_test, args.seed, args.nested, args.size, args.jobs)
        if args.preview is not None:
            preview(args.out, args.preview)
    except DataError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
