"""Shared fixtures: tiny synthetic datasets in the competition layout; and how `pytest -n 2`
shares the suite between its two workers (the longest modules first, each module on one
worker, the finished experiment trained once for both)."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from data.synthetic import generate

TINY_SIZE = (128, 160)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow(seconds): a test's measured seconds on 2 busy cores; its module starts first",
    )


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules with the most `slow` seconds first, each module's tests kept together and
    in order. With the default order a two-minute test could start last on one worker
    while the other sat idle; longest first, the short modules fill the gaps at the end."""
    seconds: dict[str, float] = {}
    for item in items:
        mark = item.get_closest_marker("slow")
        seconds[_module(item)] = seconds.get(_module(item), 0.0) + (mark.args[0] if mark else 0)
    items.sort(key=lambda item: -seconds[_module(item)])


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`-n N` hands out whole modules in the collection order above (xdist's loadscope, not
    reordered by test count): a module's fixtures are built once, and a worker takes the
    next module when it runs out. Another `--dist` asked for explicitly is kept."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False
    return LoadScopeScheduling(config, log)


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)`'s result, built by the first xdist worker that asks and reused by the
    others (each worker has its own session fixtures, so a 20 s build ran on both). For
    read-only fixtures: every worker sees the same files."""
    run = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run = run.parent  # the run's folder, above each worker's own
    folder, done = run / name, run / f"{name}.built"
    with (run / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(str(build(folder).relative_to(folder)))
    return folder / done.read_text()


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
    trained once for the whole run (`built_once`) for test_export.py and the others that
    read it. Read-only: a test that changes it works on a copy (test_export.private_copy)."""
    from tests.trainkit import finished_experiment

    return built_once(
        tmp_path_factory, "shared_experiment", lambda root: finished_experiment(root, tiny_data)
    )


@pytest.fixture
def tiny_data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of `tiny_data` that a test may damage."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))
