"""Check a NeoPolyp data dir before training on it: `python -m data.check --data-dir DIR`.

Reads every image and mask once and prints what the pipeline will see: counts, image sizes,
class balance and how many mask pixels were ambiguous, then every problem found
(unreadable or truncated file, unpaired image or mask, mask size different from its image,
mask with no red or green pixel, empty or missing folder, an id shared by a training and a
test image, a subfolder of test images). In this data every training
image contains a polyp, so an all-background mask means a wrong colour or a broken file.
Exits 1 and names the files when there is a problem, 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from joblib import Parallel, delayed
from tqdm import tqdm

from core.config import ConfigError, load_config, reports_environment_errors
from core.settings import DataSettings
from data.reader import (
    DataError,
    MaskThresholds,
    Sample,
    decode_mask,
    find_dirs,
    image_subfolders,
    list_images,
    load_image,
    pair_folders,
    shared_ids,
    stratum,
)


@dataclass
class Inspection:
    """What reading one sample found."""

    sample: Sample
    size: tuple[int, int] | None = None
    stratum: str | None = None
    ambiguous: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    data_dir: Path
    counts: dict[str, int] = field(default_factory=dict)
    sizes: Counter = field(default_factory=Counter)
    balance: Counter = field(default_factory=Counter)
    ambiguous: int = 0
    ambiguous_max: tuple[int, str] = (0, "")
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect_sample(sample: Sample, thresholds: MaskThresholds) -> Inspection:
    found = Inspection(sample)
    try:
        found.size = load_image(sample.image).shape[:2]
    except DataError as exc:
        found.problems.append(f"unreadable image: {exc}")
    if sample.mask is None:
        return found
    try:
        rgb = load_image(sample.mask)
    except DataError as exc:
        found.problems.append(f"unreadable mask: {exc}")
        return found
    class_map, found.ambiguous = decode_mask(rgb, thresholds)
    found.stratum = stratum(class_map)
    if found.size is not None and class_map.shape != found.size:
        found.problems.append(
            f"size mismatch: {sample.mask} is {class_map.shape[0]}x{class_map.shape[1]}, "
            f"image {sample.image} is {found.size[0]}x{found.size[1]}"
        )
    if found.stratum == "none":
        found.problems.append(
            f"no recognisable colour: {sample.mask} has no red or green pixel "
            f"({found.ambiguous} bright pixels of another colour)"
        )
    return found


def _folder(report: Report, dirs: dict[str, Path | None], key: str) -> Path | None:
    """The folder `key` if it exists and has images; records a problem otherwise."""
    folder = dirs[key]
    if folder is None:
        report.problems.append(f"missing folder: {report.data_dir / key}/ (or {key}/{key}/)")
        return None
    count = len(list_images(folder))
    if not count:
        report.problems.append(f"empty folder: {folder}")
        return None
    report.counts[key] = count
    return folder


def _pair(report: Report, images_dir: Path, masks_dir: Path) -> list[Sample]:
    pairing = pair_folders(images_dir, masks_dir)
    report.problems += pairing.problems
    return pairing.samples


def _samples(report: Report, data_dir: str | Path) -> tuple[list[Sample], list[Sample]]:
    """Train pairs and test samples (with their ground truth when test_gt/ exists)."""
    dirs = find_dirs(data_dir)
    train_dir, train_gt_dir, test_dir = (
        _folder(report, dirs, k) for k in ("train", "train_gt", "test")
    )
    train = _pair(report, train_dir, train_gt_dir) if train_dir and train_gt_dir else []
    if test_dir is None:
        return train, []
    test = [Sample(i, p, None) for i, p in sorted(list_images(test_dir).items())]
    report.problems += image_subfolders(test_dir) + shared_ids(dirs)
    test_gt_dir = _folder(report, dirs, "test_gt") if dirs["test_gt"] is not None else None
    if test_gt_dir is not None:
        with_gt = {s.id: s for s in _pair(report, test_dir, test_gt_dir)}
        test = [with_gt.get(s.id, s) for s in test]
    return train, test


def check_dataset(
    data_dir: str | Path, thresholds: MaskThresholds | None = None, workers: int | None = None
) -> Report:
    """Read everything under `data_dir` and report; raises DataError only if it is missing."""
    thresholds = thresholds or MaskThresholds()
    report = Report(Path(data_dir))
    train, test = _samples(report, data_dir)
    jobs = [(s, True) for s in train] + [(s, False) for s in test]
    results = Parallel(
        n_jobs=workers or os.cpu_count() or 1, prefer="threads", return_as="generator"
    )(delayed(inspect_sample)(s, thresholds) for s, _ in jobs)
    progress = tqdm(results, total=len(jobs), desc="check", unit="img", disable=None)
    for (sample, is_train), found in zip(jobs, progress, strict=True):
        report.problems += found.problems
        if found.size is not None:
            report.sizes[found.size] += 1
        if is_train and found.stratum is not None:
            report.balance[found.stratum] += 1
        report.ambiguous += found.ambiguous
        if found.ambiguous > report.ambiguous_max[0]:
            report.ambiguous_max = (found.ambiguous, str(sample.mask))
    return report


def format_report(report: Report) -> str:
    lines = [f"data dir: {report.data_dir}"]
    lines.append("files: " + ", ".join(f"{k} {v}" for k, v in report.counts.items()))
    sizes = ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(report.sizes.items()))
    lines.append(f"image sizes (HxW: count): {sizes or '-'}")
    total = sum(report.balance.values())
    names = {"red": "red only", "green": "green only", "both": "both", "none": "none"}
    balance = ", ".join(
        f"{label} {report.balance[s]} ({100 * report.balance[s] / max(total, 1):.1f}%)"
        for s, label in names.items()
    )
    lines.append(f"train class balance: {balance}")
    worst = (
        f", most in {report.ambiguous_max[1]} ({report.ambiguous_max[0]})"
        if report.ambiguous
        else ""
    )
    lines.append(f"ambiguous mask pixels: {report.ambiguous}{worst}")
    if report.problems:
        lines.append(f"PROBLEMS ({len(report.problems)}):")
        lines += [f"  {p}" for p in report.problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


@reports_environment_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        required=True,
        type=Path,
        help="folder with train/, train_gt/, test/ (flat or Kaggle-nested)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="reader threads (default: all cores)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="experiment YAML whose data.mask thresholds to decode with (default: built-in)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        thresholds = None
        if args.config is not None:
            mask = DataSettings.from_config(load_config(args.config)).mask
            thresholds = MaskThresholds.from_mapping(mask)
        report = check_dataset(args.data_dir, thresholds, workers=args.jobs)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}")
        return 2
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
