import csv
import json

import numpy as np
import optuna
import pytest
import yaml

import tune
from bench.postprocess_speed import synthetic_oof
from chain.decisions import map_stats
from chain.postprocessing import PostprocessParams
from core.metrics import scores_from_stats
from data.cache import load_targets
from data.probstore import load_probs, save_probs
from data.reader import list_train
from tune import ablate, evaluate


def codes(class_map, on=0.8):
    off = (1 - on) / 2
    p = np.where(np.arange(3)[:, None, None] == class_map[None], on, off)
    return np.rint(p * 255).astype(np.uint8)


FOLDS = [0, 1, 2, 3] * 10


def test_tuning_beats_argmax_out_of_sample_on_noisy_predictions():
    # blurred truth plus specks of either class and split-class patches inside lesions
    probs, targets = synthetic_oof(40, (64, 64), seed=0)
    doc = tune.tune([tune.Source("blend", probs)], targets, FOLDS, trials=25, seed=0).to_dict()
    before, after = doc["scores"]["argmax"], doc["scores"]["tuned"]
    assert after["competition"] > before["competition"] + 0.02
    assert after["competition_neo"] >= before["competition_neo"]
    assert after["competition_non"] >= before["competition_non"]
    kept = PostprocessParams.from_dict(doc["params"]).active_steps()
    assert kept and {r["step"] for r in doc["ablation"] if r["kept"]} == set(kept)
    assert doc["trials"] == 25 and doc["n_images"] == 40 and doc["resolution"] == [64, 64]
    assert doc["chosen"] == "blend, tuned" and doc["source"] == "blend"
    # the in-sample score is what the kept parameters really give on all images ...
    params = PostprocessParams.from_dict(doc["params"])
    assert evaluate(probs, targets, params, n_jobs=2) == after
    # ... and the out-of-sample one is each fold scored with the parameters fitted on the
    # other folds, recomputed here from the recorded per-fold parameters
    folds = np.asarray(FOLDS)
    stats = np.zeros((40, 3, 3), np.int64)
    for k, p in doc["fold_params"].items():
        held = np.flatnonzero(folds == int(k))
        stats[held] = map_stats(probs, targets, PostprocessParams.from_dict(p), rows=held)
    assert scores_from_stats(stats) == doc["out_of_sample"]["blend, tuned"]
    np.testing.assert_array_equal(np.reshape(doc["oos_image_stats"], (40, 3, 3)), stats)
    oos = doc["out_of_sample"]
    assert oos["blend, tuned"]["competition"] > oos["blend, region vote"]["competition"]
    assert oos["blend, tuned"]["competition"] <= after["competition"]  # honest <= in-sample


def test_a_fit_that_only_wins_in_sample_is_not_used():
    """Specks on a few images of one fold: removing them is what the search learns, but
    with every other image already right, the out-of-sample gain is within the noise."""
    targets = np.zeros((24, 32, 32), np.uint8)
    targets[:, 8:20, 8:20] = 1
    noisy = targets.copy()
    noisy[0, 26:28, 26:28] = 2  # one stray speck, on one image
    probs = np.stack([codes(m) for m in noisy])
    doc = tune.tune(
        [tune.Source("blend", probs)], targets, [0, 1, 2] * 8, trials=12, seed=0
    ).to_dict()
    oos = doc["out_of_sample"]
    assert doc["chosen"] in ("blend, argmax", "blend, region vote")
    assert PostprocessParams.from_dict(doc["params"]).active_steps() in ([], ["region"])
    assert "within the noise" in doc["decision"]["reason"]
    assert oos["blend, tuned"]["competition"] <= doc["scores"]["tuned"]["competition"]


def test_refined_maps_are_used_only_when_they_beat_the_blend_after_post_processing():
    probs, targets = synthetic_oof(40, (64, 64), seed=1)
    right = np.stack([codes(t) for t in targets])  # a refiner that fixed everything
    sources = [tune.Source("blend", probs), tune.Source("refined", right)]
    doc = tune.tune(sources, targets, FOLDS, trials=6, seed=0).to_dict()
    assert doc["source"] == "refined" and doc["chosen"] == "refined, argmax"
    assert doc["sources"] == ["blend", "refined"]
    assert doc["out_of_sample"]["refined, argmax"]["competition"] == 1.0
    # refined maps no better than the blend: the blend chain stays
    doc = tune.tune(
        [tune.Source("blend", right), tune.Source("refined", right)], targets, FOLDS, 6
    ).to_dict()
    assert doc["source"] == "blend" and doc["chosen"] == "blend, argmax"


def speck_case(with_tiny_true_polyp):
    """Neo specks on non images; optionally one image whose only polyp is tiny (and right)."""
    targets, probs = [], []
    for _ in range(4):
        t = np.zeros((32, 32), np.uint8)
        t[4:16, 4:16] = 2
        p = t.copy()
        p[26:28, 26:28] = 1  # false neo speck: neo row 0 until it is removed
        targets.append(t)
        probs.append(codes(p))
    if with_tiny_true_polyp:
        t = np.zeros((32, 32), np.uint8)
        t[20:23, 20:23] = 2  # a real 9-pixel polyp, found: removing it costs a non row
        targets.append(t)
        probs.append(codes(t))
    return np.stack(probs), np.stack(targets)


