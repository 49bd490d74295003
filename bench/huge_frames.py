"""Peak memory of `postprocess.py` on huge test frames, with and without the pixel budget.

A test set of 8000 x 6000 frames (a scanner's export, an upscaled image) made the
submission stage take several maps at once, one per thread plus the window waiting to be
written. Each run here is a fresh process over the same store (every post-processing step
on, predictions with a few polyp-like blobs per frame); the only difference is
`postprocessing.PIXEL_BUDGET`. Peak resident memory comes from the kernel (ru_maxrss of
the child), so it counts OpenCV's and numpy's buffers too.

    python -m bench.huge_frames --frames 8 --jobs -1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import yaml

from chain.postprocessing import PostprocessParams
from core.paths import Layout
from data.probstore import save_probs

SIZE = (6000, 8000)
STEPS = PostprocessParams(
    min_area_frac=0.001, region_mode="prob", open_frac=0.01, close_frac=0.01, fill_holes=True
)
RUN = """
import resource, sys, postprocessing, postprocess
postprocessing.PIXEL_BUDGET = {budget}
rc = postprocess.main({argv!r})
print("peak-kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def make_experiment(root: Path, frames: int) -> Path:
    """A test folder of `frames` huge JPEGs and a blended store of blob-like predictions."""
    test = root / "data" / "test"
    test.mkdir(parents=True)
    ids = [f"{k:032x}" for k in range(frames)]
    jpeg = cv2.imencode(".jpeg", np.zeros((*SIZE, 3), np.uint8))[1].tobytes()
    rng = np.random.default_rng(0)
    maps = np.full((frames, 3, 352, 352), 20, np.uint8)
    for k, image_id in enumerate(ids):
        (test / f"{image_id}.jpeg").write_bytes(jpeg)
        for _ in range(3):
            cls, (y, x), r = rng.integers(1, 3), rng.integers(60, 290, 2), rng.integers(15, 60)
            blob = np.zeros((352, 352), np.uint8)
            cv2.circle(blob, (int(x), int(y)), int(r), 1, -1)
            maps[k, :, blob == 1] = 20
            maps[k, cls][blob == 1] = 215
        maps[k, 0][maps[k, 1:].max(0) < 100] = 215
    layout = Layout(root / "exp", root)
    save_probs(
        layout.blend("test"),
        ids,
        maps / 255.0,
        [SIZE] * frames,
        kind="test",
        model="blend",
    )
    layout.postprocess.write_text(json.dumps({"params": STEPS.to_dict()}))
    config = root / "c.yaml"
    cfg = {"experiment": "exp", "data_dir": str(root / "data"), "out_dir": str(root)}
    config.write_text(yaml.safe_dump(cfg))
    return config


def peak_mb(config: Path, budget: int, jobs: int) -> float:
    """Peak resident memory of one postprocess.py run, as the process itself saw it."""
    argv = ["--config", str(config), "--jobs", str(jobs)]
    done = subprocess.run(
        [sys.executable, "-c", RUN.format(budget=budget, argv=argv)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout.split("peak-kb")[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=-1)
    args = parser.parse_args()
    from chain import postprocessing

    with tempfile.TemporaryDirectory() as tmp:
        config = make_experiment(Path(tmp), args.frames)
        bounded = peak_mb(config, postprocessing.PIXEL_BUDGET, args.jobs)
        unbounded = peak_mb(config, 10**12, args.jobs)
    print(f"{args.frames} frames of {SIZE[1]} x {SIZE[0]}, --jobs {args.jobs}")
    print(f"pixel budget {postprocessing.PIXEL_BUDGET:,}: peak {bounded:.0f} MB")
    print(f"no budget (window only): peak {unbounded:.0f} MB")


if __name__ == "__main__":
    main()
