"""studies.py: persistent, resumable, parallel optuna studies on a cheap objective."""

import csv
import threading
import time

import optuna
import pytest

from chain import studies
from chain.studies import StudyPlace, run_study
from core.config import ConfigError

START = [{"x": 0.0, "branch": "flat"}]


def objective(trial: optuna.Trial) -> float:
    """A conditional space like tune.py's: a switch, and a parameter only one branch has."""
    x = trial.suggest_float("x", -5.0, 5.0)
    if trial.suggest_categorical("branch", ["flat", "log"]) == "log":
        y = trial.suggest_float("y", 0.1, 10.0, log=True)
    else:
        y = 0.0
    return -((x - 1) ** 2) - (y - 2) ** 2


def slow_objective(trial: optuna.Trial) -> float:
    """Long enough that two workers overlap."""
    time.sleep(0.2)
    return objective(trial)


def sqlite(tmp_path, name="optuna.db") -> StudyPlace:
    return StudyPlace(f"sqlite:///{tmp_path / name}", {"inputs": "test"})


def history(study: optuna.Study) -> list[tuple[dict, float]]:
    return [(t.params, t.value) for t in studies.complete_trials(study)]


def test_resuming_to_a_larger_count_equals_one_run_to_it(tmp_path):
    place = sqlite(tmp_path)
    first = run_study("demo", objective, 12, seed=3, place=place, start=START)
    assert len(studies.complete_trials(first)) == 12
    resumed = run_study("demo", objective, 20, seed=3, place=place, start=START)
    assert resumed.study_name == first.study_name
    assert optuna.get_all_study_names(place.storage) == [first.study_name]
    assert len(studies.complete_trials(resumed)) == len(resumed.trials) == 20
    once = run_study("demo", objective, 20, seed=3, place=sqlite(tmp_path, "b.db"), start=START)
    assert history(resumed) == history(once)
    assert history(run_study("demo", objective, 20, seed=3, start=START)) == history(once)
    # a smaller count answers with the first trials, as a run to that count did
    again = run_study("demo", objective, 12, seed=3, place=place, start=START)
    assert studies.best_trial(again, 12).number == studies.best_trial(first, 12).number


def test_another_identity_or_seed_is_another_study(tmp_path):
    place = sqlite(tmp_path)
    names = {
        run_study("demo", objective, 2, 0, place).study_name,
        run_study("demo", objective, 2, 0, place, settings={"objective": "other"}).study_name,
        run_study("demo", objective, 2, 1, place).study_name,
        run_study("demo", objective, 2, 0, StudyPlace(place.storage, {"x": 1})).study_name,
    }
    assert len(names) == 4
    assert sorted(optuna.get_all_study_names(place.storage)) == sorted(names)


def test_a_trial_left_running_is_failed_and_its_start_point_redone(tmp_path):
    place = sqlite(tmp_path)
    name = run_study("demo", objective, 3, 0, place, start=START).study_name
    study = optuna.load_study(study_name=name, storage=place.storage)
    abandoned = study.ask()  # a run killed mid-trial leaves it RUNNING
    study.enqueue_trial({"x": 4.0, "branch": "flat"})
    killed_start = study.ask()  # an enqueued starting point, killed too
    resumed = run_study("demo", objective, 6, 0, place, start=START)
    states = {t.number: t.state for t in resumed.trials}
    assert states[abandoned.number] == states[killed_start.number] == optuna.trial.TrialState.FAIL
    done = studies.complete_trials(resumed)
    assert len(done) == 6 and abandoned.number not in {t.number for t in done}
    assert {"x": 4.0, "branch": "flat"} in [t.params for t in done]  # enqueued again, run


def interrupted(trial: optuna.Trial) -> float:
    raise KeyboardInterrupt


