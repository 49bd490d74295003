"""pipeline.train_in_parallel on several GPUs: each fold process goes to the GPU running
the fewest folds, so a GPU whose fold ended takes the next one. No GPU here: the device
count is faked and the fold processes are stand-ins that end after a set number of polls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pipeline


class FakeFold:
    """A train.py process that ends (exit 0) after `polls` polls."""

    def __init__(self, polls: int) -> None:
        self.polls = polls
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.polls -= 1
        if self.polls <= 0:
            self.returncode = 0
        return self.returncode


def schedule(monkeypatch, tmp_path: Path, polls: dict[int, int], parallel: int, gpus: int):
    """{fold: the CUDA_VISIBLE_DEVICES its process got} for folds lasting `polls` polls."""
    started: dict[int, str | None] = {}

    def popen(cmd, stdout, stderr, env):
        fold = int(cmd[cmd.index("--fold") + 1])
        started[fold] = env.get("CUDA_VISIBLE_DEVICES")
        return FakeFold(polls[fold])

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(pipeline.subprocess, "Popen", popen)
    monkeypatch.setattr(pipeline, "prepare_train_data", lambda cfg, dist: None)
    monkeypatch.setattr(pipeline.time, "sleep", lambda s: None)
    cfg = {"out_dir": str(tmp_path), "experiment": "exp"}
    jobs = [("unet", k) for k in sorted(polls)]
    pipeline.train_in_parallel(cfg, [], jobs, parallel)
    return started


def test_a_gpu_whose_fold_ended_takes_the_next_fold(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # fold 1 ends first: fold 2 goes to its GPU (1), not to fold % 2 = 0 beside fold 0
    got = schedule(monkeypatch, tmp_path, {0: 6, 1: 1, 2: 6, 3: 1, 4: 1}, parallel=2, gpus=2)
    assert got == {0: "0", 1: "1", 2: "1", 3: "0", 4: "0"}


def test_more_folds_than_gpus_share_them_evenly(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    got = schedule(monkeypatch, tmp_path, {k: 3 for k in range(4)}, parallel=4, gpus=2)
    assert got == {0: "0", 1: "1", 2: "0", 3: "1"}


def test_the_parents_visible_gpus_are_the_ones_handed_out(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    got = schedule(monkeypatch, tmp_path, {0: 2, 1: 2}, parallel=2, gpus=2)
    assert got == {0: "2", 1: "5"}


@pytest.mark.parametrize("gpus", [0, 1])
def test_one_gpu_or_none_leaves_the_device_alone(monkeypatch, tmp_path, gpus) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    got = schedule(monkeypatch, tmp_path, {0: 1, 1: 1}, parallel=2, gpus=gpus)
    assert got == {0: "3", 1: "3"}  # inherited unchanged
