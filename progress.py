"""What a long run says while it runs: how far it has come and the time left.

Fold processes write their epochs to their own log files, so the console of a parallel
run was silent for the length of a fold (minutes on the demo, hours on real data), and a
notebook showed nothing at all. The pipeline prints one plain line at least every
`PROGRESS_S` seconds instead, built from the folds' `log.jsonl` files, which every epoch
rewrites atomically: no carriage returns, so notebooks and log files read it as it is.

The other long loops (the cache, predict, refine, the optuna studies, infer) tell the
same way through a `Ticker`. tqdm's bars stay for terminals; they switch themselves off
where the output is not one, which is where these lines are needed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from data.foldlog import read_log
from data.reader import DataError
from paths import Layout, RunFiles
from settings import TrainSettings

# The console hears from a parallel training run, and from any Ticker, at least this often.
PROGRESS_S = 60.0

log = logging.getLogger("progress")
T = TypeVar("T")


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


def minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"~{seconds / 60:.1f} min"


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


def pace(done: int, seconds: float, unit: str) -> str:
    """`3.21 images/s`, or per minute for slow units (trials that train a network)."""
    rate = done / seconds if seconds > 0 else 0.0
    return f"{rate:.2f} {unit}/s" if rate >= 1 else f"{rate * 60:.2f} {unit}/min"


class Ticker:
    """A plain line about a loop of `total` steps at least every `PROGRESS_S` seconds while
    it runs, and a closing one if it ran that long.

    The lines come from a thread, so one step that takes minutes (a trial, a fold's
    refiner) still gets them. `count`: where the steps done are read (an optuna study's
    trials, finished by worker processes too); otherwise the loop calls `step` or iterates
    through `track`. Use it as a context manager around the loop; `enabled=False` (a
    distributed run's other ranks) keeps it silent.
    """

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        count: Callable[[], int] | None = None,
        logger: logging.Logger | None = None,
        enabled: bool = True,
    ) -> None:
        self.what, self.total, self.unit = what, total, unit
        self._count = count
        self._stepped = 0
        self._log = logger or log
        self._every_s = max(PROGRESS_S, 0.01)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tell, name=f"ticker {what}", daemon=True)
        self._enabled = enabled
        self._told = False
        self._start = time.perf_counter()
        self._first = 0

    def step(self, n: int = 1) -> None:
        self._stepped += n

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, one step each."""
        for item in items:
            yield item
            self.step()

    def done(self) -> int:
        return self._count() if self._count is not None else self._stepped

    def line(self) -> str:
        done, seconds = self.done(), time.perf_counter() - self._start
        head = f"{self.what}: {done}/{self.total} {self.unit}"
        new = done - self._first
        if new <= 0:
            return f"{head}, {seconds / 60:.1f} min so far"
        left = minutes(seconds / new * max(0, self.total - done))
        return f"{head}, {pace(new, seconds, self.unit)}, {left} left"

    def _tell(self) -> None:
        while not self._stop.wait(self._every_s):
            self._log.info("%s", self.line())
            self._told = True

    def __enter__(self) -> Ticker:
        self._start = time.perf_counter()
        self._first = self.done()
        if self._enabled:
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._enabled:
            self._thread.join()
        if self._told and kind is None:
            done, seconds = self.done(), time.perf_counter() - self._start
            self._log.info(
                "%s: %d/%d %s in %.1f min, %s",
                self.what,
                done,
                self.total,
                self.unit,
                seconds / 60,
                pace(done - self._first, seconds, self.unit),
            )
