"""A finished demo experiment scored on a new test set drawn by the generator with another seed.

Every choice of the demo's recipe was made looking at its own test sets, seeds 0 to 2; a
test set drawn with another seed was seen by none of them. With 40 test images (the demo's
size until issue 19 gave it the real set's 200) one small polyp given the wrong class moved
the rows-Dice by 0.02, and this is how the earlier 40-image runs were read. It scores the
experiment on the new images, retraining nothing and touching nothing of the experiment:
it copies the experiment's output folder, makes a data folder of the experiment's own
training images and the new test images, and reruns `pipeline.py` on the copy. Every fold
is reused; the models predict the new test images, and the decisions, made on the same OOF
maps as before, come out the same.

    python -m bench.heldout --runs outputs/seed0/demo outputs/seed1/demo outputs/seed2/demo \\
        --labels "seed 0" "seed 1" "seed 2" --work /tmp/heldout --n-test 200 --seed 1000

Per run, the section lists the submitted chain and the best simple chain that predicts
something else on the held-out images, their paired per-image difference with its interval
(evaluation.py), and the refined maps, which the out-of-sample rule may not have submitted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.report import update_section
from chain.evaluation import (
    GAIN,
    SIMPLE,
    SUBMITTED,
    TEST_TABLE,
    interval_cell,
    parse_interval,
    submission_gain,
)
from core.paths import Layout
from core.settings import ExperimentSettings
from data.reader import DataError
from data.synthetic import generate

ROOT = Path(__file__).resolve().parent.parent
LINKED = ("train", "train_gt")


def data_folder(train_from: Path, test_from: Path, out: Path) -> Path:
    """A data folder holding links to the experiment's training images and the held-out
    test images (flat layout, as `make demo` writes)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, source in [
        *((n, train_from / n) for n in LINKED),
        *((n, test_from / n) for n in ("test", "test_gt")),
    ]:
        if not source.is_dir():
            raise DataError(f"{source}: not found (bench.heldout needs the flat demo layout)")
        link = out / name
        if link.is_symlink():
            link.unlink()
        link.symlink_to(source.resolve(), target_is_directory=True)
    return out


def work_tag(run: Path) -> str:
    """The name of a run's copy and data folder under --work: readable (its parent's and its
    own name) and distinct for two runs under same-named folders (a/x/demo, b/x/demo), which
    would otherwise share a copy and score one run twice."""
    digest = hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:8]
    return f"{run.parent.name}_{run.name}_{digest}"


def score_copy(run: Path, heldout: Path, work: Path, parallel: int) -> Path:
    """Copy the run's output folder, point it at the held-out images, rerun the pipeline;
    the copy's experiment folder."""
    config = Layout.at(run).config
    cfg = yaml.safe_load(config.read_text())
    out_root = ExperimentSettings.from_config(cfg).out_dir
    tag = work_tag(run)
    copy = work / f"out_{tag}"
    if not copy.exists():
        shutil.copytree(out_root, copy, symlinks=True)
    data = data_folder(ExperimentSettings.from_config(cfg).data(), heldout, work / f"data_{tag}")
    log = work / f"{copy.name}.log"
    cmd = [
        sys.executable,
        "pipeline.py",
        "--config",
        str(config),
        "--data-dir",
        str(data),
        "--out-dir",
        str(copy),
        "--parallel",
        str(parallel),
    ]
    with log.open("w") as fh:
        done = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"pipeline.py failed on the copy of {run}; see {log}")
    return Layout.at(copy / ExperimentSettings.from_config(cfg).experiment).root


def summary_row(label: str, exp: Path) -> str:
    """The run's submission, its best simple alternative that predicts something else
    (a simple chain identical to the submission, image by image, is the submission), and
    the refined maps."""
    rows: list[dict[str, Any]] = json.loads(Layout.at(exp).scores.read_text())["tables"][TEST_TABLE]
    submitted = next(r for r in rows if r["role"] == SUBMITTED)
    if any(r.get(GAIN) is None for r in rows if r["role"] == SIMPLE):
        raise SystemExit(f"{exp}: scores.json predates the test table's intervals; rerun report.py")
    others = [r for r in rows if r["role"] == SIMPLE and parse_interval(r[GAIN]) != (0, 0, 0)]
    simple = max(others, key=lambda r: r["competition"], default=None)
    refined = next(
        (r for r in rows if r["model"] == "refined" and r["variant"] == "region vote"), None
    )
    cells = [
        label,
        f"{submitted['variant']}: {submitted['competition']:.4f}",
        "-"
        if simple is None
        else f"{simple['model']}, {simple['variant']}: {simple['competition']:.4f}",
        "-" if simple is None else interval_cell(*submission_gain(simple)),
        "-" if refined is None else f"{refined['competition']:.4f} ({refined[GAIN]})",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="experiment folders")
    p.add_argument("--work", type=Path, required=True, help="where the copies and data go")
    p.add_argument("--n-test", type=int, default=200, help="held-out images (the real set: 200)")
    p.add_argument("--seed", type=int, default=1000, help="generator seed of the held-out set")
    p.add_argument("--parallel", type=int, default=1, help="pipeline.py --parallel")
    p.add_argument("--labels", nargs="*", default=[], help="a name per run for the table")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f"--labels: give one per run ({len(args.runs)})")
    labels = args.labels or [str(r) for r in args.runs]
    heldout = args.work / f"heldout_seed{args.seed}_n{args.n_test}"
    if not heldout.is_dir():
        generate(heldout, 1, args.n_test, args.seed)
    lines = [
        f"Held-out set: {args.n_test} images of `data.synthetic --seed {args.seed}`, full size; "
        "each run's folds reused, its test predictions made on these images.",
        "",
        "| run | submitted chain | best other simple chain | submission − it [interval] "
        "| refined maps, region vote (vs submission) |",
        "|---|---|---|---|---|",
    ]
    for label, run in zip(labels, args.runs, strict=True):
        exp = score_copy(run.resolve(), heldout, args.work.resolve(), args.parallel)
        lines.append(summary_row(label, exp))
    update_section("heldout", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
