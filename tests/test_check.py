"""`python -m data.check`: a clean dataset passes; every kind of bad input fails, named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.check import check_dataset, main
from data.reader import list_test, list_train

ROOT = Path(__file__).resolve().parent.parent


def test_clean_data_passes_and_is_summarised(tiny_data: Path, capsys) -> None:
    assert main(["--data-dir", str(tiny_data), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "train 24" in out and "test 6" in out and "128x160: 30" in out
    assert "no problems found" in out
    report = check_dataset(tiny_data)
    assert sum(report.balance.values()) == 24 and report.balance["none"] == 0


def _unreadable(root: Path) -> Path:
    path = list_train(root)[3].image
    path.write_bytes(b"\x00garbage" * 10)
    return path


def _truncated(root: Path) -> Path:
    path = list_test(root)[1].image
    path.write_bytes(path.read_bytes()[:-300])
    return path


def _mask_without_image(root: Path) -> Path:
    sample = list_train(root)[5]
    sample.image.unlink()
    return sample.mask


def _image_without_mask(root: Path) -> Path:
    sample = list_train(root)[6]
    sample.mask.unlink()
    return sample.image


def _size_mismatch(root: Path) -> Path:
    path = list_train(root)[7].mask
    mask = cv2.imread(str(path))
    cv2.imwrite(str(path), cv2.resize(mask, (100, 90), interpolation=cv2.INTER_NEAREST))
    return path


def _no_colour(root: Path) -> Path:
    path = list_train(root)[8].mask
    mask = cv2.imread(str(path))
    mask[mask.max(axis=2) > 60] = (255, 128, 0)  # BGR: blue-ish, neither red nor green
    cv2.imwrite(str(path), mask)
    return path


def _empty_folder(root: Path) -> Path:
    folder = root / "test"
    for path in folder.iterdir():
        path.unlink()
    return folder


def _missing_folder(root: Path) -> Path:
    shutil.rmtree(root / "train_gt")
    return root / "train_gt"


@pytest.mark.parametrize(
    "damage, kind",
    [
        (_unreadable, "unreadable image"),
        (_truncated, "truncated JPEG"),
        (_mask_without_image, "mask without image"),
        (_image_without_mask, "image without mask"),
        (_size_mismatch, "size mismatch"),
        (_no_colour, "no recognisable colour"),
        (_empty_folder, "empty folder"),
        (_missing_folder, "missing folder"),
    ],
)
def test_each_problem_fails_and_names_the_file(
    tiny_data_copy: Path, capsys, damage: Callable[[Path], Path], kind: str
) -> None:
    bad = damage(tiny_data_copy)
    assert main(["--data-dir", str(tiny_data_copy), "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    problem_lines = [line for line in out.splitlines() if kind in line]
    assert problem_lines, out
    assert any(str(bad) in line for line in problem_lines), out


def test_several_problems_are_all_reported(tiny_data_copy: Path) -> None:
    bad = [_unreadable(tiny_data_copy), _size_mismatch(tiny_data_copy), _no_colour(tiny_data_copy)]
    report = check_dataset(tiny_data_copy, workers=2)
    text = "\n".join(report.problems)
    assert not report.ok and all(str(p) in text for p in bad)


def test_runs_as_a_module_and_fails_on_a_missing_dir(tiny_data_copy: Path, tmp_path: Path) -> None:
    _no_colour(tiny_data_copy)
    cmd = [sys.executable, "-m", "data.check", "--data-dir"]
    done = subprocess.run([*cmd, str(tiny_data_copy)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "no recognisable colour" in done.stdout
    done = subprocess.run([*cmd, str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "nope" in done.stdout


def test_ambiguous_pixels_are_totalled(tiny_data_copy: Path) -> None:
    path = list_train(tiny_data_copy)[0].mask
    mask = cv2.imread(str(path))
    mask[:20, :20] = (255, 255, 255)  # a white corner: bright but not a class
    cv2.imwrite(str(path), mask)
    report = check_dataset(tiny_data_copy, workers=1)
    assert report.ambiguous >= 300 and report.ambiguous_max[1] == str(path)
    assert np.isclose(report.ambiguous_max[0], report.ambiguous, rtol=0.2)


def test_thresholds_come_from_the_experiment_config(tiny_data: Path, tmp_path: Path, capsys):
    strict = tmp_path / "strict.yaml"
    strict.write_text("data:\n  mask: {ambiguous_v_min: 10, green_s_min: 250}\n")
    # A low brightness floor for "ambiguous" and a near-impossible green saturation turn
    # more mask pixels ambiguous: still no problem, but a larger total in the report.
    assert main(["--data-dir", str(tiny_data), "--config", str(strict)]) == 0
    strict_total = _ambiguous_total(capsys.readouterr().out)
    assert main(["--data-dir", str(tiny_data)]) == 0
    assert strict_total > _ambiguous_total(capsys.readouterr().out)
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  mask: {green_s_mn: 3}\n")
    assert main(["--data-dir", str(tiny_data), "--config", str(typo)]) == 2
    assert "green_s_mn" in capsys.readouterr().out


def _ambiguous_total(report: str) -> int:
    """The "ambiguous mask pixels: N" total of a printed report."""
    line = next(x for x in report.splitlines() if x.startswith("ambiguous mask pixels:"))
    return int(line.split(":")[1].split(",")[0])
