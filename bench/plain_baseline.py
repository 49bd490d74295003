"""The plain-script baseline that the pipeline must beat, and the side-by-side comparison.

The recipe is the ~40-line notebook cell of the issue, kept plain on purpose: one
`smp.Unet('tu-mobilenetv3_small_100')` from scratch at 256×320 on every training image,
Adam 1e-3 with no schedule, CE + Dice, batch 8, flips and 180° turns, 2 threads, trained
until a wall-clock budget is spent; then softmax resized bilinearly to full size, connected
components under 0.1% of the image dropped and each region given the class with the larger
summed probability. Only reading the files and the metric are the project's, so both
systems are scored by the same code.

    python -m bench.plain_baseline --data-dir demo_data_seed0 --budget-s 360
    python -m bench.plain_baseline --data-dir demo_data_seed0 --compare configs/demo.yaml

`--compare` runs `pipeline.py` first, then gives the plain script the same wall-clock time,
and writes both rows to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from bench.report import update_section
from core.metrics import class_stats, scores_from_stats
from core.paths import Layout
from data.reader import list_test, list_test_gt, list_train, load_image, load_mask

SIZE = (256, 320)
MEAN, STD = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
KEYS = ("competition", "dice_seg", "dice_neo", "dice_non")


def to_input(image: np.ndarray) -> torch.Tensor:
    small = cv2.resize(image, SIZE[::-1], interpolation=cv2.INTER_AREA)
    return torch.from_numpy(((small - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))


def train_plain(data_dir: Path, budget_s: float, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    samples = list_train(data_dir)
    x = torch.stack([to_input(load_image(s.image)) for s in samples])
    y = torch.stack(
        [
            torch.from_numpy(cv2.resize(load_mask(s.mask), SIZE[::-1], interpolation=0)).long()
            for s in samples
        ]
    )
    model = smp.Unet("tu-mobilenetv3_small_100", encoder_weights=None, classes=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dice = smp.losses.DiceLoss("multiclass")
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s:
        for idx in torch.randperm(len(x)).split(8):
            xb, yb = x[idx], y[idx]
            if torch.rand(1) < 0.5:
                xb, yb = xb.flip(-1), yb.flip(-1)
            if torch.rand(1) < 0.5:
                xb, yb = xb.flip(-2), yb.flip(-2)
            if torch.rand(1) < 0.5:
                xb, yb = xb.flip(-1, -2), yb.flip(-1, -2)
            out = model(xb)
            loss = F.cross_entropy(out, yb) + dice(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def postprocess_plain(prob: np.ndarray) -> np.ndarray:
    """(3, H, W) probabilities at full size -> class map with region-wise classes."""
    fg = (prob.argmax(0) > 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    out = np.zeros(fg.shape, np.uint8)
    for k in range(1, n):
        if stats[k, cv2.CC_STAT_AREA] < 0.001 * fg.size:
            continue
        region = labels == k
        out[region] = 1 if prob[1][region].sum() >= prob[2][region].sum() else 2
    return out


@torch.no_grad()
def score_plain(model: torch.nn.Module, data_dir: Path) -> dict[str, float]:
    truth = {s.id: s.mask for s in list_test_gt(data_dir) or []}
    preds, targets = [], []
    for s in list_test(data_dir):
        image = load_image(s.image)
        logits = model(to_input(image)[None])
        prob = F.interpolate(logits.softmax(1), size=image.shape[:2], mode="bilinear")[0]
        preds.append(postprocess_plain(prob.numpy()))
        targets.append(load_mask(truth[s.id]))
    scores = scores_from_stats(class_stats(preds, targets))
    return {k: scores[k] for k in KEYS}


def run_pipeline(config: str, data_dir: Path, out_dir: Path) -> tuple[float, dict[str, float]]:
    """Wall time of a fresh `pipeline.py --parallel 2` run (as `make demo`) and the test
    scores of its submission."""
    start = time.perf_counter()
    cmd = [
        sys.executable,
        "pipeline.py",
        "--config",
        config,
        "--data-dir",
        str(data_dir),
        "--parallel",
        "2",
    ]
    subprocess.run([*cmd, "--out-dir", str(out_dir)], check=True)
    elapsed = time.perf_counter() - start
    scores = next(Layout.at(p).scores for p in out_dir.iterdir() if Layout.at(p).scores.exists())
    tables = json.loads(scores.read_text())["tables"]
    rows = next(rows for title, rows in tables.items() if title.startswith("Test"))
    row = next(r for r in rows if r.get("role") == "submission")
    return elapsed, {k: row[k] for k in KEYS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="data with test_gt/")
    p.add_argument("--budget-s", type=float, default=360, help="training wall-clock seconds")
    p.add_argument("--compare", metavar="CONFIG", help="run pipeline.py first; same budget")
    p.add_argument("--out-dir", type=Path, default=Path("outputs/plain_compare"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    budget = args.budget_s
    if args.compare:
        budget, scores = run_pipeline(args.compare, args.data_dir, args.out_dir)
        rows.append((f"pipeline.py, `{args.compare}`", budget, scores))
    start = time.perf_counter()
    model = train_plain(args.data_dir, budget)
    rows.append(("plain script", time.perf_counter() - start, score_plain(model, args.data_dir)))
    lines = [
        f"Data: `{args.data_dir}`; test set scored at original size against `test_gt/`.",
        "",
        "| system | wall s | rows-Dice | Dice_seg | Dice_neo | Dice_non |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {t:.0f} | " + " | ".join(f"{s[k]:.3f}" for k in KEYS) + " |"
            for name, t, s in rows
        ),
    ]
    print("\n".join(lines))
    if args.compare:
        update_section("plain_baseline", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
