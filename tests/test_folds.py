"""Folds: seeded, stratified, stored once with a content hash, reused, guarded."""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data.folds import load_or_make_folds, merge_rare_strata
from data.reader import DataError


def _labels(n: int = 200, seed: int = 0) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    strata = rng.choice(["red", "green", "both"], size=n, p=[0.693, 0.257, 0.05])
    return {f"{rng.integers(2**63):016x}{i:04d}": str(s) for i, s in enumerate(strata)}


def test_same_seed_same_file_and_split_id(tmp_path: Path) -> None:
    labels = _labels()
    a = load_or_make_folds(tmp_path / "a" / "folds.json", labels, 5, seed=3)
    b = load_or_make_folds(tmp_path / "b" / "folds.json", dict(reversed(labels.items())), 5, seed=3)
    assert a == b
    assert (tmp_path / "a" / "folds.json").read_bytes() == (
        tmp_path / "b" / "folds.json"
    ).read_bytes()
    c = load_or_make_folds(tmp_path / "c" / "folds.json", labels, 5, seed=4)
    assert c.split_id != a.split_id and c.fold_of != a.fold_of


def test_folds_partition_and_are_stratified(tmp_path: Path) -> None:
    labels = _labels(300)
    folds = load_or_make_folds(tmp_path / "folds.json", labels, 5, seed=0)
    overall = Counter(labels.values())
    seen: set[str] = set()
    for k in range(5):
        train, val = set(folds.train_ids(k)), set(folds.val_ids(k))
        assert not train & val and train | val == set(labels)
        assert abs(len(val) - 60) <= 1
        seen |= val
        counts = Counter(labels[i] for i in val)
        for s, n in overall.items():
            assert abs(counts[s] / len(val) - n / len(labels)) < 0.03
    assert seen == set(labels)
    with pytest.raises(ValueError, match=r"fold 5 out of range 0\.\.4"):
        folds.val_ids(5)


@pytest.mark.parametrize("n_folds", [2, 3])
def test_any_number_of_folds_from_two(tmp_path: Path, n_folds: int) -> None:
    labels = _labels(30)
    folds = load_or_make_folds(tmp_path / "folds.json", labels, n_folds, seed=0)
    sizes = sorted(len(folds.val_ids(k)) for k in range(n_folds))
    assert sum(sizes) == 30 and sizes[-1] - sizes[0] <= 1 and len(sizes) == n_folds
    # as many folds as images is the smallest data set that can be split
    smallest = dict(list(labels.items())[:n_folds])
    assert (
        len(load_or_make_folds(tmp_path / "min.json", smallest, n_folds, seed=0).fold_of) == n_folds
    )
    with pytest.raises(DataError, match="need at least 2 folds, got 1"):
        load_or_make_folds(tmp_path / "one.json", labels, 1, seed=0)


def test_stored_file_is_reused_untouched(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, labels = tmp_path / "folds.json", _labels()
    first = load_or_make_folds(path, labels, 5, seed=0)
    before = path.stat().st_mtime_ns, path.read_bytes()
    with caplog.at_level(logging.WARNING):
        assert load_or_make_folds(path, labels, 5, seed=0) == first
        assert caplog.records == []
        again = load_or_make_folds(path, labels, 5, seed=123)  # the stored split wins
    assert again == first
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    [warning] = caplog.records
    assert (
        str(path) in warning.getMessage() and "seed 0 (seed 123 requested)" in warning.getMessage()
    )


@pytest.mark.parametrize("change", ["add", "remove", "relabel"])
def test_refuses_when_data_changed(tmp_path: Path, change: str) -> None:
    path, labels = tmp_path / "folds.json", _labels()
    load_or_make_folds(path, labels, 5, seed=0)
    changed = dict(labels)
    first = next(iter(changed))
    if change == "add":
        changed["f" * 32] = "red"
    elif change == "remove":
        del changed[first]
    else:
        changed[first] = "green" if labels[first] != "green" else "red"
    with pytest.raises(DataError, match="delete") as info:
        load_or_make_folds(path, changed, 5, seed=0)
    message = str(info.value)
    assert str(path) in message and "run under a new experiment name" in message
    counts = {"add": "1 new ids", "remove": "1 missing ids", "relabel": "1 changed strata"}
    assert counts[change] in message
    assert ("f" * 32 if change == "add" else first) in message  # the example named
    with pytest.raises(DataError, match="3 requested"):
        load_or_make_folds(path, labels, 3, seed=0)


def test_edited_file_is_refused(tmp_path: Path) -> None:
    path, labels = tmp_path / "folds.json", _labels()
    load_or_make_folds(path, labels, 5, seed=0)
    text = path.read_text().replace('": 0', '": 1', 1)
    path.write_text(text)
    with pytest.raises(DataError, match="split_id"):
        load_or_make_folds(path, labels, 5, seed=0)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a readable folds file"):
        load_or_make_folds(path, labels, 5, seed=0)


def test_rare_strata_are_merged_not_fatal(tmp_path: Path) -> None:
    labels = {f"r{i:03d}": "red" for i in range(30)}
    labels |= {f"g{i:03d}": "green" for i in range(12)}
    labels |= {"b0": "both", "b1": "both", "n0": "none"}
    assert merge_rare_strata(labels, 5) == {
        "red": "red",
        "green": "green",
        "both": "red",
        "none": "red",
    }
    with warnings.catch_warnings():
        # StratifiedKFold only warns when a stratum is smaller than the number of folds:
        # splitting on the unmerged strata must fail here, not pass with a warning.
        warnings.simplefilter("error")
        folds = load_or_make_folds(tmp_path / "folds.json", labels, 5, seed=0)
    assert set(folds.fold_of) == set(labels)
    stored = json.loads((tmp_path / "folds.json").read_text())
    assert stored["merged_strata"] == {"both": "red", "none": "red"}
    # the merged stratum (red + both + none) is spread evenly: 33 images over 5 folds
    merged = Counter(folds.fold_of[i] for i, s in labels.items() if s != "green")
    assert sorted(merged.values()) == [6, 6, 7, 7, 7]
    with pytest.raises(DataError, match="cannot make 5 folds"):
        load_or_make_folds(tmp_path / "small.json", {"a": "red", "b": "red"}, 5, seed=0)


def test_a_stratum_grown_by_an_earlier_merge_is_not_merged_again():
    labels = {"a": "both", "b": "red", "c": "red", "d": "green", "e": "green"}
    target = merge_rare_strata(labels, 3)
    assert target["both"] == target["green"] == "red" and target["red"] == "red"


def test_rare_strata_merge_into_the_right_stratum() -> None:
    """ "both" goes to the larger of "red"/"green" even when another stratum is larger; a
    stratum of exactly n_folds images stays; the fallback is the stratum with most images."""
    labels = {f"n{i:03d}": "none" for i in range(30)}
    labels |= {f"r{i:03d}": "red" for i in range(5)}
    labels |= {f"g{i:03d}": "green" for i in range(5)}
    labels |= {"b0": "both"}
    assert merge_rare_strata(labels, 5) == {
        "none": "none",
        "red": "red",
        "green": "green",
        "both": "red",
    }
    # "none" relates to no class: the largest stratum takes it, "green" although "red" sorts later
    labels = {f"g{i:03d}": "green" for i in range(30)}
    labels |= {f"r{i:03d}": "red" for i in range(12)}
    labels |= {"n0": "none"}
    assert merge_rare_strata(labels, 5)["none"] == "green"
