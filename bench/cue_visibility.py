"""Is the class cue of a dataset still visible at a working size? Evidence, not a guess.

For every ground-truth polyp region, at each working size (INTER_AREA, as the cache
resizes), it measures two cues a CNN could use: fine texture (the spread of the Laplacian
inside the region, relative to its brightness) and tint (mean red/green ratio). The AUC of
each cue between neoplastic and non-neoplastic regions says how well it alone separates
the classes: 0.5 is chance, 1.0 (or 0.0) is perfect. A texture AUC that collapses towards
0.5 at the working size means the model cannot see the cue, whatever the recipe.

    python -m bench.cue_visibility --data-dir demo_data_seed0 --sizes 1024x1280 256x320 128x160
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from bench.report import update_section
from data.reader import list_train, load_image, load_mask
from data.synthetic import parse_size


def region_cues(image: np.ndarray, class_map: np.ndarray) -> list[tuple[int, float, float]]:
    """(class, texture, tint) of each connected polyp region, eroded off its edge."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = np.abs(cv2.Laplacian(grey, cv2.CV_32F, ksize=1))
    rows = []
    for cls in (1, 2):
        n, labels = cv2.connectedComponents((class_map == cls).astype(np.uint8))
        for k in range(1, n):
            inside = cv2.erode((labels == k).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            if inside.sum() < 9:
                continue
            rgb = image[inside].astype(np.float32)
            texture = float(lap[inside].mean() / (grey[inside].mean() + 1))
            tint = float(rgb[:, 0].mean() / (rgb[:, 1].mean() + 1))
            rows.append((cls, texture, tint))
    return rows


def local_texture(image: np.ndarray, class_map: np.ndarray, rng: np.random.Generator):
    """(class, texture) of up to 200 polyp pixels: |Laplacian| over their 5×5 window.

    What a pixel's small neighbourhood shows, which is what a per-pixel decision starts
    from; the region means above pool a whole polyp and so flatter a blurred cue.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = cv2.blur(np.abs(cv2.Laplacian(grey, cv2.CV_32F, ksize=1)), (5, 5))
    local = lap / (cv2.blur(grey, (5, 5)) + 1)
    ys, xs = np.nonzero(class_map)
    pick = rng.choice(len(ys), size=min(200, len(ys)), replace=False)
    return class_map[ys[pick], xs[pick]], local[ys[pick], xs[pick]]


def cue_auc(data_dir: Path, size: tuple[int, int], limit: int) -> dict[str, float]:
    rows, pixel_cls, pixel_tex = [], [], []
    rng = np.random.default_rng(0)
    for s in list_train(data_dir)[:limit]:
        image, class_map = load_image(s.image), load_mask(s.mask)
        h, w = size
        small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        small_map = cv2.resize(class_map, (w, h), interpolation=cv2.INTER_NEAREST)
        rows += region_cues(small, small_map)
        c, t = local_texture(small, small_map, rng)
        pixel_cls.append(c)
        pixel_tex.append(t)
    cls = np.array([r[0] for r in rows]) == 1
    return {
        "regions": len(rows),
        "texture_auc": float(roc_auc_score(cls, [r[1] for r in rows])),
        "tint_auc": float(roc_auc_score(cls, [r[2] for r in rows])),
        "local_auc": float(
            roc_auc_score(np.concatenate(pixel_cls) == 1, np.concatenate(pixel_tex))
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[(1024, 1280), (256, 320)])
    p.add_argument("--limit", type=int, default=120, help="training images to measure")
    p.add_argument("--write", action="store_true", help="also write its BENCHMARKS.md section")
    args = p.parse_args(argv)
    lines = [
        f"Data: `{args.data_dir}` ({args.limit} training images at most).",
        "",
        "| working size | regions | region texture AUC | region tint AUC | 5×5 texture AUC |",
        "|---|---:|---:|---:|---:|",
    ]
    for size in args.sizes:
        r = cue_auc(args.data_dir, size, args.limit)
        lines.append(
            f"| {size[0]}×{size[1]} | {r['regions']} | {r['texture_auc']:.2f} | "
            f"{r['tint_auc']:.2f} | {r['local_auc']:.2f} |"
        )
    print("\n".join(lines))
    if args.write:
        update_section("cue_visibility", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