def test_ctrl_c_in_a_starting_point_keeps_it_for_the_rerun(tmp_path):
    place = sqlite(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_study("demo", interrupted, 4, 0, place, start=START)
    study = run_study("demo", objective, 4, 0, place, start=START)
    assert [t.state.name for t in study.trials] == ["FAIL", *["COMPLETE"] * 4]
    assert studies.complete_trials(study)[0].params == START[0]


def test_a_joining_worker_leaves_running_trials_alone(tmp_path):
    place = sqlite(tmp_path)
    name = run_study("demo", objective, 2, 0, place).study_name
    study = optuna.load_study(study_name=name, storage=place.storage)
    live = study.ask()  # another machine's trial, in flight
    joined = StudyPlace(place.storage, place.identity, join=True)
    # The live trial counts as claimed: the joiner runs one trial (3 complete + 1 running)
    # and waits for it, which the "other machine" finishes a moment later.
    finish = threading.Timer(1.0, study.tell, (live, 0.0))
    finish.start()
    run_study("demo", objective, 4, 0, joined)
    finish.join()
    assert study.trials[live.number].state == optuna.trial.TrialState.COMPLETE
    assert len(studies.complete_trials(study)) == len(study.trials) == 4


def test_two_worker_processes_share_one_sqlite_study(tmp_path):
    place = StudyPlace(f"sqlite:///{tmp_path / 'optuna.db'}", {"inputs": "test"}, n_workers=2)
    study = run_study("demo", slow_objective, 12, 0, place, start=START)
    done = studies.complete_trials(study)
    assert len(done) == 12
    assert all(
        t.state != optuna.trial.TrialState.FAIL or t.user_attrs.get("surplus") for t in study.trials
    )
    workers = {t.user_attrs["worker"].rsplit("/", 1)[1] for t in done}
    assert workers == {"0", "1"}


def test_a_trial_another_process_finished_is_left_to_it(tmp_path):
    """SQLite has no row locks: two workers can pop the same enqueued trial."""
    place = sqlite(tmp_path)

    def raced(trial: optuna.Trial) -> float:
        if trial.number == 0:  # the other worker finishes it first
            other = optuna.load_study(study_name=trial.study.study_name, storage=place.storage)
            other.tell(trial.number, 1.0)
        trial.set_user_attr("seen", True)  # raises UpdateFinishedTrialError for trial 0
        return objective(trial)

    study = run_study("demo", raced, 3, 0, place, start=START)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.trials[0].value == 1.0 and "seen" not in study.trials[0].user_attrs


def test_a_trial_finished_elsewhere_while_its_value_is_told_is_left_to_it(tmp_path, monkeypatch):
    """The same race at the very end: `tell(skip_if_finished=True)` reads the trial as
    running, another worker finishes it, then this worker's write finds it finished."""
    place = sqlite(tmp_path)
    write = optuna.storages.RDBStorage.set_trial_state_values
    raced: list[int] = []

    def other_worker_first(self, trial_id, state, values=None):
        if state == optuna.trial.TrialState.COMPLETE and not raced:
            raced.append(trial_id)
            write(self, trial_id, state, [1.0])
            raise optuna.exceptions.UpdateFinishedTrialError("finished by the other worker")
        return write(self, trial_id, state, values)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", other_worker_first)
    study = run_study("demo", objective, 3, 0, place, start=START)
    assert raced and [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.trials[0].value == 1.0


def test_journal_storage_and_trials_csv(tmp_path):
    place = StudyPlace(f"journal:{tmp_path / 'journal' / 'optuna.log'}")
    run_study("demo", objective, 3, 0, place, start=START)
    study = run_study("demo", objective, 5, 0, place, start=START)
    assert len(studies.complete_trials(study)) == 5
    path = studies.export_trials(study, tmp_path / "trials.csv")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["number"]) for r in rows] == [t.number for t in study.trials]
    assert {"value", "params_x", "params_branch", "user_attrs_worker", "state"} <= set(rows[0])
    assert rows[0]["state"] == "COMPLETE" and float(rows[0]["params_x"]) == 0.0


def test_a_bad_storage_url_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="optuna storage"):
        studies.open_storage("nosuchdb://user:secret@host/db")
    assert "secret" not in studies.redact("postgresql://user:secret@host/db")


def dead_worker_trial(place: StudyPlace, name: str) -> optuna.trial.FrozenTrial:
    """A trial another machine started, recorded one heartbeat for, and died in."""
    storage = studies.open_storage(place.storage, shared=True)
    study = optuna.load_study(study_name=name, storage=storage)
    with studies.quiet_heartbeats():
        trial = study.ask({"x": optuna.distributions.FloatDistribution(-5.0, 5.0)})
    storage.record_heartbeat(trial._trial_id)
    return study.trials[trial.number]


@pytest.mark.parametrize("trials", [3, 4])
def test_a_dead_workers_trial_is_failed_by_its_heartbeat_and_run_again(
    tmp_path, monkeypatch, trials
):
    """With 3 the joiner has nothing to claim and waits for the dead trial; with 4 it
    finds it stale before asking. Either way it is failed, and its parameters run again."""
    place = sqlite(tmp_path)
    name = run_study("demo", objective, 2, 0, place).study_name
    dead = dead_worker_trial(place, name)
    monkeypatch.setattr(studies, "HEARTBEAT_GRACE_S", 1)
    time.sleep(1.5)
    joined = StudyPlace(place.storage, place.identity, join=True)
    study = run_study("demo", objective, trials, 0, joined)
    assert study.trials[dead.number].state == optuna.trial.TrialState.FAIL
    done = studies.complete_trials(study)
    assert len(done) == trials
    again = [t for t in done if t.system_attrs.get("failed_trial") == dead.number]
    assert len(again) == 1 and again[0].params["x"] == dead.params["x"]


def test_a_lone_run_records_no_heartbeats(tmp_path):
    assert studies.open_storage(sqlite(tmp_path).storage).get_heartbeat_interval() is None
    shared = studies.open_storage(sqlite(tmp_path).storage, shared=True)
    assert shared.get_heartbeat_interval() == studies.HEARTBEAT_S
