"""What keeping tune.py's study in a storage costs per trial, against a trial's own work.

Every optuna call of a trial (ask, each suggest, each user attribute, tell) is a commit to
the storage, and TPE re-reads the study's trials before sampling. That cost does not
depend on the number of images, so it is measured with tune.py's own search space and
attributes but without the scoring (`bookkeeping_trial`), in memory and in SQLite (the
default storage, WAL mode as studies.py opens it, and SQLite's default rollback journal
for comparison), then set against the mean trial of a real tune.py search (in memory)
over 1,000 synthetic OOF maps at 352×352. Aim: the storage adds under 5% to that trial.
"""

from __future__ import annotations

import argparse
import functools
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna

import tune
from bench.postprocess_speed import synthetic_oof
from chain import studies
from core.paths import Layout

# When each bookkeeping trial started: the gaps are whole trial cycles (tell, ask, sample).
STARTS: list[float] = []


def bookkeeping_trial(trial: optuna.Trial) -> float:
    """tune.py's trial without the scoring: the same suggestions and attributes."""
    STARTS.append(time.perf_counter())
    params = tune.suggest_params(trial)
    trial.set_user_attr("params", params.to_dict())
    scores = {k: 0.5 for k in ("competition", "competition_neo", "competition_non")}
    trial.set_user_attr("scores", scores)
    return float(np.random.default_rng(trial.number).random())


class RollbackConnection(sqlite3.Connection):
    """SQLite as optuna opens it by default: rollback journal, synchronous=FULL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA journal_mode=DELETE")


def per_trial(place: studies.StudyPlace | None, trials: int) -> tuple[float, float]:
    """Seconds per trial over all `trials` of one study, and over its later half (when TPE
    reads a longer history)."""
    STARTS.clear()
    studies.run_study("bench", bookkeeping_trial, trials, 0, place, start=tune.START_TRIALS)
    gaps = np.diff(STARTS)
    return float(gaps.mean()), float(gaps[len(gaps) // 2 :].mean())


def real_search(n: int, work: int, trials: int, jobs: int) -> tuple[float, float, float]:
    """tune.py's search over `n` synthetic OOF maps, in memory: (mean, fastest, slowest)
    seconds per trial. TPE switches steps on and off, so trials differ several-fold."""
    probs, targets = synthetic_oof(n, (work, work), seed=0)
    score = functools.partial(tune._trial_score, probs, targets, "competition", jobs)
    study = studies.run_study("tune", score, trials, 0, None, start=tune.START_TRIALS)
    took = [t.duration.total_seconds() for t in studies.complete_trials(study)]
    return float(np.mean(took)), min(took), max(took)


def main() -> None:
    from bench.report import update_section  # imports torch: only when reporting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=120, help="bookkeeping trials per storage")
    parser.add_argument("--n-oof", type=int, default=1000, help="OOF maps of the real search")
    parser.add_argument("--work", type=int, default=352, help="working resolution (square)")
    parser.add_argument("--real-trials", type=int, default=30, help="trials of the real search")
    parser.add_argument("--jobs", type=int, default=1, help="scoring threads of the real search")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        memory = per_trial(None, args.trials)
        wal = per_trial(
            studies.StudyPlace(studies.default_storage(Layout(Path(tmp), Path(tmp)))), args.trials
        )
        default_connection = studies.WalConnection  # optuna's default journal, for comparison
        studies.WalConnection = RollbackConnection
        try:
            place = studies.StudyPlace(f"sqlite:///{Path(tmp) / 'rollback.db'}")
            rollback = per_trial(place, args.trials)
        finally:
            studies.WalConnection = default_connection
    mean, fastest, slowest = real_search(args.n_oof, args.work, args.real_trials, args.jobs)
    overhead = wal[1] - memory[1]
    share = overhead / mean
    verdict = "meets" if share < 0.05 else "misses"
    rows = "\n".join(
        f"| {name} | {1e3 * whole:.1f} | {1e3 * later:.1f} |"
        for name, (whole, later) in (
            ("in memory (before: `optuna.create_study()` without storage)", memory),
            ("SQLite, WAL + synchronous=NORMAL (`studies.open_storage`, the default)", wal),
            ("SQLite, default rollback journal (optuna's default)", rollback),
        )
    )
    md = f"""
{os.cpu_count()} CPU cores shared with other work (load average {os.getloadavg()[0]:.1f} at
the end). One study per storage, tune.py's search space and attributes, no scoring
(`bookkeeping_trial`); time from one trial's start to the next, over all trials and over
the later half (TPE reads a longer history).

| storage | ms per trial (all) | ms per trial (later half) |
|---|---:|---:|
{rows}

A real tune.py search over {args.n_oof} synthetic OOF maps at {args.work}×{args.work}
({args.real_trials} trials, {args.jobs} scoring thread(s), in memory): {mean:.2f} s per
trial on average ({fastest:.2f}–{slowest:.2f} s). The storage adds
{1e3 * overhead:.0f} ms per trial, {100 * share:.1f}% of the average trial, which
{verdict} the aim of under 5% ({100 * overhead / fastest:.0f}% of the fastest trial).
SQLite's default rollback journal would add {1e3 * (rollback[1] - memory[1]):.0f} ms
(each commit waits for the disk; optuna commits every suggestion), hence WAL.
Whole benchmark: {time.perf_counter() - start:.0f} s.
"""
    print(md)
    update_section("optuna_storage", md)


if __name__ == "__main__":
    main()
