"""Adversarial studies, trial counts and launchers (issue 39, items 9 and parts of 10, 11):
the README's plain `postgresql://` URLs open with the driver the project installs; a
damaged SQLite study, a trial count below 1 and a failing or missing `sbatch` are each one
`error:` line naming the cause; a run without --join never fails a live worker's trial."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

import ensemble
import hpo
import pipeline
import tune
from chain import studies
from chain.studies import StudyPlace, run_study
from core.config import ConfigError
from tests.test_adversarial_config import one_error_line
from tests.test_postgres_studies import postgres  # noqa: F401  (the server fixture)
from tests.test_studies import objective
from tests.trainkit import write_config
from workflow import launchers

ROOT = Path(__file__).resolve().parents[1]
RUNNING = optuna.trial.TrialState.RUNNING
HANG_ON = 2  # the trial the worker process hangs in


def sqlite(tmp_path: Path) -> StudyPlace:
    return StudyPlace(f"sqlite:///{tmp_path / 'optuna.db'}", {"inputs": "adversarial"})


# ---------------------------------------------------------------- item 9: PostgreSQL URLs


def test_the_readmes_plain_postgresql_url_runs_a_study(postgres: str) -> None:  # noqa: F811
    """SQLAlchemy 2 maps `postgresql://` to psycopg 3, which the project does not install:
    optuna said "Failed to import DB access module" and the stage exited 2."""
    plain = postgres.replace("postgresql+psycopg2://", "postgresql://")
    study = run_study("plain", objective, 3, 0, StudyPlace(plain, {"inputs": "plain url"}))
    assert len(studies.complete_trials(study)) == 3
    assert study.study_name in optuna.get_all_study_names(postgres)
    heroku = plain.replace("postgresql://", "postgres://")
    again = run_study("plain", objective, 4, 0, StudyPlace(heroku, {"inputs": "plain url"}))
    assert again.study_name == study.study_name and len(studies.complete_trials(again)) == 4


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("mssql://user:secret@host/db", "pip install pyodbc"),
        ("mysql+mysqldb://user:secret@host/db", "pip install mysqlclient"),
    ],
)
def test_a_url_whose_driver_is_not_installed_names_the_package_in_one_line(
    url: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as err:
        studies.open_storage(url)
    message = str(err.value)
    assert message.endswith(hint) and "\n" not in message
    assert "secret" not in message


@pytest.mark.parametrize("url", ["sqlite:////proc/no/such/optuna.db", "journal:/proc/no/j.log"])
def test_a_storage_folder_that_cannot_be_made_is_one_line(url: str) -> None:
    """FileNotFoundError from mkdir was a traceback (ENOENT is no disk-full kind of error)."""
    with pytest.raises(ConfigError, match="cannot make /proc/no"):
        studies.open_storage(url)


# ---------------------------------------------------------------- item 10: one line, exit 1 or 2


@pytest.mark.parametrize(
    ("flags", "named"), [(["--parallel", "2"], "--parallel 2"), (["--join"], "--join")]
)
def test_an_in_memory_study_shared_between_processes_is_refused(
    tmp_path: Path,
    tiny_data: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    named: str,
) -> None:
    """Each worker process opened its own empty sqlite:// and the run ended in a
    StorageInternalError traceback, then "made no progress ... without --join?"."""
    config = write_config(tmp_path, tiny_data)
    cfg = yaml.safe_load(config.read_text())
    cfg["hpo"] = {"space": {"train.lr": {"low": 1e-3, "high": 1e-2}}}
    config.write_text(yaml.safe_dump(cfg))
    argv = ["--config", str(config), "--model", "tiny", "--trials", "2", "--storage", "sqlite://"]
    assert hpo.main(argv + flags) == 2
    line = one_error_line(capsys)
    assert named in line and "sqlite:///PATH" in line
    assert not list((tmp_path / "out" / "tiny").glob("hpo/*/trial*"))


def damage(db: Path) -> None:
    """Overwrite the middle of a SQLite file, as a bad disk or a half-copied file does
    (after moving what its write-ahead log holds into it)."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = db.stat().st_size
    with db.open("r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\xa5" * min(8192, size // 4))


def test_a_damaged_sqlite_study_is_one_line_naming_the_file(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hpo.py on an experiment whose optuna.db was damaged mid-file: a 60-line
    StorageInternalError ("exceeding max length") before; one line with the cause and the
    command that moves the file aside now, and the file left as it was."""
    config = write_config(tmp_path, tiny_data, epochs=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["hpo"] = {"space": {"train.lr": {"low": 1e-3, "high": 1e-2}}}
    config.write_text(yaml.safe_dump(cfg))
    db = tmp_path / "out" / "tiny" / "optuna.db"
    run_study("other", objective, 20, 0, StudyPlace(f"sqlite:///{db}"))
    damage(db)
    before = db.read_bytes()
    assert hpo.main(["--config", str(config), "--model", "tiny", "--trials", "2"]) == 1
    line = one_error_line(capsys)
    assert "database disk image is malformed" in line and str(db) in line
    assert f"mv {db} {db}.damaged" in line
    assert db.read_bytes() == before


def test_a_file_that_is_no_database_is_one_line_too(tmp_path: Path) -> None:
    db = tmp_path / "optuna.db"
    db.write_bytes(b"not a database " * 200)
    with pytest.raises(ConfigError) as err:
        run_study("demo", objective, 2, 0, StudyPlace(f"sqlite:///{db}"))
    assert "file is not a database" in str(err.value) and "\n" not in str(err.value)
    assert f"mv {db} {db}.damaged" in str(err.value)


@pytest.mark.parametrize(
    ("section", "value", "flag", "named"),
    [
        ("ensemble", 0, None, "ensemble.trials"),
        ("tune", -3, None, "tune.trials"),
        ("tune", "many", None, "tune.trials"),
        ("ensemble", 50, "0", "--trials"),
        ("tune", 50, "-1", "--trials"),
    ],
)
def test_a_trial_count_below_one_is_refused_by_name(
    tmp_path: Path,
    tiny_data: Path,
    capsys: pytest.CaptureFixture[str],
    section: str,
    value: object,
    flag: str | None,
    named: str,
) -> None:
    """`--trials 0` fell back to the config's count; `trials: 0` in the config or
    `--trials -1` ended in a ValueError traceback from run_study."""
    config = write_config(tmp_path, tiny_data)
    argv = ["--config", str(config), "--set", f"{section}.trials={value}"]
    stage = {"ensemble": ensemble, "tune": tune}[section]
    assert stage.main(argv + (["--trials", flag] if flag else [])) == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", [ensemble, tune])
def test_jobs_0_is_refused_by_its_flag_before_the_maps_are_read(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], stage: object
) -> None:
    """joblib's "n_jobs == 0 in Parallel has no meaning" was a traceback once every OOF map
    was loaded."""
    config = write_config(tmp_path, tiny_data)
    assert stage.main(["--config", str(config), "--jobs", "0"]) == 2
    assert one_error_line(capsys).startswith("error: --jobs 0: give N >= 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--set", "hpo.trials=0"], "hpo.trials"),
        (["--set", "hpo.trials=5", "--trials", "-1"], "--trials"),
        (["--set", "hpo.epochs=0"], "hpo.epochs"),
        (["--epochs", "0"], "--epochs"),  # fell back to train.epochs
        (["--epochs", "-1"], "--epochs"),  # was refused as "train.epochs"
    ],
)
def test_hpos_counts_are_checked_where_the_others_are(
    tmp_path: Path,
    tiny_data: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    named: str,
) -> None:
    config = write_config(tmp_path, tiny_data)
    assert hpo.main(["--config", str(config), "--model", "tiny", *flags]) == 2
    assert one_error_line(capsys).startswith(f"error: {named} must be a whole number")
    assert not (tmp_path / "out").exists()


def test_every_trial_count_is_read_in_one_place_that_names_it() -> None:
    """search_settings (ensemble, tune, the pipeline's preflight) and hpo.py both check a
    configured count in its section's settings class and a flag in studies.flag_count."""
    with pytest.raises(ConfigError, match=r"tune\.trials"):
        studies.search_settings({"tune": {"trials": 0}}, "tune")
    with pytest.raises(ConfigError, match=r"--trials"):
        studies.search_settings({"tune": {"trials": 5}}, "tune", trials=0)
    assert studies.search_settings({}, "tune") == (100, "competition")


def fake_slurm(folder: Path, sbatch_exit: int) -> str:
    """A PATH whose `srun` answers and whose `sbatch` fails as a cluster that refuses the
    partition does (or succeeds with a job id)."""
    folder.mkdir()
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    err = "sbatch: error: Batch job submission failed: Invalid partition name specified"
    say = f'echo "{err}" >&2' if sbatch_exit else 'echo "Submitted batch job 17"'
    (folder / "sbatch").write_text(f"#!/bin/sh\n{say}\nexit {sbatch_exit}\n")
    for tool in ("srun", "sbatch"):
        (folder / tool).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_a_failing_sbatch_is_one_line_naming_its_error(
    tmp_path: Path,
    tiny_data: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """submitit's FailedJobError was a traceback out of pipeline.py."""
    monkeypatch.setenv("PATH", fake_slurm(tmp_path / "bin", 1))
    config = write_config(tmp_path, tiny_data, epochs=1)
    assert pipeline.main(["--config", str(config), "--launcher", "slurm"]) == 2
    # the split is made and the console says what will train before sbatch is asked
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "sbatch" in line and "Invalid partition name specified" in line
    assert "slurm: section" in line and "--set slurm.partition=" in line


def test_a_machine_without_slurm_is_told_before_any_work(
    tmp_path: Path,
    tiny_data: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """submitit's RuntimeError ('Could not detect "srun"') was a traceback, after the split."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    config = write_config(tmp_path, tiny_data, epochs=1)
    assert pipeline.main(["--config", str(config), "--launcher", "slurm"]) == 2
    line = one_error_line(capsys)
    assert "sbatch" in line and "--launcher local" in line
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("PATH", fake_slurm(tmp_path / "no_srun", 0))
    (tmp_path / "no_srun" / "srun").unlink()
    with pytest.raises(ConfigError, match="srun"):
        launchers.check_slurm()


# ---------------------------------------------------------------- item 11: a live worker


def hanging_worker(url: str, trials: int) -> tuple[subprocess.Popen, optuna.Study]:
    """A worker process (tests/study_worker.py) alive inside trial HANG_ON of its study;
    the study, once that trial is RUNNING."""
    cmd = [sys.executable, "-m", "tests.study_worker", url, str(trials)]
    cmd += ["--join", "--hang-on-trial", str(HANG_ON)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[0].decode()
        assert time.monotonic() < deadline, "the worker never reached its trial"
        names = [n for n in optuna.get_all_study_names(url) if n.startswith("pg-")]
        if names:
            study = optuna.load_study(study_name=names[0], storage=url)
            if [t for t in study.get_trials(states=(RUNNING,)) if t.number == HANG_ON]:
                return proc, study
        time.sleep(0.2)


def test_a_run_without_join_never_fails_a_live_workers_trial(tmp_path: Path) -> None:
    """The second run failed the first one's trial at once and ran its parameters again,
    while the first was still training it. Now it refuses, naming --join, and leaves the
    trial alone; once that worker is killed, a run without --join fails it at once."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    place = StudyPlace(url, {"inputs": "postgres test"})  # study_worker's identity
    proc, study = hanging_worker(url, 4)
    try:
        (live,) = study.get_trials(states=(RUNNING,))
        with pytest.raises(studies.StudyInUse) as err:
            run_study("pg", objective, 4, 0, place)
        message = str(err.value)
        assert "--join" in message and f"pid {proc.pid}" in message and "\n" not in message
        assert study.trials[live.number].state == RUNNING
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = run_study("pg", objective, 4, 0, place)
    assert resumed.trials[live.number].state == optuna.trial.TrialState.FAIL
    assert len(studies.complete_trials(resumed)) == 4


def trial_of(place: StudyPlace, name: str, host: str, heartbeat: bool) -> optuna.trial.FrozenTrial:
    """A RUNNING trial recorded as another machine's worker's, with a heartbeat if asked."""
    storage = studies.open_storage(place.storage, shared=True)
    study = optuna.load_study(study_name=name, storage=storage)
    with studies.quiet_heartbeats():
        trial = study.ask({"x": optuna.distributions.FloatDistribution(-5.0, 5.0)})
    record = {"host": host, "pid": 4242, "start": "0", "heartbeat": heartbeat}
    storage.set_trial_system_attr(trial._trial_id, studies.PROCESS_ATTR, record)
    if heartbeat:
        storage.record_heartbeat(trial._trial_id)
    return study.trials[trial.number]


def test_another_machines_worker_is_judged_by_its_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    place = StudyPlace(sqlite(tmp_path).storage, {"inputs": "adversarial"}, n_workers=2)
    lone = StudyPlace(place.storage, place.identity)
    name = run_study("demo", objective, 2, 0, lone).study_name
    beating = trial_of(place, name, "elsewhere", heartbeat=True)
    # a fresh heartbeat: alive, whatever this machine's process table says
    with pytest.raises(studies.StudyInUse, match=r"pid 4242 on elsewhere \(its heartbeat.*--join"):
        run_study("demo", objective, 2, 0, place)
    # no heartbeat at all: this machine cannot tell, so it refuses and says where to check
    silent = trial_of(place, name, "elsewhere", heartbeat=False)
    study = optuna.load_study(study_name=name, storage=place.storage)
    study.tell(beating.number, state=optuna.trial.TrialState.FAIL)
    with pytest.raises(studies.StudyInUse, match="on elsewhere"):
        run_study("demo", objective, 2, 0, place)
    study.tell(silent.number, state=optuna.trial.TrialState.FAIL)
    # a heartbeat older than the grace period: dead, failed and queued to run again
    monkeypatch.setattr(studies, "HEARTBEAT_GRACE_S", 1)
    dead = trial_of(place, name, "elsewhere", heartbeat=True)
    time.sleep(2.1)  # SQLite's clock for heartbeats counts whole seconds
    owner = optuna.load_study(study_name=name, storage=studies.open_storage(place.storage, True))
    assert studies.fail_abandoned(owner) == []  # failed by its heartbeat, not as abandoned
    assert owner.trials[dead.number].state == optuna.trial.TrialState.FAIL
    (retry,) = owner.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert retry.system_attrs["failed_trial"] == dead.number


def test_a_joiner_does_not_wait_for_a_dead_local_workers_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone run (no heartbeats) SIGKILLed mid-trial on this machine: a joiner counted the
    trial as claimed and waited for it forever. Its process is gone, so the joiner fails
    it and runs its parameters again, without waiting."""
    place = sqlite(tmp_path)
    name = run_study("demo", objective, 2, 0, place).study_name
    gone = subprocess.Popen(["sleep", "60"])
    record = {"host": socket.gethostname(), "pid": gone.pid, "heartbeat": False}
    record["start"] = studies.process_start(gone.pid)
    gone.kill()
    gone.wait()
    study = optuna.load_study(study_name=name, storage=place.storage)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(-5.0, 5.0)})
    study._storage.set_trial_system_attr(dead._trial_id, studies.PROCESS_ATTR, record)

    def no_waiting(seconds: float) -> None:
        raise AssertionError("the joiner waited for a trial whose process is gone")

    monkeypatch.setattr(studies.time, "sleep", no_waiting)
    joined = run_study(
        "demo", objective, 3, 0, StudyPlace(place.storage, place.identity, join=True)
    )
    assert joined.trials[dead.number].state == optuna.trial.TrialState.FAIL
    done = studies.complete_trials(joined)
    assert len(done) == 3 and done[-1].params["x"] == dead.params["x"]
