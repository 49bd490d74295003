"""hpo.py: the training search's space, pruning, resume, trial folders and best file."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

import hpo
from core.config import ConfigError, load_config, model_config
from tests.trainkit import run_main, write_config

BKAI = Path(__file__).resolve().parents[1] / "configs" / "bkai.yaml"


def hpo_config(tmp_path: Path, data_dir: Path, epochs: int, **section: Any) -> Path:
    """The tiny experiment with an `hpo:` section."""
    path = write_config(tmp_path, data_dir, epochs=epochs)
    cfg = yaml.safe_load(path.read_text())
    cfg["hpo"] = section
    path.write_text(yaml.safe_dump(cfg))
    return path


def search(config: Path, *args: str) -> int:
    return hpo.main(["--config", str(config), "--model", "tiny", *args])


def the_study(tmp_path: Path) -> optuna.Study:
    storage = f"sqlite:///{tmp_path / 'out' / 'tiny' / 'optuna.db'}"
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1 and names[0].startswith("hpo-"), names
    return optuna.load_study(study_name=names[0], storage=storage)


SPACE = {
    "train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
    "train.optimizer.name": ["adam", "adamw"],
}


def test_search_resumes_to_n_trials_and_its_best_file_trains(
    tmp_path: Path, tiny_data: Path
) -> None:
    config = hpo_config(tmp_path, tiny_data, 2, space=SPACE, pruner={"name": "none"})
    assert search(config, "--trials", "2") == 0
    assert search(config, "--trials", "3") == 0
    study = the_study(tmp_path)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 3
    # every epoch was reported, and the value is the best of them
    for trial in study.get_trials():
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.value == max(trial.intermediate_values.values())

    exp = tmp_path / "out" / "tiny"
    trial_dirs = sorted((exp / "hpo").glob("*/trial*"))
    assert [d.name for d in trial_dirs] == ["trial0", "trial1", "trial2"]
    assert all(len((d / "log.jsonl").read_text().splitlines()) == 2 for d in trial_dirs)
    assert not (exp / "tiny").exists(), "a trial wrote into the experiment's model folder"
    assert (exp / "folds.json").is_file()  # the experiment's split, shared by the trials
    rows = list(csv.DictReader((exp / "hpo" / "trials_tiny.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3

    best_file = exp / "hpo" / "best_tiny.yaml"
    doc = yaml.safe_load(best_file.read_text())
    assert (best_file.parent / doc["base"]).resolve() == config.resolve()
    best = max(study.get_trials(), key=lambda t: t.value)
    cfg = model_config(load_config(best_file), "tiny")
    assert cfg["experiment"] == "best_tiny"
    assert cfg["train"]["lr"] == pytest.approx(best.params["train.lr"])
    assert cfg["train"]["optimizer"]["name"] == best.params["train.optimizer.name"]
    assert run_main(best_file, "--fold", "0", "--epochs", "1") == 0
    assert (tmp_path / "out" / "best_tiny" / "tiny" / "fold0" / "best.pt").is_file()


def test_a_bad_trial_is_pruned_before_its_last_epoch(tmp_path: Path, tiny_data: Path) -> None:
    # No tiny model reaches a competition Dice of 0.999 after one epoch.
    pruner = {"name": "threshold", "lower": 0.999}
    config = hpo_config(tmp_path, tiny_data, 3, space=SPACE, pruner=pruner)
    assert search(config, "--trials", "1") == 1  # pruned, so no best trial to write
    (trial,) = the_study(tmp_path).get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [1]
    assert trial.user_attrs["pruned_at_epoch"] == 1
    (log,) = (tmp_path / "out" / "tiny" / "hpo").glob("*/trial0/log.jsonl")
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1]
    assert not (tmp_path / "out" / "tiny" / "hpo" / "best_tiny.yaml").exists()


def test_pruners_by_name_median_by_default() -> None:
    assert isinstance(hpo.build_pruner(None, 3), optuna.pruners.MedianPruner)
    assert isinstance(hpo.build_pruner({"name": "hyperband"}, 3), optuna.pruners.HyperbandPruner)
    assert isinstance(hpo.build_pruner({"name": "none"}, 3), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match=r"hpo\.pruner\.name"):
        hpo.build_pruner({"name": "sometimes"}, 3)
    with pytest.raises(ConfigError, match="median"):
        hpo.build_pruner({"name": "median", "n_warmup": 1}, 3)


def test_space_ranges_and_choices() -> None:
    space = hpo.parse_space(
        {
            "a.f": {"low": "1e-4", "high": 1e-2, "log": True},
            "a.i": {"low": 1, "high": 4},
            "a.c": [1, 2],
        }
    )
    assert isinstance(space["a.f"], optuna.distributions.FloatDistribution) and space["a.f"].log
    assert isinstance(space["a.i"], optuna.distributions.IntDistribution)
    assert space["a.c"].choices == (1, 2)
    for bad in ({}, {"a": {"low": 1}}, {"a": {"low": 2.0, "high": 1.0}}, {"a": []}):
        with pytest.raises(ConfigError):
            hpo.parse_space(bad)


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ({"train.lrr": {"low": 1e-3, "high": 1e-2}}, "train.lrr"),
        ({"train.optimizer.name": ["adam", "adamx"]}, "adamx"),
        ({"data.augment.affinee": [0.0, 0.3]}, "affinee"),
    ],
)
def test_a_bad_space_exits_2_before_training(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], space: dict, named: str
) -> None:
    config = hpo_config(tmp_path, tiny_data, 2, space=space)
    assert search(config, "--trials", "1") == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny" / "hpo").exists()


def test_the_best_file_trains_the_tuned_model_alone() -> None:
    """It inherited every model of its base: `pipeline.py` on it retrained all six."""
    diff = hpo.experiment_diff({"train.lr": 0.01, "data.augment.affine": 0.3}, "unet")
    assert diff == {
        "ensemble": {"models": ["unet"]},
        "models": {"unet": {"train": {"lr": 0.01}}},
        "data": {"augment": {"affine": 0.3}},
    }


@pytest.mark.parametrize("model", ["unet", "pranet", "emcad"])
def test_the_shipped_config_has_a_search_space_its_models_accept(model: str) -> None:
    """The README's `hpo.py --config configs/bkai.yaml --model unet` said "hpo.space is
    empty": no shipped config had one."""
    cfg = model_config(load_config(BKAI), model)
    space = hpo.parse_space(cfg["hpo"]["space"])
    assert {"train.lr", "train.encoder_lr_ratio"} <= set(space)
    hpo.check_space(cfg, space)
