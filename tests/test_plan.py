"""pipeline.py --plan: measured per model (cached), multiplied out per fold, stage and run,
with the disk of the finished run; --budget-hours refuses a plan that does not fit."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

import pipeline
from core import ticker
from tests.trainkit import write_config
from workflow import planning
from workflow.planning import Calibration, ModelPlan, Plan

GB = 10**9


def two_models(parallel: int = 2, free: int = 100 * GB) -> Plan:
    calibration = Calibration(step_s=0.5, predict_s=0.01, params=10**6)
    models = [ModelPlan(n, 5, 10, 80, 20, 8, calibration) for n in ("a", "b")]
    return Plan(models, parallel, parallel, 40, 4, {"best weights": GB}, free)


def test_the_plan_multiplies_the_measurements_out() -> None:
    plan = two_models()
    # an epoch: 10 steps of 0.5 s and 20 validation images of 10 ms; then the OOF maps
    assert plan.models[0].fold_s == pytest.approx(10 * (10 * 0.5 + 20 * 0.01) + 20 * 0.01)
    assert plan.train_s == pytest.approx(2 * 5 * 52.2 / 2)  # two folds at full speed
    assert plan.predict_s == pytest.approx(2 * 5 * 40 * 4 * 0.01)  # every fold, 4 views
    assert plan.total_s == pytest.approx(261 + 16)
    assert any(line.startswith("total: 4.6 min") for line in planning.report(plan))


def test_a_plan_over_budget_names_the_settings_that_would_fit() -> None:
    plan = two_models()
    assert planning.over_budget(plan, budget_h=1.0) == []
    (problem,) = planning.over_budget(plan, budget_h=180 / 3600)
    assert "over the budget of 3.0 min" in problem
    assert "--set train.epochs=6 (2.9 min)" in problem  # 26 s an epoch over 10 folds + 17 s
    assert "--set 'ensemble.models=[b]' (2.3 min without the slowest model, a)" in problem
    (disk,) = planning.over_budget(two_models(free=GB // 2), budget_h=None)
    assert "1.00 GB, over the 0.50 GB free" in disk and "train.keep_last" in disk


def test_plan_measures_once_trains_nothing_and_refuses_a_short_budget(
    tmp_path: Path, tiny_data: Path, capsys, monkeypatch, caplog
) -> None:
    config = str(write_config(tmp_path, tiny_data))
    # the measurement says what it measures, and how far it is at least every
    # MEASURE_PROGRESS_S (30 s; here shorter), however long a loop's PROGRESS_S is
    assert planning.MEASURE_PROGRESS_S <= 30
    monkeypatch.setattr(planning, "MEASURE_PROGRESS_S", 0.01)
    monkeypatch.setattr(ticker, "PROGRESS_S", 3600.0)
    caplog.set_level(logging.INFO, logger="plan")
    assert pipeline.main(["--config", config, "--plan"]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "plan"]
    cache = tmp_path / "out" / "plan_calibration.json"
    assert said[0] == (
        f"measuring tiny (1 of 1) on cpu: 9 training steps and a few images; kept in {cache}"
    )
    steps = [re.fullmatch(r"measuring tiny \(1 of 1\): (\d)/9 steps, .*", line) for line in said]
    assert any(steps), said  # a progress line while it measured
    out = capsys.readouterr().out
    assert "plan: 1 models x 2 folds" in out and "tiny | 2 |" in out
    assert "total: " in out and "disk when finished: best weights" in out
    exp = tmp_path / "out" / "tiny"
    assert not (exp / "tiny").exists()  # no fold trained
    assert (tmp_path / "out" / "plan_calibration.json").is_file()

    def measured_again(*args, **kwargs):
        raise AssertionError("the calibration is cached per model, size, batch and device")

    monkeypatch.setattr(planning, "calibrate", measured_again)
    assert pipeline.main(["--config", config, "--budget-hours", "1e-6"]) == 1
    assert "does not fit: what is left takes" in capsys.readouterr().err
    assert not (exp / "tiny").exists()  # refused before training

    # a budget between 1 and 2 epochs: the advice is the setting the same command then
    # accepts and fits (issue 40: it advised one epoch too many, which was refused)
    plans: list[Plan] = []
    real = planning.make_plan

    def make_plan(*args, **kwargs) -> Plan:
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(planning, "make_plan", make_plan)
    assert pipeline.main(["--config", config, "--plan"]) == 0
    budget_h = (plans[0].total_time(1) + plans[0].total_time(2)) / 2 / 3600
    command = ["--config", config, "--plan", "--budget-hours", repr(budget_h)]
    assert pipeline.main(command) == 1
    (advice,) = re.findall(r"--set (train\.epochs=\d+)", capsys.readouterr().err)
    assert advice == "train.epochs=1"
    assert pipeline.main([*command, "--set", advice]) == 0
    assert "does not fit" not in capsys.readouterr().err


def test_parallel_folds_gain_time_only_where_there_is_room(monkeypatch) -> None:
    monkeypatch.setattr(planning.os, "cpu_count", lambda: 16)
    assert planning.lanes(4, torch.device("cpu"), loader_workers=3) == 4.0  # 16 / (1 + 3)
    assert planning.lanes(8, torch.device("cpu"), loader_workers=3) == 4.0
    monkeypatch.setattr(planning.os, "cpu_count", lambda: 2)
    assert planning.lanes(2, torch.device("cpu"), loader_workers=2) == 1.0  # the demo's
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert planning.lanes(4, torch.device("cuda"), loader_workers=2) == 2.0
