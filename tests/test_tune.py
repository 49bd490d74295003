import csv
import json

import numpy as np
import optuna
import pytest
import yaml

import tune
from bench.postprocess_speed import synthetic_oof
from data.cache import load_targets
from data.probstore import save_probs
from data.reader import list_train
from postprocessing import PostprocessParams
from tune import ablate, evaluate


def codes(class_map, on=0.8):
    off = (1 - on) / 2
    p = np.where(np.arange(3)[:, None, None] == class_map[None], on, off)
    return np.rint(p * 255).astype(np.uint8)


def test_tuning_beats_argmax_on_noisy_predictions():
    # blurred truth plus specks of either class and split-class patches inside lesions
    probs, targets = synthetic_oof(40, (64, 64), seed=0)
    doc = tune.tune(probs, targets, trials=25, objective="competition", seed=0)
    before, after = doc["scores"]["argmax"], doc["scores"]["tuned"]
    assert after["competition"] > before["competition"] + 0.02
    assert after["competition_neo"] >= before["competition_neo"]
    assert after["competition_non"] >= before["competition_non"]
    kept = PostprocessParams.from_dict(doc["params"]).active_steps()
    assert kept and {r["step"] for r in doc["ablation"] if r["kept"]} == set(kept)
    assert doc["trials"] == 25 and doc["n_images"] == 40 and doc["resolution"] == [64, 64]
    # the reported score is what the kept parameters really give
    params = PostprocessParams.from_dict(doc["params"])
    assert evaluate(probs, targets, params, n_jobs=2) == after


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
    save_probs(
        store, ids, probs, [(128, 160)] * len(ids), kind="oof", model="ensemble", split_id="s"
    )
    return tmp_path / "c.yaml", tmp_path / "exp"


def test_cli_writes_postprocess_json(blended, capsys):
    config, _ = blended
    tmp_path = config.parent
    argv = ["--config", str(config), "--trials", "6", "--objective", "competition"]
    assert tune.main(argv) == 0
    doc = json.loads((tmp_path / "exp" / "postprocess.json").read_text())
    assert doc["trials"] == 6 and doc["objective"] == "competition"
    assert doc["provenance"]["split_id"] == "s"
    assert doc["scores"]["tuned"]["competition"] > doc["scores"]["argmax"]["competition"]
    PostprocessParams.from_dict(doc["params"])
    assert "kept steps" in capsys.readouterr().out


def test_cli_two_workers_then_a_killed_trial_is_failed_on_restart(blended):
    config, exp = blended
    argv = ["--config", str(config), "--objective", "competition"]
    assert tune.main([*argv, "--trials", "8", "--n-workers", "2"]) == 0
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

    def fake_evaluate(probs, targets, params, n_jobs=1):
        comp, neo, non = table[tuple(params.active_steps())]
        return {"competition": comp, "competition_neo": neo, "competition_non": non}

    monkeypatch.setattr(tune, "evaluate", fake_evaluate)
    params = PostprocessParams(min_area_frac=0.01, fill_holes=True)
    baseline = fake_evaluate(None, None, PostprocessParams())
    final, record = tune.ablate(None, None, params, "competition", baseline)
    assert [r["kept"] for r in record[:2]] == [True, False]
    assert final == PostprocessParams()
