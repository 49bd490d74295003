"""Plain progress lines for long loops: how far, how fast, the time left.

The cache, each training epoch, predict, refine, the optuna studies, post-processing and
infer.py would otherwise be silent in a notebook or a log file for as long as they run:
tqdm's bars switch themselves off where the output is not a terminal, which is exactly
where these lines are needed. No project imports: the data package uses it too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TypeVar

# The console hears from a parallel training run, and from any Ticker, at least this often.
PROGRESS_S = 60.0

log = logging.getLogger("progress")
# The `extra` of a log record that pipeline.py's console shows at its default verbosity,
# where the stages' other INFO lines go to the log file only.
PROGRESS = {"progress": True}
T = TypeVar("T")


def minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"~{seconds / 60:.1f} min"


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
    distributed run's other ranks) keeps it silent; `every_s` asks for lines more often
    than `PROGRESS_S` (a wait the user sits through before any work starts).
    """

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        count: Callable[[], int] | None = None,
        logger: logging.Logger | None = None,
        enabled: bool = True,
        every_s: float | None = None,
    ) -> None:
        self.what, self.total, self.unit = what, total, unit
        self._count = count
        self._stepped = 0
        self._log = logger or log
        self._every_s = max(min(PROGRESS_S, PROGRESS_S if every_s is None else every_s), 0.01)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tell, name=f"ticker {what}", daemon=True)
        self._enabled = enabled
        self._told = False
        self._start = time.perf_counter()
        self._first = 0

    def step(self, n: int = 1) -> None:
        self._stepped += n

    def skip(self, n: int = 1) -> None:
        """Steps done without the work (a result reused from an earlier run): counted as
        done, left out of the pace, so the time left is not read off free steps."""
        self._first += n
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
            self._log.info("%s", self.line(), extra=PROGRESS)
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
                extra=PROGRESS,
            )
