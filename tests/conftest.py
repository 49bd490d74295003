"""Shared fixtures: tiny synthetic datasets in the competition layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data.synthetic import generate

TINY_SIZE = (128, 160)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 train + 6 test images at 128x160 (seed 0), flat layout, with test_gt/. Read-only."""
    return generate(tmp_path_factory.mktemp("tiny") / "data", 24, 6, seed=0, size=TINY_SIZE)


@pytest.fixture(scope="session")
def tiny_data_nested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same data as `tiny_data` in the Kaggle-nested layout (train/train/, ...)."""
    out = tmp_path_factory.mktemp("tiny_nested") / "data"
    return generate(out, 24, 6, seed=0, nested=True, size=TINY_SIZE)


@pytest.fixture(scope="session")
def full_size_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 train + 2 test frames at the real set's size (1280 wide, 959-1024 high). Read-only."""
    return generate(tmp_path_factory.mktemp("full") / "data", 6, 2, seed=3)


@pytest.fixture(scope="session")
def two_model_experiment(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A finished two-model experiment on `tiny_data` (tests/trainkit.finished_experiment),
    trained once for test_export.py and test_adversarial_export.py. Read-only: a test that
    changes it works on a copy (test_export.private_copy)."""
    from tests.trainkit import finished_experiment

    return finished_experiment(tmp_path_factory.mktemp("experiment"), tiny_data)


@pytest.fixture
def tiny_data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of `tiny_data` that a test may damage."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))
