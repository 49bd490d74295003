import csv
import json

import numpy as np
import optuna
import pytest
import yaml

import ensemble
from core.metrics import scores_from_stats
from data.probstore import ProbMaps, align_stores, blend, blend_by_fold, load_probs, save_probs
from data.reader import DataError, list_test, list_train
from ensemble import blend_stats, run_ensemble, search_weights

WORK = (64, 64)


def one_hot(class_map, on=1.0):
    """(N, 3, H, W) uint8 codes with `on` on the given class and the rest spread evenly."""
    off = (1 - on) / 2
    p = np.where(np.arange(3)[None, :, None, None] == class_map[:, None], on, off)
    return np.rint(p * 255).astype(np.uint8)


def blob_targets(n, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    t = np.zeros((n, *size), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, size[0] - 12, 2)
        t[i, y : y + 12, x : x + 12] = 1 + i % 2
    return t


def test_blend_is_the_weighted_mean_of_the_codes():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 3, 4, 5), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 3, 4, 5), dtype=np.uint8)
    expected = np.rint(0.75 * a.astype(np.float64) + 0.25 * b).astype(np.uint8)
    assert np.abs(blend([a, b], [3, 1]).astype(int) - expected).max() <= 1
    np.testing.assert_array_equal(blend([a, b], [1, 0]), a)
    with pytest.raises(ValueError, match="positive sum"):
        blend([a, b], [0, 0])
    # a negative weight could cancel a model out, even when the weights sum to 1
    with pytest.raises(ValueError, match="non-negative"):
        blend([a, b], [2, -1])
    with pytest.raises(ValueError, match="non-negative"):
        blend_stats([a, b], np.zeros((3, 4, 5), np.uint8), [1.5, -0.5])


def test_search_gives_the_right_model_most_of_the_weight():
    targets = blob_targets(16)
    rng = np.random.default_rng(1)
    good = one_hot(targets, on=0.5)  # right class everywhere, but only 0.5 sure
    # confidently wrong, with a per-pixel confidence: right only when w_good >> w_bad
    wrong = (targets + rng.integers(1, 3, targets.shape)) % 3
    bad = one_hot(wrong, on=1.0).astype(np.float32)
    bad *= rng.uniform(0.3, 1.0, targets.shape)[:, None]
    bad = np.rint(bad).astype(np.uint8)
    equal = scores_from_stats(blend_stats([good, bad], targets, [1, 1]))["competition"]
    weights, study = search_weights([good, bad], targets, 40, "competition", seed=0)
    tuned = scores_from_stats(blend_stats([good, bad], targets, weights))["competition"]
    assert len(study.trials) == 40
    assert weights[0] > 3 * weights[1] and abs(sum(weights) - 1) < 1e-9
    assert tuned > 0.97 and equal < 0.5


def test_run_ensemble_reports_per_fold_and_single_model_needs_no_search():
    targets = blob_targets(12)
    good, noisy = one_hot(targets, 0.6), one_hot((targets + 1) % 3, 0.4)
    folds = [0, 1, 2] * 4
    record = run_ensemble(["good", "noisy"], [good, noisy], targets, folds, 8, "dice_neo")
    doc = record.to_dict()
    assert set(doc["scores"]) == {"good", "noisy", "equal", "tuned"}
    assert set(doc["scores"]["tuned"]) == {"all", "0", "1", "2"}
    assert doc["scores"]["good"]["all"]["dice_neo"] == 1.0
    assert doc["scores"]["tuned"]["all"]["dice_neo"] == 1.0
    assert doc["trials"] == 8
    assert set(doc["fold_weights"]) == {"0", "1", "2"}
    # the best single model, picked on the other folds every time, is "good"
    assert doc["candidates"]["best single"]["fold_weights"] == {k: [1.0, 0.0] for k in "012"}
    single = run_ensemble(["good"], [good], targets, folds, 50, "competition").to_dict()
    assert single["weights"] == [1.0] and single["trials"] == 0
    assert single["decision"] is None and single["fold_weights"] == {k: [1.0] for k in "012"}
    table = ensemble.format_table(record)
    assert "fold 2" in table and f"weights ({doc['chosen']}): good=" in table


def test_the_blend_is_chosen_out_of_sample_and_tuned_weights_must_earn_their_place():
    targets = blob_targets(24)
    good = one_hot(targets, 0.6)
    copy = good.copy()
    # identical models: tuned weights cannot beat equal ones out of sample
    same = run_ensemble(["good", "copy"], [good, copy], targets, [0, 1, 2] * 8, 6).to_dict()
    assert same["chosen"] == "equal" and same["weights"] == [0.5, 0.5]
    # a model that is wrong everywhere: the best single model (good) wins clearly over equal
    # weights, and tuned weights add nothing beyond it
    bad = one_hot((targets + 1) % 3, 0.9)
    doc = run_ensemble(["bad", "good"], [bad, good], targets, [0, 1, 2] * 8, 10).to_dict()
    assert doc["chosen"] == "best single" and doc["weights"] == [0.0, 1.0]
    rows = doc["decision"]["candidates"]
    assert rows["best single"]["out_of_sample"]["competition"] == 1.0
    assert rows["equal"]["out_of_sample"]["competition"] < 1.0
    assert doc["fold_weights"] == {k: [0.0, 1.0] for k in "012"}
    assert doc["decision"]["steps"][0]["taken"] is False  # tuned: no gain over "good"


