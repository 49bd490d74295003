"""decisions.decide: the one cross-fit -> fit-on-all -> choose of ensemble, refine and tune;
and the blended models' order, worked out once (the pipeline's, the config's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import ensemble
from chain.decisions import Option, Rule, choose, cross_fit, decide, judge
from data.probstore import save_probs
from data.reader import list_train
from tests.test_decisions import stats_of
from tests.test_ensemble import WORK, one_hot
from workflow.stages import model_names

FOLDS = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
# a per-image score the fitted option learns: the mean of the images it was fitted on
TRUTH = np.linspace(0.55, 0.95, len(FOLDS))


def fitted_mean(calls: list[tuple[int | None, list[int]]]) -> Option[float]:
    """An option whose parameter is the mean score of the images it is fitted on, and
    which scores an image by how close its parameter is to the image's score."""

    def fit(k: int | None, rows: np.ndarray) -> float:
        calls.append((k, rows.tolist()))
        return float(TRUTH[rows].mean())

    def stats(mean: float, rows: np.ndarray) -> np.ndarray:
        return stats_of([1.0 - abs(mean - TRUTH[r]) for r in rows])

    return Option("fitted", stats, fit=fit, level=1)


def test_a_fitted_option_is_scored_out_of_sample_then_fitted_on_all_folds():
    calls: list[tuple[int | None, list[int]]] = []
    judged = judge(fitted_mean(calls), FOLDS)
    # one fit per fold on the other folds' images, then one on every image
    assert [k for k, _ in calls] == [0, 1, 2, None]
    for k, rows in calls[:3]:
        assert all(FOLDS[r] != k for r in rows)
    assert calls[3][1] == list(range(len(FOLDS)))
    # each image scored by its own fold's parameters: exactly decisions.cross_fit's stats
    oos, per_fold = cross_fit(FOLDS, fitted_mean([]).fit, fitted_mean([]).stats)
    np.testing.assert_array_equal(judged.candidate.oos, oos)
    assert judged.fold_params == per_fold
    assert judged.params == pytest.approx(TRUTH.mean())
    # the all-folds fit scored on the images it saw: the in-sample stats
    everything = np.arange(len(FOLDS))
    np.testing.assert_array_equal(
        judged.candidate.insample, fitted_mean([]).stats(judged.params, everything)
    )
    assert judged.candidate.level == 1 and judged.candidate.name == "fitted"
    # fold k's images were scored with the parameters fitted without fold k
    for i, k in enumerate(FOLDS):
        mean = TRUTH[[r for r, f in enumerate(FOLDS) if f != k]].mean()
        assert judged.fold_params[k] == pytest.approx(mean)
        np.testing.assert_array_equal(
            judged.candidate.oos[i], stats_of([1 - abs(mean - TRUTH[i])])[0]
        )


def test_an_option_with_nothing_to_fit_keeps_its_parameters_and_has_one_score():
    seen = []

    def stats(p: float, rows: np.ndarray) -> np.ndarray:
        seen.append(rows.tolist())
        return stats_of([p] * len(rows))

    judged = judge(Option("fixed", stats, params=0.8), FOLDS)
    assert seen == [list(range(len(FOLDS)))]  # scored once, on every image
    assert judged.params == 0.8 and judged.fold_params == {0: 0.8, 1: 0.8, 2: 0.8}
    assert judged.candidate.insample is None and judged.candidate.level == 0
    np.testing.assert_array_equal(judged.candidate.oos, stats_of([0.8] * len(FOLDS)))


def test_decide_is_choose_over_the_judged_options_and_hands_back_the_chosen_parameters():
    rule = Rule.default(n_boot=200)

    def stats(p: float, rows: np.ndarray) -> np.ndarray:
        return stats_of([p] * len(rows))

    options = [
        Option("weak", stats, params=0.6),
        Option("simple", stats, params=0.7),
        fitted_mean([]),
    ]
    outcome = decide(options, FOLDS, rule)
    candidates = [outcome.judged[o.name].candidate for o in options]
    assert outcome.record == choose(candidates, rule)
    assert list(outcome.judged) == ["weak", "simple", "fitted"]
    assert outcome.chosen is outcome.judged[outcome.record["chosen"]]
    # the fitted option scores every image about 0.9: it beats 0.7 everywhere
    assert outcome.record["chosen"] == "fitted"
    assert outcome.chosen.params == pytest.approx(TRUTH.mean())
    assert "in_sample" in outcome.record["candidates"]["fitted"]
    assert "in_sample" not in outcome.record["candidates"]["simple"]


def test_decide_refuses_two_options_of_one_name():
    def stats(p: float, rows: np.ndarray) -> np.ndarray:
        return stats_of([p] * len(rows))

    with pytest.raises(ValueError, match="distinct names"):
        decide([Option("a", stats, 0.5), Option("a", stats, 0.6)], FOLDS, Rule.default(n_boot=100))


def test_ensemble_blends_the_config_models_in_the_pipelines_order(tiny_data, tmp_path, capsys):
    """Without --models or ensemble.models, ensemble.py blends the config's models in the
    order the pipeline passes them (stages.model_names, the config's); it sorted them,
    so a blend made stage by stage could differ from the pipeline's (another optuna
    parameter order, another tie-break of the best single model)."""
    entry = {"arch": "smp.Unet", "kwargs": {"encoder_name": "resnet18"}, "pretrained": None}
    cfg = {
        "experiment": "exp",
        "data_dir": str(tiny_data),
        "out_dir": str(tmp_path),
        "models": {"zeta": entry, "alpha": entry},  # not in sorted order
    }
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ids = [s.id for s in list_train(tiny_data)]
    targets = ensemble.load_targets(cfg, ids, WORK)
    for name, sure in (("zeta", 0.6), ("alpha", 0.4)):
        save_probs(
            tmp_path / "exp" / name / "oof",
            ids,
            one_hot(targets, sure),
            [(128, 160)] * len(ids),
            kind="oof",
            model=name,
            split_id="s",
            folds=[i % 3 for i in range(len(ids))],
        )
    assert ensemble.main(["--config", str(config), "--trials", "2"]) == 0
    doc = json.loads((tmp_path / "exp" / "ensemble" / "weights.json").read_text())
    assert doc["models"] == ["zeta", "alpha"] == model_names(cfg)
    assert "zeta=" in capsys.readouterr().out.split("weights (")[1].split(",")[0]
