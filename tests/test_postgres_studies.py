"""Optuna studies on a real PostgreSQL server (issue 23): a throwaway cluster (initdb +
pg_ctl on a free port under a temp folder) started and stopped here; two worker processes
joining one study reach exactly N complete trials between them with no duplicate and no
lost trial, and a worker killed with SIGKILL mid-trial leaves a study the next run
continues. PostgreSQL 15 is installed on the project's machines; the driver (psycopg2)
comes from requirements-dev.txt."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from chain import studies

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def as_postgres(cmd: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: run them as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """The URL of a database on a fresh PostgreSQL cluster, stopped and removed after the
    tests. Its folder is directly under the system's temp dir: pytest's own is private to
    the user running the tests, which the `postgres` user cannot enter."""
    base = Path(tempfile.mkdtemp(prefix="neopolyp-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    data, port = base / "data", free_port()
    subprocess.run(
        as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "optuna"]),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {base}"
    start = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log")]
    subprocess.run(as_postgres([*start, "-w", "start"]), check=True, capture_output=True)
    try:
        host = ["-h", "127.0.0.1", "-p", str(port), "-U", "optuna"]
        subprocess.run([str(PG_BIN / "createdb"), *host, "neopolyp"], check=True)
        yield f"postgresql+psycopg2://optuna@127.0.0.1:{port}/neopolyp"
    finally:
        stop = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
        subprocess.run(as_postgres(stop), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def worker(url: str, trials: int, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.study_worker", url, str(trials), *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def the_study(url: str) -> optuna.Study:
    names = [n for n in optuna.get_all_study_names(url) if n.startswith("pg-")]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=url)


def test_two_joined_workers_reach_exactly_n_trials_and_a_killed_one_is_continued(
    postgres: str,
) -> None:
    url = postgres
    first, second = worker(url, 10, "--join"), worker(url, 10, "--join")
    for proc in (first, second):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()
    study = the_study(url)
    done = studies.complete_trials(study)
    assert len(done) == 10  # exactly N between them
    assert len({t.number for t in done}) == 10 and len({t.params["x"] for t in done}) == 10
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "FAIL"}
    assert all(t.user_attrs.get("surplus") for t in study.trials if t.state.name == "FAIL")
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both processes worked

    # a worker killed with SIGKILL inside a trial leaves it RUNNING ...
    hung = worker(url, 14, "--join", "--hang-on-trial", str(len(study.trials)))
    deadline = time.monotonic() + 120
    while not study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        assert time.monotonic() < deadline and hung.poll() is None, "the worker never started"
        time.sleep(0.2)
    hung.send_signal(signal.SIGKILL)
    hung.wait()
    (left,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    # ... and the next run (the owner, not joining) fails it and goes on to the count
    owner = worker(url, 14)
    out, _ = owner.communicate(timeout=300)
    assert owner.returncode == 0, out.decode()
    study = the_study(url)
    assert study.trials[left.number].state == optuna.trial.TrialState.FAIL
    assert len(studies.complete_trials(study)) == 14
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "FAIL"}