def test_the_oof_blend_holds_each_fold_blended_with_its_own_weights():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 3, 4, 5), dtype=np.uint8)
    b = rng.integers(0, 256, (6, 3, 4, 5), dtype=np.uint8)
    stores = [ProbMaps([str(i) for i in range(6)], [(4, 5)] * 6, {}, x) for x in (a, b)]
    folds = [0, 1, 0, 1, 2, 2]
    out = blend_by_fold(stores, {0: [1, 0], 1: [0, 1], 2: [1, 1]}, folds)
    np.testing.assert_array_equal(out[[0, 2]], a[[0, 2]])
    np.testing.assert_array_equal(out[[1, 3]], b[[1, 3]])
    np.testing.assert_array_equal(out[4:], blend([a[4:], b[4:]], [1, 1]))


def test_mixed_splits_and_different_images_are_refused(tmp_path):
    probs = np.full((2, 3, 4, 4), 1 / 3, np.float32)
    save_probs(
        tmp_path / "a", ["x", "y"], probs, [(4, 4)] * 2, kind="oof", model="a", split_id="s1"
    )
    save_probs(
        tmp_path / "b", ["x", "y"], probs, [(4, 4)] * 2, kind="oof", model="b", split_id="s2"
    )
    save_probs(
        tmp_path / "c", ["y", "z"], probs, [(4, 4)] * 2, kind="oof", model="c", split_id="s1"
    )
    save_probs(
        tmp_path / "d", ["y", "x"], probs, [(4, 4)] * 2, kind="oof", model="d", split_id="s1"
    )
    a, b, c, d = (load_probs(tmp_path / k) for k in "abcd")
    with pytest.raises(DataError, match="different fold splits"):
        align_stores([a, b])
    with pytest.raises(DataError, match="different images"):
        align_stores([a, c])
    assert align_stores([a, d])[1].ids == ["x", "y"]


