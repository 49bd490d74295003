"""bench/heldout.py's own logic: the data folder it links and the row it reads from a run's
scores.json (the pipeline run it makes is the pipeline's, tested in test_pipeline.py)."""

from __future__ import annotations

import json

import pytest

from bench.heldout import data_folder, summary_row, work_tag
from chain.evaluation import GAIN, SIMPLE, SUBMITTED, TEST_TABLE, parse_interval
from data.reader import DataError


def _flat(root, names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / f"{name}.txt").write_text(name)
    return root


def test_data_folder_links_training_images_beside_the_new_test_images(tmp_path):
    train = _flat(tmp_path / "run_data", ["train", "train_gt", "test", "test_gt"])
    heldout = _flat(tmp_path / "heldout", ["train", "train_gt", "test", "test_gt"])
    out = data_folder(train, heldout, tmp_path / "linked")
    assert (out / "train").resolve() == (train / "train").resolve()
    assert (out / "train_gt").resolve() == (train / "train_gt").resolve()
    assert (out / "test").resolve() == (heldout / "test").resolve()
    assert (out / "test_gt" / "test_gt.txt").read_text() == "test_gt"
    # a second call (the script rerun) replaces the links, it does not fail or nest them
    other = _flat(tmp_path / "other", ["test", "test_gt"])
    data_folder(train, other, out)
    assert (out / "test").resolve() == (other / "test").resolve()


def test_data_folder_names_a_missing_folder(tmp_path):
    train = _flat(tmp_path / "nested", ["train"])  # no train_gt: not the flat demo layout
    heldout = _flat(tmp_path / "heldout", ["test", "test_gt"])
    with pytest.raises(DataError, match="train_gt"):
        data_folder(train, heldout, tmp_path / "linked")


def test_work_tag_keeps_runs_under_same_named_folders_apart(tmp_path):
    a, b = tmp_path / "a" / "x" / "demo", tmp_path / "b" / "x" / "demo"
    assert work_tag(a) != work_tag(b)
    assert work_tag(a) == work_tag(tmp_path / "a" / "x" / ".." / "x" / "demo")
    assert work_tag(a).startswith("x_demo_")


def _row(model, variant, score, gain, role=""):
    return {"model": model, "variant": variant, "competition": score, GAIN: gain, "role": role}


def _cells(tmp_path, label, rows):
    """summary_row's cells for an experiment whose scores.json holds `rows`."""
    exp = tmp_path / "exp"
    exp.mkdir(exist_ok=True)
    (exp / "scores.json").write_text(json.dumps({"tables": {TEST_TABLE: rows}, "notes": []}))
    return [c.strip() for c in summary_row(label, exp).strip("|").split("|")]


def test_summary_row_sets_the_submission_against_the_best_chain_that_differs(tmp_path):
    rows = [
        _row("predict nothing", "baseline", 0.47, None),
        _row("fpn", "region vote", 0.9016, "-0.0015 [-0.0151, +0.0129]", SIMPLE),
        _row("blend, equal weights", "region vote", 0.9031, "+0.0000 [+0.0000, +0.0000]", SIMPLE),
        _row("blend, equal weights", "argmax", 0.8954, "-0.0077 [-0.0162, +0.0000]", SIMPLE),
        _row("refined", "region vote", 0.9182, "+0.0151 [-0.0017, +0.0339]"),
        _row("submission (blend maps)", "blend, region vote", 0.9031, None, SUBMITTED),
    ]
    cells = _cells(tmp_path, "seed 0", rows)
    # the equal blend with the vote is the submission itself, so FPN is the one to beat,
    # and its interval is turned around to read as the submission's gain over it
    assert cells == [
        "seed 0",
        "blend, region vote: 0.9031",
        "fpn, region vote: 0.9016",
        "+0.0015 [-0.0129, +0.0151]",
        "0.9182 (+0.0151 [-0.0017, +0.0339])",
    ]


def test_summary_row_without_another_simple_chain_and_an_old_scores_file(tmp_path):
    rows = [
        _row("predict nothing", "baseline", 0.47, None),
        _row("one", "argmax", 0.90, "+0.0000 [+0.0000, +0.0000]", SIMPLE),
        _row("one", "region vote", 0.90, "+0.0000 [+0.0000, +0.0000]", SIMPLE),
        _row("submission (blend maps)", "one, argmax", 0.90, None, SUBMITTED),
    ]
    assert _cells(tmp_path, "single", rows) == ["single", "one, argmax: 0.9000", "-", "-", "-"]
    for row in rows:
        row.pop(GAIN)  # written before the test table had intervals
    with pytest.raises(SystemExit, match=r"rerun report\.py"):
        _cells(tmp_path, "old", rows)


def test_parse_interval_reads_a_cell_and_names_a_bad_one():
    assert parse_interval("-0.0000 [-0.0129, +0.0151]") == (0.0, -0.0129, 0.0151)
    with pytest.raises(ValueError, match="not an interval cell: None"):
        parse_interval(None)
