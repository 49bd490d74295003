"""What a long run says while it runs: how far it has come and the time left.

Fold processes write their epochs to their own log files, so the console of a parallel
run was silent for the length of a fold (minutes on the demo, hours on real data), and a
notebook showed nothing at all. The pipeline prints one plain line at least every
`ticker.PROGRESS_S` seconds instead, built from the folds' `log.jsonl` files, which every epoch
rewrites atomically: no carriage returns, so notebooks and log files read it as it is.

The other long loops tell the same way through ticker.Ticker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from core.paths import Layout, RunFiles
from core.settings import TrainSettings
from core.ticker import minutes
from data.foldlog import read_log
from data.reader import DataError


@dataclass(frozen=True)
class FoldProgress:
    """One fold in flight: how far its log has come."""

    name: str  # "unet fold 2"
    epochs: int  # the fold's train.epochs
    done: int  # epochs in its log
    score: float | None  # the last epoch's validation score (train.best_metric)
    epoch_s: float | None  # mean seconds per epoch so far

    @classmethod
    def read(cls, name: str, run: RunFiles, epochs: int, metric: str) -> FoldProgress:
        try:
            history = read_log(run.log)
        except DataError:  # a log from another attempt being replaced: no news yet
            history = []
        if not history:
            return cls(name, epochs, 0, None, None)
        seconds = [float(r["epoch_time_s"]) for r in history]
        last = history[-1]
        return cls(name, epochs, len(history), last.get(metric), sum(seconds) / len(seconds))

    @property
    def left_s(self) -> float | None:
        return None if self.epoch_s is None else self.epoch_s * max(0, self.epochs - self.done)

    def describe(self) -> str:
        if not self.done:
            pace = f", {minutes(self.left_s)} left" if self.epoch_s is not None else ""
            return f"{self.name}: starting{pace}"
        score = f", val {self.score:.4f}" if self.score is not None else ""
        return f"{self.name}: epoch {self.done}/{self.epochs}{score}, {minutes(self.left_s)} left"


def run_left_s(
    running: Sequence[FoldProgress], queued_epochs: Sequence[int], parallel: int
) -> float | None:
    """The run's time left: the running folds' own estimates plus the queued folds at the
    mean epoch time seen so far, shared by `parallel` processes, and never less than the
    slowest running fold's own time left. None before any epoch."""
    rates = [f.epoch_s for f in running if f.epoch_s is not None]
    if not rates:
        return None
    epoch_s = sum(rates) / len(rates)
    lefts = [f.left_s if f.left_s is not None else epoch_s * f.epochs for f in running]
    shared = (sum(lefts) + epoch_s * sum(queued_epochs)) / max(1, parallel)
    return max(shared, *lefts)


def progress_line(
    running: Sequence[FoldProgress], queued_epochs: Sequence[int], done: int, parallel: int
) -> str:
    """`training: 2 running, 3 queued, 1 done | <fold> | <fold> | run ~12.5 min left`."""
    head = f"training: {len(running)} running, {len(queued_epochs)} queued, {done} done"
    tail = f"run {minutes(run_left_s(running, queued_epochs, parallel))} left"
    return " | ".join([head, *(f.describe() for f in running), tail])


def training_line(
    layout: Layout,
    recipes: dict[str, TrainSettings],
    running: Sequence[tuple[str, int]],
    queued: Sequence[tuple[str, int]],
    finished: Sequence[tuple[str, int]],
    parallel: int,
) -> str:
    """The progress line of a parallel training run, from the folds' logs. A fold that has
    not finished an epoch yet is timed at its model's finished folds' pace, if any."""

    def read(model: str, fold: int) -> FoldProgress:
        recipe = recipes[model]
        return FoldProgress.read(
            f"{model} fold {fold}", layout.fold(model, fold), recipe.epochs, recipe.best_metric
        )

    pace: dict[str, list[float]] = {}
    for model, fold in finished:
        seconds = read(model, fold).epoch_s
        if seconds is not None:
            pace.setdefault(model, []).append(seconds)
    in_flight = []
    for model, fold in running:
        state = read(model, fold)
        if state.epoch_s is None and model in pace:
            state = dataclasses.replace(state, epoch_s=sum(pace[model]) / len(pace[model]))
        in_flight.append(state)
    queued_epochs = [recipes[m].epochs for m, _ in queued]
    return progress_line(in_flight, queued_epochs, len(finished), parallel)
