"""A study worker in its own process, as on another machine: `python -m tests.study_worker
URL TRIALS [--join] [--hang-on-trial K]` runs studies.run_study on the shared test
objective; with --hang-on-trial it sleeps forever inside trial K (to be killed there)."""

from __future__ import annotations

import argparse
import time

import optuna

from chain.studies import StudyPlace, run_study

IDENTITY = {"inputs": "postgres test"}


def objective(trial: optuna.Trial, hang_on: int | None = None) -> float:
    """Long enough (0.3 s) that two workers overlap; a distinct x per trial."""
    x = trial.suggest_float("x", -5.0, 5.0)
    if trial.number == hang_on:
        time.sleep(3600)
    time.sleep(0.3)
    return -((x - 1) ** 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("trials", type=int)
    p.add_argument("--join", action="store_true")
    p.add_argument("--hang-on-trial", type=int)
    args = p.parse_args()
    place = StudyPlace(args.url, IDENTITY, join=args.join)
    run_study("pg", lambda t: objective(t, args.hang_on_trial), args.trials, 0, place)


if __name__ == "__main__":
    main()