@pytest.fixture
def experiment(tiny_data, tmp_path):
    """Two models' OOF and test stores, each model's in its own image order: both models'
    OOF maps are right ("bad" less sure), so equal weights are as good as any; test maps
    are random and differ between the models."""
    cfg = {"experiment": "exp", "data_dir": str(tiny_data), "out_dir": str(tmp_path), "seed": 0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    train_ids = [s.id for s in list_train(tiny_data)]
    test_ids = [s.id for s in list_test(tiny_data)]
    targets = ensemble.load_targets(cfg, train_ids, WORK)
    folds = [i % 3 for i in range(len(train_ids))]
    rng = np.random.default_rng(0)
    exp = tmp_path / "exp"
    oof = {"good": one_hot(targets, 0.6), "bad": one_hot(targets, 0.4)}
    for name, order in (("good", slice(None)), ("bad", slice(None, None, -1))):
        save_probs(
            exp / name / "oof",
            train_ids[order],
            oof[name][order],
            [(128, 160)] * len(train_ids),
            kind="oof",
            model=name,
            split_id="s",
            folds=folds[order],
        )
    test_orders = {"good": test_ids[::-1], "bad": list(np.roll(test_ids, 2))}
    for name, order in test_orders.items():
        save_probs(
            exp / name / "test",
            order,
            rng.integers(0, 256, (len(test_ids), 3, *WORK), dtype=np.uint8),
            [(128, 160)] * len(test_ids),
            kind="test",
            model=name,
            split_id="s",
        )
    return tmp_path, exp, targets


def _by_id(path) -> dict[str, np.ndarray]:
    store = load_probs(path)
    return {i: np.asarray(store.raw[k], np.float64) for k, i in enumerate(store.ids)}


def test_cli_writes_weights_and_blended_stores(experiment, capsys):
    root, exp, _ = experiment
    argv = ["--config", str(root / "c.yaml"), "--models", "good", "bad", "--trials", "10"]
    assert ensemble.main(argv) == 0
    doc = json.loads((exp / "ensemble" / "weights.json").read_text())
    assert doc["models"] == ["good", "bad"] and doc["split_id"] == "s"
    w_good, w_bad = doc["weights"]
    # nothing beats equal weights here (every candidate is perfect): the simple one stays
    assert doc["chosen"] == "equal" and w_good == w_bad == 0.5
    assert doc["scores"]["tuned"]["all"]["competition"] == 1.0
    assert "provenance" in doc and doc["trials"] == 10
    out = capsys.readouterr().out
    assert "decision: equal: equal is the best simple choice" in out
    assert "tuned's gain over equal" in out
    # every blended map is the weighted mean of the two models' maps of the same image id,
    # whatever order each model's store holds its images in
    for kind in ("oof", "test"):
        good, bad = _by_id(exp / "good" / kind), _by_id(exp / "bad" / kind)
        out = load_probs(exp / "ensemble" / kind)
        assert out.meta["kind"] == kind and out.split_id == "s"
        assert out.meta["model"] == "ensemble" and out.meta["models"] == ["good", "bad"]
        assert out.meta["weights"] == [w_good, w_bad]
        assert out.meta["provenance"]["stage"] == "ensemble"
        assert sorted(out.ids) == sorted(good)
        expected = np.stack([w_good * good[i] + w_bad * bad[i] for i in out.ids])
        assert np.abs(np.asarray(out.raw, np.float64) - expected).max() <= 1.0, kind
    oof = load_probs(exp / "ensemble" / "oof")
    good_oof = load_probs(exp / "good" / "oof")
    assert oof.ids == good_oof.ids and oof.meta["folds"] == good_oof.meta["folds"]


def test_cli_continues_its_study_and_a_changed_input_starts_another(experiment):
    root, exp, targets = experiment
    argv = ["--config", str(root / "c.yaml"), "--models", "good", "bad"]
    weights = exp / "ensemble" / "weights.json"
    assert ensemble.main([*argv, "--trials", "12"]) == 0
    first = json.loads(weights.read_text())["study"]
    assert ensemble.main([*argv, "--trials", "20"]) == 0
    doc = json.loads(weights.read_text())
    storage = f"sqlite:///{exp / 'optuna.db'}"  # the default: one file per experiment
    name = doc["study"]["name"]
    assert name == first["name"] and name.startswith("ensemble-")
    # one study per fit: all folds (recorded), and each fold's nested fit on the others
    studies = optuna.get_all_study_names(storage)
    assert len(studies) == 4 and name in studies
    study = optuna.load_study(study_name=name, storage=storage)
    assert doc["trials"] == len(study.trials) == 20
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    with (exp / "ensemble" / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20 and "user_attrs_weights" in rows[0]
    assert doc["study"]["trials_csv"] == str(exp / "ensemble" / "trials.csv")
    # 12 then 20 trials give what 20 at once give (another storage, same study name)
    once = f"sqlite:///{root / 'once.db'}"
    assert ensemble.main([*argv, "--trials", "20", "--storage", once]) == 0
    again = json.loads(weights.read_text())
    assert again["candidates"]["tuned"] == doc["candidates"]["tuned"]
    assert sorted(optuna.get_all_study_names(once)) == sorted(studies)

    # another objective, then a re-predicted OOF store: each is a study of its own
    assert ensemble.main([*argv, "--trials", "3", "--objective", "dice_neo"]) == 0
    bad = load_probs(exp / "bad" / "oof")
    save_probs(
        exp / "bad" / "oof",
        bad.ids,
        one_hot((targets[::-1] + 2) % 3),  # the "bad" store holds its images reversed
        bad.orig_sizes,
        kind="oof",
        model="bad",
        split_id="s",
        folds=bad.meta["folds"],
    )
    assert ensemble.main([*argv, "--trials", "3"]) == 0
    names = optuna.get_all_study_names(storage)
    assert len(set(names)) == 3 * 4 and name in names
    assert json.loads(weights.read_text())["study"]["name"] not in {name, first["name"]}


def test_cli_refuses_mixed_splits_before_writing(experiment, capsys):
    root, exp, targets = experiment
    ids = load_probs(exp / "good" / "oof").ids
    save_probs(
        exp / "other" / "oof",
        ids,
        one_hot(targets),
        [(128, 160)] * len(ids),
        kind="oof",
        model="other",
        split_id="another",
    )
    assert ensemble.main(["--config", str(root / "c.yaml"), "--models", "good", "other"]) == 2
    assert "different fold splits" in capsys.readouterr().err
    assert not (exp / "ensemble").exists()


def test_a_model_without_oof_maps_is_named_with_the_commands_that_make_them(experiment, capsys):
    """The README's stage-by-stage path trained one model, then blended all six: the
    error said only "probability store not found"."""
    root, exp, _ = experiment
    config = str(root / "c.yaml")
    assert ensemble.main(["--config", config, "--models", "good", "unet", "pranet"]) == 2
    err = capsys.readouterr().err
    assert "no out-of-fold maps for unet, pranet" in err
    for model in ("unet", "pranet"):
        assert f"python predict.py --config {config} --model {model}" in err
    assert f"python ensemble.py --config {config} --models good" in err
    assert not (exp / "ensemble").exists()
