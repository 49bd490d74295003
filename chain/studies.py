"""Optuna studies that outlive a run: what optuna does not do itself, and nothing else.

`ensemble.py`, `tune.py` and `hpo.py` search with optuna; a search of a few hundred
trials over thousands of OOF maps, or of a few dozen trainings, takes hours, so it must
survive a kill, be shareable between processes and machines, and be viewable afterwards.
Optuna gives the storages, TPE, the pruners, heartbeats with retry of a dead worker's
trial, and the trials table (`trials_dataframe`, written as CSV by `export_trials`). It
does not give, and this module adds, for all three stages through `run_study`:

- an exact trial count across workers (`n_trials` counts one process's trials and
  `MaxTrialsCallback` stops only after a trial, so K workers overshoot by up to K-1), and
  a loop that tolerates a trial another worker finished (SQLite has no row locks; inside
  `study.optimize` that is an error);
- a study name derived from the inputs, so changed inputs never mix with an old search;
- a run that resumes a study sampling what one uninterrupted run would (TPE's own seed
  is one stream per sampler object);
- failing at once the trials a killed run left RUNNING (heartbeats fail them only after
  a grace period, and only where heartbeats were recorded);
- SQLite in WAL mode, and workers in fresh processes.

In detail:

- **Storage**: `sqlite:///<out_dir>/<experiment>/optuna.db` by default (one file per
  experiment); `--storage URL` takes any RDB URL optuna accepts (`postgresql://...`,
  `mysql://...`; one that names no driver gets an installed one, `storage_url`) or
  `journal:PATH` for a `JournalStorage` file (e.g. on a network drive).
- **Name**: `<stage>-<12 hex>`, a hash of the identity of the inputs (the blended models,
  split id, the OOF stores' meta.json and content, the targets, the objective, the seed).
  A changed input starts a new study instead of mixing its trials with an old search.
- **Count**: `trials` is the number of finished trials in all: COMPLETE, plus PRUNED for a
  stage that prunes (hpo.py), since a pruned trial is a search step that ran and was
  judged. A rerun continues the study until it has that many; a study that already has
  more answers with its first `trials` finished trials, i.e. exactly what a run to that
  count gave.
- **Killed runs**: the stage owns its study, so a trial still RUNNING when it starts was
  left by a killed run: it is marked FAIL (not counted) and, if it was one of the enqueued
  starting points, enqueued again. Never a live worker's, though (it would run twice): each
  trial records its process (host, pid, start time), and a RUNNING trial whose process is
  alive on this machine, or whose heartbeat elsewhere is fresh, or which another machine
  runs without heartbeats, makes the run refuse (StudyInUse, naming --join) before it
  fails anything. Workers joining from other machines (`join=True`) leave RUNNING trials
  alone unless they know them dead. A study on a database server, or shared on SQLite
  (several workers, or `--join`), records optuna heartbeats: a trial whose worker died (a
  machine lost, SIGKILL) is failed by the next worker that looks, once its heartbeat is
  `HEARTBEAT_GRACE_S` old, or at once by one on the same machine (its process is gone),
  and run again with its parameters (optuna's RetryHeartbeatStaleTrialCallback); workers
  waiting for it go on.
- **Errors**: a URL whose driver is missing, or a storage that fails (a damaged SQLite
  file, a lost server), is one line naming the storage and the database's own message.
- **Seeds**: `TrialSeededSampler` reseeds TPE before every trial from (seed, worker, number
  of finished trials), so a study tuned in two runs samples exactly what one run would
  (tested), and the trial replacing a killed one draws what the killed one drew. A
  joining process (`join=True`) numbers its workers from a random base instead of 0, so
  its draws never repeat the owner's; a study shared by machines depends on their timing
  anyway, so it is not reproducible draw for draw.
- **Workers**: `n_workers > 1` runs that many processes on the study through its storage
  (joblib's loky: fresh interpreters, never a fork of a stage that has run OpenCV threads;
  the probability maps reach them as memory maps, not copies).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shlex
import socket
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from joblib import Parallel, delayed, effective_n_jobs
from optuna.distributions import BaseDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from core.config import ConfigError
from core.invocation import finished, stage_hint
from core.metrics import OBJECTIVES
from core.paths import Layout
from core.runtime import kill_point
from core.settings import search_section
from core.ticker import Ticker
from data.atomic import atomic_write

log = logging.getLogger("studies")

# Seconds a SQLite writer waits for another one's lock before "database is locked".
SQLITE_TIMEOUT_S = 60
# A shared study's trials record a heartbeat this often; one silent this long is dead.
HEARTBEAT_S = 10
HEARTBEAT_GRACE_S = 60
# Seconds to let another process finish creating optuna's tables in an empty database.
SCHEMA_RACE_WAIT_S = 2.0

Objective = Callable[[optuna.Trial], float]

# The trial states `trials` counts (see the module's docstring).
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


class StudyError(RuntimeError):
    """A study this run cannot work on; the stages print it as one line and exit 1."""


class StudyIncomplete(StudyError):
    """The study cannot reach its trial count: its trials were failed while running."""


class StudyInUse(StudyError):
    """A run without --join found a trial of its study that a live process may be running."""


class StorageFailed(StudyError):
    """The storage failed while the study ran (a damaged SQLite file, a lost server)."""


# ---------------------------------------------------------------- settings shared by the stages


def flag_count(name: str, flag: int | None, configured: int) -> int:
    """`--<name>` if given, else the configured count (its section's class checked it);
    a flag is refused by its name unless a whole number of at least 1 (a flag of 0 used to
    fall back to the config, and a negative count to end in a traceback)."""
    if flag is None:
        return configured
    if isinstance(flag, bool) or not isinstance(flag, int) or flag < 1:
        raise ConfigError(f"--{name} must be a whole number of at least 1, got {flag!r}")
    return flag


def search_settings(
    cfg: dict[str, Any], section: str, trials: int | None = None, objective: str | None = None
) -> tuple[int, str]:
    """(trials, objective) of optuna stage `section` (ensemble, tune): the flags, else the
    config's section; the one place every optuna stage and the pipeline's preflight read
    them."""
    settings = search_section(section).from_config(cfg)
    if objective is not None and objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {OBJECTIVES}, got {objective!r}")
    return flag_count("trials", trials, settings.trials), objective or settings.objective


@dataclass(frozen=True)
class StudyPlace:
    """Where a stage keeps its study, what names it, and who works on it.

    `identity` holds what the caller knows of its inputs beyond the arrays the search
    function sees (model names, split id, the stores' meta.json digests).
    """

    storage: str
    identity: Mapping[str, Any] = field(default_factory=dict)
    n_workers: int = 1
    join: bool = False


def place_from_args(
    args: argparse.Namespace, layout: Layout, identity: Mapping[str, Any]
) -> StudyPlace:
    """The StudyPlace of a stage's command line (--storage, --parallel, --join)."""
    if args.n_workers < 1:
        raise ConfigError(f"--parallel must be at least 1, got {args.n_workers}")
    storage = storage_url(args.storage) if args.storage else default_storage(layout)
    if (args.n_workers > 1 or args.join) and in_memory(storage):
        flag = "--join" if args.join else f"--parallel {args.n_workers}"
        raise ConfigError(
            f"--storage {storage} keeps the study in this process's memory, which {flag} "
            "cannot share: give a file (sqlite:///PATH) or a database server"
        )
    return StudyPlace(storage, identity, args.n_workers, args.join)


def in_memory(url: str) -> bool:
    """An SQLite URL without a file (`sqlite://`, `sqlite:///:memory:`): one process's."""
    if url.startswith("journal:"):
        return False
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def threads_per_worker(n_jobs: int, n_workers: int) -> int:
    """Scoring threads for each of `n_workers` processes, so they share the cores."""
    return max(1, effective_n_jobs(n_jobs) // max(1, n_workers))


def fit_label(fold: int | None) -> str:
    """What a study's identity calls the images a fit searched on: "fold k" for those
    outside fold k, "all" for every fold's (the parameters used on the test set)."""
    return "all" if fold is None else f"fold {fold}"


@dataclass(frozen=True)
class Search:
    """A stage's optuna search, the same for every fit it makes (each fold's and the
    all-folds one): the trial budget, the score it maximises, the seed, and the threads
    that score a trial (shared by the study's worker processes)."""

    trials: int
    objective: str = "competition"
    seed: int = 0
    n_jobs: int = 1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    def threads(self, place: StudyPlace | None) -> int:
        """Scoring threads of each of the study's worker processes."""
        return threads_per_worker(self.n_jobs, place.n_workers if place else 1)

    def run(
        self,
        stage: str,
        objective: Objective,
        place: StudyPlace | None,
        inputs: Sequence[np.ndarray],
        settings: Mapping[str, Any],
        start: Sequence[Mapping[str, Any]],
    ) -> tuple[FrozenTrial, optuna.Study]:
        """The study of `inputs` and `settings` (this search's objective added) run until it
        has the budget's complete trials (`run_study`), and the best of those trials."""
        study = run_study(
            stage,
            objective,
            self.trials,
            self.seed,
            place,
            inputs=inputs,
            settings={"objective": self.objective, **settings},
            start=start,
        )
        return best_trial(study, self.trials), study


# ---------------------------------------------------------------- storage and names


def default_storage(layout: Layout) -> str:
    """One SQLite file per experiment, beside its artefacts."""
    return f"sqlite:///{layout.optuna_db.resolve()}"


class WalConnection(sqlite3.Connection):
    """A SQLite connection in WAL mode with synchronous=NORMAL.

    optuna commits every parameter, attribute and state on its own; in SQLite's default
    mode each commit waits for several fsyncs (130-190 ms per tune trial on this
    project's machine against 20 ms, BENCHMARKS.md optuna_storage). In WAL mode with
    synchronous=NORMAL a commit is a write to the log, synced at checkpoints: a killed
    process loses nothing it committed, a power cut at most the last commits, and the
    file is never corrupted. Readers no longer block the writer either, which helps
    several workers. WAL needs a local disk: on a network drive use `journal:PATH` or a
    database server.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA journal_mode=WAL")
        self.execute("PRAGMA synchronous=NORMAL")


@contextlib.contextmanager
def quiet_heartbeats() -> Iterator[None]:
    """optuna warns that heartbeats are experimental and meant for `study.optimize`; this
    module runs them as study.optimize does (see the module's docstring), so to a user
    the warnings would only be noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
        yield


# For a URL that names no driver, when SQLAlchemy's default for its database is not
# installed: the driver to use instead.
FALLBACK_DRIVERS = {"postgresql": "psycopg2", "mysql": "pymysql"}
# The pip package of a driver whose name is not its package's.
DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "'psycopg[binary]'",
    "mysqldb": "mysqlclient",
    "mysqlconnector": "mysql-connector-python",
}


def storage_url(url: str) -> str:
    """`url` with a database driver that is installed here; ConfigError naming the package
    to install when there is none.

    SQLAlchemy 2 maps a plain `postgresql://` to psycopg 3, while the project installs
    psycopg2 (requirements-dev.txt), so the URLs as users write them failed with optuna's
    "Failed to import DB access module". A URL that names no driver gets the installed
    one (`postgres://`, as many hosts print it, is PostgreSQL's); one that names its
    driver is used as written.
    """
    if url.startswith("journal:"):
        return url
    import sqlalchemy

    try:
        written = sqlalchemy.engine.make_url(url)
        parsed = written
        if written.drivername == "postgres":
            parsed = written.set(drivername="postgresql")
        dialect = parsed.get_dialect()
    except (ValueError, sqlalchemy.exc.ArgumentError) as exc:
        raise ConfigError(storage_problem(url, exc)) from exc
    candidates = [parsed]
    fallback = FALLBACK_DRIVERS.get(parsed.drivername)
    if fallback:
        candidates.append(parsed.set(drivername=f"{parsed.drivername}+{fallback}"))
    for candidate in candidates:
        try:
            candidate.get_dialect().import_dbapi()
        except ImportError:
            continue
        return url if candidate == written else candidate.render_as_string(hide_password=False)
    driver = fallback or dialect.driver
    raise ConfigError(
        f"optuna storage {redact(url)}: no {parsed.get_backend_name()} driver is installed "
        f"(SQLAlchemy's for {parsed.drivername}:// is {dialect.driver}): "
        f"pip install {DRIVER_PACKAGES.get(driver, driver)}"
    )


def storage_problem(url: str, exc: BaseException) -> str:
    """`optuna storage URL: <the database's own message>` in one line (optuna's and
    SQLAlchemy's wrappers add a generic sentence, the SQL and a link); for a damaged
    SQLite file, the command that moves it aside."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(getattr(seen, "orig", None), BaseException):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        lines = str(exc).strip().splitlines()
        return f"optuna storage {redact(url)}: {lines[0] if lines else type(exc).__name__}"
    orig = seen.orig
    why = " ".join(str(orig).split()) or type(orig).__name__
    # sqlite3 raises DatabaseError itself, not a subclass, for a damaged file
    if type(orig) is sqlite3.DatabaseError:
        import sqlalchemy

        db = shlex.quote(str(sqlalchemy.engine.make_url(url).database))
        why += f" (the file is damaged; to start its studies afresh: mv {db} {db}.damaged)"
    return f"optuna storage {redact(url)}: {why}"


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A storage's failure inside the block as one line: StorageFailed (exit 1)."""
    import sqlalchemy

    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise StorageFailed(storage_problem(url, exc)) from exc


def open_storage(url: str, shared: bool = False) -> optuna.storages.BaseStorage:
    """An optuna storage from a URL; `journal:PATH` gives a JournalStorage file.

    SQLite gets a 60 s lock timeout: several worker processes write to one file, and the
    default 5 s ends in "database is locked" under load. Heartbeats (a dead worker's
    trial is failed and retried; a run without --join tells a live worker elsewhere from
    a dead one) are recorded on a database server, where other machines may join at any
    time, and on SQLite when `shared` (other processes work on the study): a lone run on
    a local file does without the extra writes, and its trials are checked through the
    process table. A JournalStorage has none.
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        _make_parent(url, path)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    import sqlalchemy

    url = storage_url(url)
    parsed = sqlalchemy.engine.make_url(url)  # storage_url parsed it
    engine_kwargs: dict[str, Any] = {}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        if not in_memory(url):
            _make_parent(url, Path(str(parsed.database)))
        connect = {"timeout": SQLITE_TIMEOUT_S, "factory": WalConnection}
        engine_kwargs = {"connect_args": connect}
    try:
        with quiet_heartbeats():
            heartbeat: dict[str, Any] = {}
            if shared or not is_sqlite:
                heartbeat = {
                    "heartbeat_interval": HEARTBEAT_S,
                    "grace_period": HEARTBEAT_GRACE_S,
                    "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(),
                }
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Another process was creating optuna's tables in the same empty database
                # at the same moment (two machines started together): let it finish.
                time.sleep(SCHEMA_RACE_WAIT_S)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise ConfigError(storage_problem(url, exc)) from exc


def _make_parent(url: str, path: Path) -> None:
    """The folder of a storage file, or one line naming it (not a traceback for ENOENT)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = exc.strerror or exc
        where = f"optuna storage {redact(url)}"
        raise ConfigError(f"{where}: cannot make {path.parent}: {why}") from exc


def redact(url: str) -> str:
    """The URL without its password, for artefacts and logs."""
    if url.startswith("journal:"):
        return url
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL has no password we could find either
        return url


def digest(*parts: Any) -> str:
    """12 hex of a sha256 over arrays (dtype, shape, bytes), bytes and JSON-able values."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.reshape(-1).view(np.uint8).data)
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def study_name(stage: str, identity: Mapping[str, Any]) -> str:
    """`<stage>-<hash of the identity>`: the same inputs find the same study."""
    return f"{stage}-{digest(dict(identity))}"


# ---------------------------------------------------------------- sampling


def trial_seed(seed: int, worker: int, n_complete: int) -> int:
    """A 32-bit seed that depends on every part, so streams never overlap."""
    return int(np.random.SeedSequence([seed, worker, n_complete]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE whose randomness depends only on (seed, worker, finished trials so far).

    `TPESampler(seed=s)` draws from one RNG stream for the life of the object, so a run
    that resumes a study (a new object) would replay the stream from its start and sample
    other points than the uninterrupted run. A fresh TPESampler per trial, seeded from the
    number of finished (counted) trials, depends only on the study's history, which the storage
    keeps. TPE itself reads only that history, so nothing else is lost between runs.

    `constant_liar` (TPE's way of keeping concurrent workers apart) only for several
    workers: it changes nothing without other RUNNING trials, but makes TPE re-read the
    storage for every parameter instead of once per trial (BENCHMARKS.md).
    """

    def __init__(self, seed: int, worker: int = 0, constant_liar: bool = False) -> None:
        self._seed = int(seed)
        self._worker = int(worker)
        self._constant_liar = constant_liar
        self._by_trial: dict[int, optuna.samplers.TPESampler] = {}
        self._next_complete: int | None = None

    def expect_complete(self, n_complete: int) -> None:
        """The number of finished trials for the next trial's seed, as its caller just
        counted them (saves a read of the storage per trial)."""
        self._next_complete = n_complete

    def _for(self, study: optuna.Study, trial: FrozenTrial) -> optuna.samplers.TPESampler:
        if trial.number not in self._by_trial:
            n_complete = self._next_complete
            if n_complete is None:
                n_complete = len(study.get_trials(deepcopy=False, states=COUNTED))
            self._next_complete = None
            seed = trial_seed(self._seed, self._worker, n_complete)
            self._by_trial[trial.number] = optuna.samplers.TPESampler(
                seed=seed, constant_liar=self._constant_liar
            )
        return self._by_trial[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._for(study, trial).sample_independent(
            study, trial, param_name, param_distribution
        )

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        # a trial failed on behalf of a killed run was never sampled here
        sampler = self._by_trial.pop(trial.number, None)
        if sampler is not None:
            sampler.after_trial(study, trial, state, values)


# ---------------------------------------------------------------- running


def counted_trials(study: optuna.Study, n: int | None = None) -> list[FrozenTrial]:
    """The first `n` finished (COUNTED) trials (all when None), in trial-number order."""
    done = sorted(study.get_trials(deepcopy=False, states=COUNTED), key=lambda t: t.number)
    return done if n is None else done[:n]


def complete_trials(study: optuna.Study, n: int | None = None) -> list[FrozenTrial]:
    """The COMPLETE trials among the first `n` finished ones: those with a final value."""
    return [t for t in counted_trials(study, n) if t.state == TrialState.COMPLETE]


def best_trial(study: optuna.Study, n: int | None = None) -> FrozenTrial:
    """The best complete trial among the first `n` finished ones; ties go to the earlier trial."""
    done = complete_trials(study, n)
    if not done:
        raise RuntimeError(f"study {study.study_name} has no complete trial")
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return max(done, key=lambda t: (sign * t.value, -t.number))


def _fail(study: optuna.Study, trial: FrozenTrial) -> None:
    """FAIL a trial; an enqueued starting point (e.g. the equal-weight blend) is enqueued
    again, so a kill or Ctrl-C in it does not drop it from the search."""
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    fixed = trial.system_attrs.get("fixed_params")
    if fixed:
        study.enqueue_trial(fixed)


# The system attribute of a trial that names the process running it (`this_process`).
PROCESS_ATTR = "process"


def process_start(pid: int) -> str | None:
    """What tells process `pid` from a later one given the same pid: the boot and its start
    time in clock ticks (/proc); None when no live process has that pid (a zombie is
    dead). Linux only: elsewhere every trial counts as a killed run's, as before."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return None if fields[0] == "Z" else f"{boot}/{fields[19]}"


def this_process(storage: optuna.storages.BaseStorage) -> dict[str, Any]:
    """The record a trial keeps of the process running it, for `live_holder`."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": process_start(os.getpid()),
        "heartbeat": is_heartbeat_enabled(storage),
    }


def live_holder(study: optuna.Study, trial: FrozenTrial) -> str | None:
    """Who may still be running a RUNNING `trial`; None when it was left by a dead process.

    On this machine the process table answers. Elsewhere the trial's heartbeat does:
    `fail_stale_trials` has failed those silent for HEARTBEAT_GRACE_S, so one still
    RUNNING with heartbeats is alive. A trial from another machine without heartbeats
    cannot be judged here, so it is not taken for dead. A trial without a record (asked by
    hand, or by an older version) is taken for a killed run's, as it always was.
    """
    record = trial.system_attrs.get(PROCESS_ATTR)
    if not isinstance(record, dict):
        return None
    pid, host = record.get("pid"), record.get("host")
    if host == socket.gethostname():
        # our own pid: an earlier call in this process left it (its trials run one at a time)
        if not isinstance(pid, int) or pid == os.getpid() or record.get("start") is None:
            return None
        if process_start(pid) != record.get("start"):
            return None
        return f"pid {pid} on this machine"
    if record.get("heartbeat") and is_heartbeat_enabled(study._storage):
        return f"pid {pid} on {host} (its heartbeat is under {HEARTBEAT_GRACE_S} s old)"
    return (
        f"pid {pid} on {host}, which records no heartbeat this machine could judge (if that "
        f"process was killed, run this command on {host} without --join: it fails them)"
    )


def fail_abandoned(study: optuna.Study, join: bool = False) -> list[int]:
    """Fail the RUNNING trials left by dead processes; returns their numbers.

    A stale heartbeat shows a dead worker anywhere (optuna fails the trial and queues it
    again), the process table one of this machine. A run that owns the study (no --join)
    takes every other RUNNING trial for a killed run's too (one without a process record:
    asked by hand, or by an older version) and fails it, queueing a starting point again
    (`_fail`); but while one may be a live worker's it fails nothing and raises
    StudyInUse: that trial would run twice and its worker's result be thrown away. A
    joiner fails only the trials it knows are dead, and queues each again with its
    parameters, as a stale heartbeat's is: without it, a joiner waited forever for the
    trial of a local worker killed in a study without heartbeats.
    """
    with quiet_heartbeats():
        fail_stale_trials(study)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    holders = {t.number: live_holder(study, t) for t in running}
    if join:
        here = socket.gethostname()
        failed = []
        for trial in running:
            record = trial.system_attrs.get(PROCESS_ATTR)
            ran_here = isinstance(record, dict) and record.get("host") == here
            if ran_here and holders[trial.number] is None and _fail_once(study, trial):
                with quiet_heartbeats():
                    RetryHeartbeatStaleTrialCallback()(study, trial)
                failed.append(trial.number)
    else:
        live = {n: who for n, who in holders.items() if who is not None}
        if live:
            held = "; ".join(f"trial {n} by {who}" for n, who in live.items())
            raise StudyInUse(
                f"study {study.study_name} is being worked on: {held}. To work beside it: "
                f"{stage_hint('--join')}; a run without --join takes the study over, so only "
                "once that process has ended"
            )
        for trial in running:
            _fail(study, trial)
        failed = [t.number for t in running]
    if failed:
        log.warning(
            "study %s: trials %s were left RUNNING by a killed run: failed",
            study.study_name,
            failed,
        )
    return failed


def _fail_once(study: optuna.Study, trial: FrozenTrial) -> bool:
    """FAIL `trial` unless another process finished it first: whether this call did, so
    that of two joiners only one queues it again."""
    try:
        return study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _claimed(study: optuna.Study, below: int | None = None) -> tuple[int, int]:
    """(COUNTED + RUNNING, COUNTED) trials, numbered below `below` if given: the trials
    counted or about to be. Lower numbers have priority, so concurrent workers agree on
    who is surplus."""
    states = (*COUNTED, TrialState.RUNNING)
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=states)
        if below is None or t.number < below
    ]
    return len(trials), sum(t.state in COUNTED for t in trials)


def optimize(study: optuna.Study, objective: Objective, trials: int, worker: str = "0") -> int:
    """Ask/tell until the study has `trials` finished (or claimed) trials; returns how many
    this call completed.

    optuna's `n_trials` counts this call's trials and MaxTrialsCallback stops only after a
    trial, so K workers could overshoot by K-1; here a trial asked when `trials` lower
    numbered ones are already complete or running is failed at once, unscored ("surplus").
    """
    ran = 0
    process = this_process(study._storage)
    while True:
        claimed, complete = _claimed(study)
        if claimed >= trials:
            break
        if isinstance(study.sampler, TrialSeededSampler):
            study.sampler.expect_complete(complete)
        with quiet_heartbeats():
            fail_stale_trials(study)
            trial = study.ask()
        try:
            trial.set_user_attr("worker", worker)
            study._storage.set_trial_system_attr(trial._trial_id, PROCESS_ATTR, process)
            if _claimed(study, below=trial.number)[0] >= trials:
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                break
            # optuna's own heartbeat thread, as study.optimize runs it (a no-op without
            # heartbeats); study.optimize itself cannot be used: see the module docstring
            with get_heartbeat_thread(trial._trial_id, study._storage):
                value = objective(trial)
            kill_point("study-trial")
            study.tell(trial, value, skip_if_finished=True)
        except optuna.TrialPruned:
            # The pruner stopped it: a finished, counted trial (its last reported value).
            study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            ran += 1
            continue
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another process finished it meanwhile: SQLite has no row locks, so two
            # workers can pop the same enqueued trial, or a run started without --join
            # failed it. Its result is theirs; this worker moves on. `skip_if_finished`
            # reads the state before its write, so the final tell can land here too.
            log.warning("trial %d was finished by another process: left to it", trial.number)
            continue
        except BaseException:
            frozen = study.get_trials(deepcopy=False)
            _fail(study, next(t for t in frozen if t.number == trial.number))
            raise
        ran += 1
    return ran


def _wait_for_others(study: optuna.Study, trials: int, poll_s: float = 2.0) -> None:
    """Wait for trials RUNNING elsewhere (joined machines) that the count is waiting for;
    a dead one (a stale heartbeat, a process of this machine that is gone) is failed and
    queued again, and the wait ends."""
    told = False
    while len(counted_trials(study)) < trials:
        fail_abandoned(study, join=True)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if not told:
            log.info(
                "study %s: waiting for trials %s running elsewhere (a dead worker's trial "
                "is failed and run again once its heartbeat is %d s old, or at once if it ran "
                "on this machine; a journal file has no heartbeats: there, run this command "
                "on the machine that ran them, which fails them if their process is gone)",
                study.study_name,
                [t.number for t in running],
                HEARTBEAT_GRACE_S,
            )
            told = True
        time.sleep(poll_s)


def _load(
    name: str | None,
    storage: str | None,
    seed: int,
    worker: int,
    parallel: bool,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    return optuna.create_study(
        study_name=name,
        storage=open_storage(storage, shared=parallel) if storage else None,
        direction="maximize",
        sampler=TrialSeededSampler(seed, worker, constant_liar=parallel),
        pruner=pruner,
        load_if_exists=True,
    )


def _worker(
    storage: str,
    name: str,
    objective: Objective,
    trials: int,
    seed: int,
    worker: int,
    pruner: optuna.pruners.BasePruner | None,
) -> int:
    """One worker process: the study through its storage, its own seed stream. A pruner
    is not kept in the storage, so each worker gets the stage's own."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # converted here: the database's message does not cross the process boundary
    with storage_errors(storage):
        study = _load(name, storage, seed, worker, parallel=True, pruner=pruner)
        return optimize(study, objective, trials, f"{socket.gethostname()}/{worker}")


def run_study(
    stage: str,
    objective: Objective,
    trials: int,
    seed: int,
    place: StudyPlace | None = None,
    inputs: Sequence[np.ndarray] = (),
    settings: Mapping[str, Any] | None = None,
    start: Sequence[Mapping[str, Any]] = (),
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Maximise `objective` until the study has `trials` finished trials; returns the study.

    `place` None: an in-memory study (library use, tests). Otherwise the study named by
    the stage, `place.identity`, `settings`, the seed and the content of `inputs`, in
    `place.storage`, continued if it exists. `start`: parameters enqueued as the first
    trials when the study is created. `pruner`: judges the values an objective reports
    (`trial.report`; None: optuna's median pruner); a pruned trial counts. With
    `place.n_workers > 1`, `objective` must pickle (a module-level function or a
    functools.partial of one).
    """
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    name = None
    if place is not None:
        identity = {
            **place.identity,
            "settings": dict(settings or {}),
            "seed": seed,
            "inputs": [digest(a) for a in inputs],
        }
        name = study_name(stage, identity)
    parallel = place is not None and (place.n_workers > 1 or place.join)
    # A joining process draws its own seed streams: with the owner's (0, 1, ...) its
    # trials would repeat the owner's draws trial for trial.
    base = secrets.randbits(31) if place is not None and place.join else 0
    with storage_errors(place.storage) if place else contextlib.nullcontext():
        study = _load(name, place.storage if place else None, seed, base, parallel, pruner)
        fail_abandoned(study, join=place is not None and place.join)
        if not study.get_trials(deepcopy=False):
            for params in start:
                study.enqueue_trial(dict(params))
        first = len(counted_trials(study))
        ticker = Ticker(f"{stage} study", trials, "trials", lambda: len(counted_trials(study)), log)
        try:
            with ticker:
                _run_to(study, objective, trials, seed, base, place, pruner)
        except KeyboardInterrupt:
            if place is not None:  # what an interrupt's line says is kept (a rerun goes on)
                kept = len(counted_trials(study))
                finished(f"study {study.study_name}: {kept} of {trials} trials finished")
            raise
        done = len(counted_trials(study))
    where = f" in {redact(place.storage)}" if place else ""
    log.info("study %s%s: %d finished trials (%d new)", study.study_name, where, done, done - first)
    return study


def _run_to(
    study: optuna.Study,
    objective: Objective,
    trials: int,
    seed: int,
    base: int,
    place: StudyPlace | None,
    pruner: optuna.pruners.BasePruner | None,
) -> None:
    """Workers (this process or `place.n_workers` loky ones) until `trials` are counted,
    again while failed trials were queued for a retry."""
    n_workers = place.n_workers if place else 1
    name = study.study_name
    while True:
        before = len(counted_trials(study))
        if n_workers == 1:
            optimize(study, objective, trials, f"{socket.gethostname()}/{base}")
        else:
            assert place is not None
            Parallel(n_jobs=n_workers, backend="loky")(
                delayed(_worker)(place.storage, name, objective, trials, seed, base + w, pruner)
                for w in range(n_workers)
            )
        _wait_for_others(study, trials)
        done = len(counted_trials(study))
        if done >= trials:
            break
        retried = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if done == before and not retried:
            raise StudyIncomplete(
                f"study {study.study_name} has {done} finished trials of {trials} and made "
                "no progress: its trials were failed while running (by a run started "
                "without --join?)"
            )


def study_record(
    study: optuna.Study, place: StudyPlace | None, trials_csv: Path | None
) -> dict[str, Any]:
    """What an artefact records of its study: name, storage (no password), the CSV."""
    return {
        "name": study.study_name,
        "storage": redact(place.storage) if place else None,
        "trials_csv": str(trials_csv) if trials_csv else None,
        "n_trials_in_study": len(study.get_trials(deepcopy=False)),
    }


# ---------------------------------------------------------------- export


def export_trials(study: optuna.Study, path: str | Path) -> Path:
    """Every trial of the study as CSV (optuna's `trials_dataframe`), written atomically."""
    frame = study.trials_dataframe()
    with atomic_write(path, "w") as fh:
        frame.to_csv(fh, index=False, lineterminator="\n")
    return Path(path)
