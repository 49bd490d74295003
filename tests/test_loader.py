"""Loader workers at the real image size: no inherited deadlock, and a stall is an error."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from data import loader as loader_module
from data.cache import CachedItem
from data.dataset import SegDataset
from data.loader import LoaderStalled, make_loader
from data.reader import DataError
from tests.trainkit import ROOT, write_config

# Generous: the run takes ~20 s; the limit only turns a deadlock into a failure.
HANG_LIMIT_S = 300


@pytest.mark.slow(63)
def test_full_size_train_and_predict_with_a_worker_finish(
    full_size_data: Path, tmp_path: Path
) -> None:
    """The cache resizes full-size frames with OpenCV threads, then workers start.

    Workers forked from that process deadlocked in their first OpenCV call; this ran
    forever before the loaders moved to a fork server.
    """
    config = write_config(tmp_path, full_size_data, epochs=1)
    for stage in (["train.py", "--fold", "all"], ["predict.py"]):
        done = subprocess.run(
            [sys.executable, *stage, "--config", str(config), "--model", "tiny", "--workers", "1"],
            cwd=ROOT,
            timeout=HANG_LIMIT_S,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "tiny" / "tiny" / "test" / "meta.json").is_file()


def test_a_stalled_worker_stops_the_loader_with_its_name(tmp_path: Path) -> None:
    """A worker blocked on a read (here a FIFO nobody writes) is reported, not waited on."""
    fifo = tmp_path / "never.npy"
    os.mkfifo(fifo)
    item = CachedItem("abc", (10, 10), "red", fifo, None)
    loader = make_loader(
        SegDataset([item], transform=None),
        batch_size=1,
        num_workers=1,
        device=torch.device("cpu"),
        sampler=None,
        name="demo fold 3 validation",
        timeout_s=2,
    )
    with pytest.raises(LoaderStalled, match=r"demo fold 3 validation.*nothing for 2 s"):
        next(iter(loader))


class _DiesOnFirstItem(torch.utils.data.Dataset):
    """A worker that the kernel kills mid-batch, as the out-of-memory killer does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(1)


def test_a_dead_worker_is_reported_as_dead_not_waited_on_until_the_timeout() -> None:
    """Workers are the fork server's children, so PyTorch's SIGCHLD check never fired and
    the stage waited the whole loader_timeout_s (600 s by default) to report a stall."""
    loader = make_loader(
        _DiesOnFirstItem(),
        batch_size=1,
        num_workers=1,
        device=torch.device("cpu"),
        sampler=None,
        name="demo fold 1 training",
        timeout_s=HANG_LIMIT_S,
    )
    with pytest.raises(LoaderStalled, match=r"demo fold 1 training: a data loader worker died"):
        next(iter(loader))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_cache_file_gone_mid_run_is_one_line_naming_the_item(
    tmp_path: Path, workers: int
) -> None:
    item = CachedItem("abc", (10, 10), "red", tmp_path / "gone.image.npy", None)
    loader = make_loader(
        SegDataset([item], transform=None),
        batch_size=1,
        num_workers=workers,
        device=torch.device("cpu"),
        sampler=None,
        name="demo",
        timeout_s=HANG_LIMIT_S,
    )
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert message.startswith("cache of abc unreadable during the run (") and "\n" not in message
    assert "gone.image.npy" in message and "run the command again" in message


def test_workers_are_capped_at_the_cores_available_without_torchs_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """bkai.yaml's 4 workers on a 2-core machine: torch warned 'This DataLoader will create
    4 worker processes in total...' for every loader; the batches do not depend on the
    worker count (every draw is seeded per sample), so 2 do the same work."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    caplog.set_level(logging.INFO)
    loader_module._say_capped.cache_clear()  # said once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning would fail the test
        loaders = [
            make_loader(
                SegDataset([], transform=None),
                batch_size=1,
                num_workers=asked,
                device=torch.device("cpu"),
                sampler=None,
            )
            for asked in (4, 4, 2, 0)
        ]
    assert [loader.num_workers for loader in loaders] == [2, 2, 2, 0]
    said = [r.getMessage() for r in caplog.records if "data.num_workers" in r.getMessage()]
    assert said == ["data.num_workers 4: 2 core(s) available here, so 2 loader workers"]
