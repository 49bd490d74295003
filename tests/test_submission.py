import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from data.submission import (
    check_submission,
    parse_runs,
    rle_decode,
    rle_encode,
    write_submission,
)

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"a" * 32: (6, 8), "b" * 32: (5, 9), "c" * 32: (1, 7)}


def shapes():
    side = st.integers(1, 24)
    return st.one_of(
        st.tuples(side, side),
        st.tuples(st.just(1), st.integers(1, 60)),
        st.tuples(st.integers(1, 60), st.just(1)),
    )


@settings(max_examples=200, deadline=None)
@given(shapes().flatmap(lambda s: arrays(np.bool_, s)))
def test_rle_round_trip(mask):
    text = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(text, mask.shape), mask.astype(np.uint8))
    # C order, 1-indexed: the decoded runs cover exactly the set pixels' flat indices + 1
    starts, lengths = parse_runs(text, mask.size)
    covered = [i for s, n in zip(starts, lengths, strict=True) for i in range(s, s + n)]
    np.testing.assert_array_equal(np.array(covered, int), np.flatnonzero(mask.ravel()))


def test_rle_edge_cases():
    mask = np.zeros((3, 4), np.uint8)
    assert rle_encode(mask) == ""
    assert rle_decode("", (3, 4)).sum() == 0
    assert rle_encode(np.ones((3, 4), np.uint8)) == "1 12"
    mask[0, 0] = mask[2, 3] = 1
    assert rle_encode(mask) == "1 1 12 1"
    mask[:] = 0
    mask[0, 3] = mask[1, 0] = 1  # wraps a row: one run in C order
    assert rle_encode(mask) == "4 2"
    assert rle_encode(np.array([[0, 2, 2, 0, 5]])) == "2 2 5 1"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("1", "odd number"),
        ("1 x", "non-integer"),
        ("0 2", "before pixel 1"),
        ("1 0", "non-positive"),
        ("1 3 2 2", "overlap"),
        ("5 1 1 1", "overlap"),
        ("1 1 5 3 6 1", "overlap"),  # the third run overlaps the second, not the first
        ("10 4", "beyond"),
    ],
)
def test_rle_decode_rejects_malformed(text, reason):
    with pytest.raises(ValueError, match=reason):
        rle_decode(text, (3, 4))


def test_rle_decode_accepts_touching_runs_as_uint8():
    """Another encoder may split one run in two touching ones: that is still valid."""
    mask = rle_decode("1 2 3 2", (1, 5))
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0]])


@pytest.fixture
def test_dir(tmp_path):
    folder = tmp_path / "data" / "test"
    folder.mkdir(parents=True)
    for image_id, (h, w) in SIZES.items():
        cv2.imwrite(str(folder / f"{image_id}.jpeg"), np.full((h, w, 3), 90, np.uint8))
    return tmp_path / "data"


def class_maps():
    maps = {}
    for k, (image_id, (h, w)) in enumerate(SIZES.items()):
        m = np.zeros((h, w), np.uint8)
        m[0, : w // 2] = 1
        m[-1, -2:] = 2 if k != 2 else 1
        maps[image_id] = m
    return maps


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def write_rows(path, rows):
    with open(path, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def test_written_submission_is_valid_and_decodes_back(test_dir, tmp_path):
    maps = class_maps()
    path = tmp_path / "sub.csv"
    assert write_submission(path, maps.items()) == 3
    assert check_submission(path, test_dir) == []
    rows = read_rows(path)
    assert rows[0] == ["Id", "Expected"] and len(rows) == 7
    assert b"\r" not in path.read_bytes()  # plain "\n" line ends, as Kaggle's sample file
    by_id = dict(rows[1:])
    for image_id, m in maps.items():
        np.testing.assert_array_equal(rle_decode(by_id[f"{image_id}_0"], m.shape), m == 1)
        np.testing.assert_array_equal(rle_decode(by_id[f"{image_id}_1"], m.shape), m == 2)
    assert by_id["c" * 32 + "_1"] == ""


def corrupt(rows, kind):
    a0 = "a" * 32 + "_0"
    rows = [list(r) for r in rows]
    index = {r[0]: r for r in rows[1:]}
    if kind == "missing row":
        rows = [r for r in rows if r[0] != a0]
    elif kind == "extra row":
        rows.append(["d" * 32 + "_0", ""])
    elif kind == "duplicate row":
        rows.append(list(index[a0]))
    elif kind == "malformed run":
        index[a0][1] = "1 2 3"
    elif kind == "overlapping runs":
        index[a0][1] = "1 4 3 2"
    elif kind == "out of bounds":
        index[a0][1] = "47 5"  # a is 6x8 = 48 pixels
    elif kind == "classes overlap":
        index["a" * 32 + "_1"][1] = "2 1"
    elif kind == "header":
        rows[0] = ["id", "rle"]
    return rows


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing row", "missing row"),
        ("extra row", "extra row"),
        ("duplicate row", "duplicate"),
        ("malformed run", "odd number"),
        ("overlapping runs", "overlap or are not in increasing order"),
        ("out of bounds", "beyond the 48 pixels"),
        ("classes overlap", "_0 and _1 masks overlap on 1 pixels"),
        ("header", "header"),
    ],
)
def test_checker_names_each_kind_of_broken_file(test_dir, tmp_path, kind, reason):
    good = tmp_path / "good.csv"
    write_submission(good, class_maps().items())
    bad = tmp_path / "bad.csv"
    write_rows(bad, corrupt(read_rows(good), kind))
    problems = check_submission(bad, test_dir)
    assert len(problems) == 1, problems
    assert reason in problems[0]