def test_ablation_keeps_a_step_only_if_it_helps_and_hurts_no_class():
    params = PostprocessParams(min_area_frac=0.01, fill_holes=True)
    probs, targets = speck_case(with_tiny_true_polyp=False)
    baseline = evaluate(probs, targets, PostprocessParams())
    final, record = ablate(probs, targets, params, "competition", baseline)
    assert final == PostprocessParams(min_area_frac=0.01)  # fill_holes changed nothing
    assert [(r["step"], r["kept"]) for r in record] == [("min_area", True), ("fill_holes", False)]

    probs, targets = speck_case(with_tiny_true_polyp=True)
    baseline = evaluate(probs, targets, PostprocessParams())
    with_step = evaluate(probs, targets, params)
    assert with_step["competition"] > baseline["competition"]  # better overall ...
    assert with_step["competition_non"] < baseline["competition_non"]  # ... but not for non
    final, record = ablate(probs, targets, params, "competition", baseline)
    assert final == PostprocessParams()
    assert record[0]["step"] == "min_area" and not record[0]["no_class_worse_than_argmax"]


@pytest.fixture
def blended(tiny_data, tmp_path):
    """A config and a blended OOF store with one false speck of the other class per image."""
    cfg = {"experiment": "exp", "data_dir": str(tiny_data), "out_dir": str(tmp_path), "seed": 0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    ids = [s.id for s in list_train(tiny_data)]
    targets = load_targets(cfg, ids, (64, 64))
    rng = np.random.default_rng(0)
    noisy = targets.copy()
    for m in noisy:
        y, x = rng.integers(0, 60, 2)
        m[y : y + 2, x : x + 2] = 2 if (m == 1).any() else 1
    probs = np.stack([codes(m) for m in noisy])
    store = tmp_path / "exp" / "ensemble" / "oof"
    folds = [i % 3 for i in range(len(ids))]
    save_probs(
        store,
        ids,
        probs,
        [(128, 160)] * len(ids),
        kind="oof",
        model="ensemble",
        split_id="s",
        folds=folds,
    )
    return tmp_path / "c.yaml", tmp_path / "exp"


def test_cli_writes_postprocess_json(blended, capsys):
    config, exp = blended
    tmp_path = config.parent
    argv = ["--config", str(config), "--trials", "6", "--objective", "competition"]
    assert tune.main(argv) == 0
    doc = json.loads((tmp_path / "exp" / "postprocess.json").read_text())
    assert doc["trials"] == 6 and doc["objective"] == "competition"
    assert doc["provenance"]["split_id"] == "s"
    assert doc["scores"]["tuned"]["competition"] > doc["scores"]["argmax"]["competition"]
    PostprocessParams.from_dict(doc["params"])
    assert (
        doc["sources"] == ["blend"] and doc["image_ids"] == load_probs(exp / "ensemble" / "oof").ids
    )
    out = capsys.readouterr().out
    assert "submitted chain: blend" in out and "out of sample" in out


def test_cli_two_workers_then_a_killed_trial_is_failed_on_restart(blended):
    config, exp = blended
    argv = ["--config", str(config), "--objective", "competition"]
    assert tune.main([*argv, "--trials", "8", "--parallel", "2"]) == 0
    doc = json.loads((exp / "postprocess.json").read_text())
    storage, name = f"sqlite:///{exp / 'optuna.db'}", doc["study"]["name"]
    assert name.startswith("tune-") and doc["trials"] == 8
    study = optuna.load_study(study_name=name, storage=storage)
    complete = optuna.trial.TrialState.COMPLETE
    assert len(study.get_trials(states=(complete,))) == 8
    abandoned = study.ask()  # what a kill mid-trial leaves behind

    assert tune.main([*argv, "--trials", "10"]) == 0
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.trials[abandoned.number].state == optuna.trial.TrialState.FAIL
    assert len(study.get_trials(states=(complete,))) == 10
    assert json.loads((exp / "postprocess.json").read_text())["trials"] == 10
    with (exp / "tune_trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["number"]) for r in rows] == [t.number for t in study.trials]
    assert rows[abandoned.number]["state"] == "FAIL"


def test_ablation_never_ends_with_a_class_worse_than_argmax(monkeypatch):
    """min_area is kept while fill_holes is on; fill_holes is then dropped, and min_area
    alone hurts non-neoplastic: the rule must fall back to plain argmax."""
    table = {
        ("min_area", "fill_holes"): (0.80, 0.80, 0.80),
        ("fill_holes",): (0.70, 0.70, 0.70),
        ("min_area",): (0.81, 0.95, 0.60),
        (): (0.70, 0.70, 0.70),
    }

    def fake_evaluate(probs, targets, params, n_jobs=1, rows=None):
        comp, neo, non = table[tuple(params.active_steps())]
        return {"competition": comp, "competition_neo": neo, "competition_non": non}

    monkeypatch.setattr(tune, "evaluate", fake_evaluate)
    params = PostprocessParams(min_area_frac=0.01, fill_holes=True)
    baseline = fake_evaluate(None, None, PostprocessParams())
    final, record = tune.ablate(None, None, params, "competition", baseline)
    assert [r["kept"] for r in record[:2]] == [True, False]
    assert final == PostprocessParams()
