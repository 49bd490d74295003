"""Plain progress lines from the long loops (issue 21): at least every PROGRESS_S seconds,
also while one step takes longer than that, with the time left, and a closing line."""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time

import pytest

from chain import studies
from core import ticker as ticker_module
from core.ticker import Ticker

INTERVAL_S = 0.05
LATE_S = 0.5  # how late a thread may wake on a loaded 2-core machine


@pytest.fixture
def fast(monkeypatch, caplog):
    monkeypatch.setattr(ticker_module, "PROGRESS_S", INTERVAL_S)
    caplog.set_level(logging.INFO)
    return caplog


def lines(caplog, what: str) -> list[tuple[float, str]]:
    return [(r.created, r.getMessage()) for r in caplog.records if r.getMessage().startswith(what)]


def test_a_slow_step_still_gets_lines_with_the_time_left_and_a_closing_line(fast) -> None:
    with Ticker("work", 3, "items") as ticker:
        time.sleep(5 * INTERVAL_S)  # the first step: nothing done yet
        ticker.step()
        time.sleep(5 * INTERVAL_S)
        ticker.step(2)
    said = [text for _, text in lines(fast, "work")]
    assert any(re.fullmatch(r"work: 0/3 items, [\d.]+ min so far", t) for t in said)
    assert any(
        re.fullmatch(r"work: 1/3 items, [\d.]+ items/(s|min), ~[\d.]+ min left", t) for t in said
    )
    assert re.fullmatch(r"work: 3/3 items in [\d.]+ min, [\d.]+ items/(s|min)", said[-1])
    assert not any(t.name == "ticker work" for t in threading.enumerate())


def test_skipped_steps_count_as_done_but_not_in_the_pace(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(ticker_module.time, "perf_counter", lambda: now[0])
    with Ticker("predict", 100, "images", enabled=False) as ticker:
        ticker.skip(90)  # maps reused from an earlier run: no work done
        now[0] = 60.0
        ticker.step(5)
        # 5 images in a minute, 5 left: one more minute, not the 6 s that 95 would say
        assert ticker.line() == "predict: 95/100 images, 5.00 images/min, ~1.0 min left"


def test_lines_come_at_least_every_interval(fast) -> None:
    with Ticker("steady", 10, "items") as ticker:
        for item in ticker.track(range(10)):
            time.sleep(INTERVAL_S * item / 3)
    stamps = [t for t, _ in lines(fast, "steady")]
    assert len(stamps) >= 3
    assert all(b - a < INTERVAL_S + LATE_S for a, b in itertools.pairwise(stamps))


def test_track_counts_each_item_once_it_is_done(fast) -> None:
    ticker = Ticker("track", 4, "items", enabled=False)
    seen = []
    with ticker:
        for item in ticker.track("abcd"):
            seen.append((item, ticker.done()))
    assert seen == [("a", 0), ("b", 1), ("c", 2), ("d", 3)] and ticker.done() == 4


def test_a_silent_ticker_and_a_failed_loop_say_no_closing_line(fast) -> None:
    with Ticker("quiet", 2, "items", enabled=False) as ticker:
        time.sleep(5 * INTERVAL_S)
        ticker.step(2)
    assert lines(fast, "quiet") == []
    with pytest.raises(RuntimeError), Ticker("broken", 2, "items"):
        time.sleep(5 * INTERVAL_S)
        raise RuntimeError("stop")
    said = [text for _, text in lines(fast, "broken")]
    assert said and not any(re.search(r" in [\d.]+ min", t) for t in said)
    assert not any(t.name.startswith("ticker ") for t in threading.enumerate())


def test_a_study_reports_its_trials_as_they_finish(fast) -> None:
    def objective(trial) -> float:
        time.sleep(3 * INTERVAL_S)
        return trial.suggest_float("x", 0.0, 1.0)

    studies.run_study("demo", objective, trials=4, seed=0)
    said = [text for _, text in lines(fast, "demo study")]
    assert any(re.match(r"demo study: [1-3]/4 trials, .* left$", t) for t in said)
    assert re.match(r"demo study: 4/4 trials in ", said[-1])