def test_every_problem_is_reported_with_its_line(test_dir, tmp_path):
    good = tmp_path / "good.csv"
    write_submission(good, class_maps().items())
    rows = [r for r in read_rows(good) if not r[0].startswith("a" * 32)]  # image a: no rows
    rows[1:1] = [["x", "y", "z"], ["d" * 32 + "_0", ""]]  # lines 2 and 3
    rows += [list(rows[3]), ["e" * 32 + "_1", ""]]  # line 8 repeats line 4; line 9 extra
    bad = tmp_path / "bad.csv"
    write_rows(bad, rows)
    assert check_submission(bad, test_dir) == [
        "line 2: expected 2 fields, got 3",
        f"line 3: {'d' * 32 + '_0'!r} is not a test image row (extra row)",
        f"line 8: duplicate row {rows[3][0]}",
        f"line 9: {'e' * 32 + '_1'!r} is not a test image row (extra row)",
        f"missing row {'a' * 32}_0",
        f"missing row {'a' * 32}_1",
    ]


@pytest.mark.parametrize("rows, got", [([], "an empty file"), ([["id", "rle"]], "['id', 'rle']")])
def test_a_wrong_header_is_named(tmp_path, test_dir, rows, got):
    path = tmp_path / "sub.csv"
    write_rows(path, rows)
    assert check_submission(path, test_dir) == [f"{path}: header must be Id,Expected, got {got}"]


def test_cli_exit_codes(test_dir, tmp_path):
    good = tmp_path / "good.csv"
    write_submission(good, class_maps().items())
    bad = tmp_path / "bad.csv"
    write_rows(bad, corrupt(read_rows(good), "missing row"))

    def run(path):
        cmd = [sys.executable, "-m", "data.submission", "--check", str(path)]
        return subprocess.run(
            [*cmd, "--data-dir", str(test_dir)], cwd=ROOT, capture_output=True, text=True
        )

    ok = run(good)
    assert ok.returncode == 0 and "OK" in ok.stdout and "3 test images" in ok.stdout
    res = run(bad)
    assert res.returncode == 1 and "missing row" in res.stdout
    res = run(tmp_path / "absent.csv")
    assert res.returncode == 1 and "cannot read" in res.stdout


def test_a_full_size_map_with_many_runs_passes_the_check(tmp_path):
    """A 1280-wide frame whose mask alternates every other column over 200 rows: 1.2 MB
    of runs in one row, which csv's default field limit (128 KiB) refused as unreadable."""
    test = tmp_path / "data" / "test"
    test.mkdir(parents=True)
    image_id = "d" * 32
    cv2.imwrite(str(test / f"{image_id}.jpeg"), np.zeros((959, 1280, 3), np.uint8))
    class_map = np.zeros((959, 1280), np.uint8)
    class_map[100:300, ::2] = 1
    class_map[500:510, 1::2] = 2
    out = tmp_path / "submission.csv"
    write_submission(out, [(image_id, class_map)])
    assert len(out.read_text()) > 1_000_000
    assert check_submission(out, tmp_path / "data") == []
