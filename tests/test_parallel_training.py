"""pipeline.train_in_parallel: on several GPUs each fold process goes to the GPU running
the fewest folds, so a GPU whose fold ended takes the next one; the console gets a
progress line at least every PROGRESS_S seconds. No GPU here: the device count is faked,
the fold processes are stand-ins that write an epoch to their log per poll and end after
a set number of polls, and the clock is faked (each poll takes STEP_S)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import pipeline
from core import ticker
from core.paths import RunFiles
from core.settings import TrainSettings
from data.foldlog import write_log
from workflow import progress

STEP_S = 25.0
EPOCHS = 4


class FakeFold:
    """A train.py process: one epoch (STEP_S seconds, validation score 0.5) per poll in its
    log, and exit 0 after `polls` polls."""

    def __init__(self, polls: int, run: RunFiles) -> None:
        self.polls, self.run, self.history = polls, run, []
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.polls -= 1
        epoch = len(self.history) + 1
        self.history.append({"epoch": epoch, "epoch_time_s": STEP_S, "competition": 0.5})
        self.run.dir.mkdir(parents=True, exist_ok=True)
        write_log(self.run.log, self.history)
        if self.polls <= 0:
            self.returncode = 0
        return self.returncode


def schedule(
    monkeypatch, tmp_path: Path, polls: dict[int, int], parallel: int, gpus: int
) -> dict[int, str | None]:
    """{fold: the CUDA_VISIBLE_DEVICES its process got} for folds lasting `polls` polls."""
    started: dict[int, str | None] = {}
    cfg = {"out_dir": str(tmp_path), "experiment": "exp", "train": {"epochs": EPOCHS}}
    layout = pipeline.layout_of(cfg)

    def popen(cmd, stdout, stderr, env):
        fold = int(cmd[cmd.index("--fold") + 1])
        started[fold] = env.get("CUDA_VISIBLE_DEVICES")
        return FakeFold(polls[fold], layout.fold("unet", fold))

    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += STEP_S

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(pipeline.subprocess, "Popen", popen)
    monkeypatch.setattr(pipeline, "prepare_train_data", lambda cfg, dist: None)
    monkeypatch.setattr(pipeline.time, "sleep", sleep)
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: clock[0])
    jobs = [("unet", k) for k in sorted(polls)]
    recipes = {"unet": TrainSettings.from_config(cfg)}
    pipeline.train_in_parallel(cfg, [], jobs, parallel, recipes)
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


def test_a_parallel_run_prints_progress_at_least_every_interval(monkeypatch, tmp_path) -> None:
    """Which folds run, their epoch and score, the time left for each and for the run."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lines: list[tuple[float, str]] = []
    make_line = progress.progress_line

    def recorded(*args) -> str:
        lines.append((pipeline.time.monotonic(), make_line(*args)))
        return lines[-1][1]

    monkeypatch.setattr(progress, "progress_line", recorded)
    schedule(monkeypatch, tmp_path, {0: EPOCHS, 1: EPOCHS, 2: EPOCHS}, parallel=2, gpus=0)
    times = [t for t, _ in lines]
    assert len(times) >= 2 and times[0] <= ticker.PROGRESS_S + STEP_S
    assert all(b - a < ticker.PROGRESS_S + STEP_S for a, b in itertools.pairwise(times))
    first = lines[0][1]  # 3 polls (75 s) in: folds 0 and 1 at epoch 3 of 4, fold 2 queued
    assert first.startswith("training: 2 running, 1 queued, 0 done | ")
    assert "unet fold 0: epoch 3/4, val 0.5000, ~0.4 min left" in first
    # the run: 25 s left on each running fold + 4 epochs of 25 s queued, over 2 processes
    assert first.endswith(f"run ~{(25 + 25 + 4 * 25) / 2 / 60:.1f} min left")


def test_a_fold_without_an_epoch_yet_is_timed_at_its_models_finished_folds_pace(
    tmp_path: Path,
) -> None:
    cfg = {"out_dir": str(tmp_path), "experiment": "exp", "train": {"epochs": EPOCHS}}
    layout = pipeline.layout_of(cfg)
    done = layout.fold("unet", 0)
    done.dir.mkdir(parents=True)
    write_log(
        done.log, [{"epoch": e, "epoch_time_s": STEP_S, "competition": 0.5} for e in (1, 2, 3, 4)]
    )
    recipes = {"unet": TrainSettings.from_config(cfg)}
    line = progress.training_line(layout, recipes, [("unet", 1)], [], [("unet", 0)], 1)
    assert "unet fold 1: starting, ~1.7 min left" in line  # 4 epochs of 25 s
    assert line.startswith("training: 1 running, 0 queued, 1 done")
    assert line.endswith("run ~1.7 min left")
    # the last fold of a --parallel 2 run: the run ends when it does, not in half its time
    last = progress.training_line(layout, recipes, [("unet", 1)], [], [("unet", 0)], 2)
    assert last.endswith("run ~1.7 min left")
    alone = progress.training_line(layout, recipes, [("unet", 1)], [], [], 1)
    assert alone.endswith("unet fold 1: starting | run ? left")
