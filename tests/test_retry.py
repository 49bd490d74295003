"""Failed folds: the verdict, the remedy, the retrain in train.py and pipeline.py, and the
report saying so. A fold is forced to fail through the NEOPOLYP_FAIL_FOLD hook, so the
tests do not depend on whether a tiny model happens to learn."""

from __future__ import annotations

import json
import logging
import shlex

import pytest
import yaml

import pipeline
import train
from core.config import ConfigError, defaults, load_config
from core.settings import layout_of
from data.foldlog import read_log, write_log
from tests.trainkit import fold_path, run_main, write_config
from training.engine import fold_verdict, judge_fold, retire_attempt
from training.recipe import RetryPolicy, fold_recipe


def history(scores: list[float], nothing: float = 0.5) -> list[dict]:
    return [
        {"epoch": i + 1, "competition": s, "nothing": {"competition": nothing}}
        for i, s in enumerate(scores)
    ]


def test_a_fold_fails_when_it_never_beats_nothing_or_trails_its_model():
    never = fold_verdict(history([0.3, 0.5]), "competition", [], 0.1)
    assert (
        never.reason == "best validation competition 0.5000 never beat predicting nothing (0.5000)"
    )
    assert never.kind == "nothing"
    assert fold_verdict(history([0.3, 0.6]), "competition", [], 0.1) is None
    # a fold that collapsed to background scores the baseline give or take a few pixels:
    # that is not beating it
    assert fold_verdict(history([0.504]), "competition", [], 0.1).kind == "nothing"
    others = [history([0.8]), history([0.9])]  # gains 0.3 and 0.4: median 0.35
    assert fold_verdict(history([0.75]), "competition", others, 0.15) is None  # gain 0.25
    trails = fold_verdict(history([0.6]), "competition", others, 0.15)  # gain 0.1
    assert "trails the median of its model's other folds (0.3500)" in trails.reason
    assert trails.kind == "trails" and trails.retrain
    assert fold_verdict(history([0.6]), "competition", others, None) is None  # no margin
    assert fold_verdict(history([0.6]), "competition", others[:1], 0.15) is None  # 1 other
    old_log = [{"epoch": 1, "competition": 0.1}]  # written before "nothing" was recorded
    assert fold_verdict(old_log, "competition", [], 0.15) is None


def test_a_fold_under_nothing_is_retrained_only_when_another_fold_shows_the_recipe_can_beat_it():
    """Another seed cannot lift a fold over predicting nothing when no fold of its model got
    there (a one-epoch recipe, a fold trained alone): it is kept, not retrained until the
    run is failed. One fold that did beat it shows the recipe can, and then a retrain may."""
    under = history([0.2, 0.4])
    assert not fold_verdict(under, "competition", [], 0.15).retrain  # alone
    assert not fold_verdict(under, "competition", [history([0.3]), history([0.45])], 0.15).retrain
    assert not fold_verdict(under, "competition", [history([0.503])], 0.15).retrain  # collapsed
    assert fold_verdict(under, "competition", [history([0.3]), history([0.7])], 0.15).retrain


def test_a_fold_is_judged_on_its_metric_against_its_models_other_complete_folds(
    tmp_path, tiny_data, monkeypatch
):
    """judge_fold reads the logs the folds left: only complete folds of the same model are
    the fold's peers, and the configured best_metric is the one judged."""
    monkeypatch.delenv("NEOPOLYP_FAIL_FOLD", raising=False)
    overrides = ["retry.margin=0.05", "data.n_folds=5"]
    cfg = load_config(write_config(tmp_path, tiny_data), overrides)  # 2 epochs
    layout = layout_of(cfg)

    def fold(k: int, gain: float, epochs: int = 2, model: str = "tiny") -> None:
        out = layout.fold(model, k).dir
        (out / "oof").mkdir(parents=True)
        (out / "best.pt").write_bytes(b"weights")
        (out / "oof" / "meta.json").write_text("{}")
        nothing = {"competition": 0.4, "dice_seg": 0.5}
        records = [
            {"epoch": e, "competition": 0.4 + gain, "dice_seg": 0.5, "nothing": nothing}
            for e in range(1, epochs + 1)
        ]
        write_log(out / "log.jsonl", records)

    fold(0, 0.30)
    fold(1, 0.40)
    fold(2, 0.20)
    fold(3, 0.90, epochs=1)  # unfinished: no peer yet
    fold(4, 0.90, epochs=1)
    fold(0, 0.0, model="other")  # another model's fold: no peer either
    # peers 0.40 and 0.20: median 0.30, and 0.30 is within the margin (with the unfinished
    # folds as peers the median would be 0.65, and the fold would fail)
    assert judge_fold(cfg, "tiny", 0) is None
    # fold 2 against 0.30 and 0.40 (median 0.35): 0.20 trails by more than 0.05
    assert judge_fold(cfg, "tiny", 2).reason == (
        "gain over predicting nothing 0.2000 trails the median of its model's other folds "
        "(0.3500) by more than 0.05"
    )
    assert judge_fold(cfg, "tiny", 3) is None  # unfinished: not judged
    # on dice_seg no fold beat predicting nothing: the recipe is the limit, and each log's
    # curve says what to change (flat from its first epoch: not more epochs)
    by_seg = {**cfg, "train": {**cfg["train"], "best_metric": "dice_seg"}}
    verdict = judge_fold(by_seg, "tiny", 1)
    assert not verdict.retrain
    assert verdict.reason == (
        "best validation dice_seg 0.5000 never beat predicting nothing (0.5000); not "
        "retrained: no other trained fold of tiny beat it either, so the recipe is the limit, "
        "not the seed; its best epoch was 1 of 2: try another train.lr (now 0.003)"
    )
    write_log(
        layout.fold("tiny", 1).log,
        [{**r, "dice_seg": 0.1 * r["epoch"]} for r in read_log(layout.fold("tiny", 1).log)],
    )
    assert judge_fold(by_seg, "tiny", 1).reason.endswith(
        "it was best at its last epoch: raise train.epochs (now 2)"
    )


def test_a_retired_attempt_keeps_its_log_and_frees_the_fold(tmp_path, tiny_data):
    """Each failed attempt's log is kept under its own number, its checkpoints and OOF maps
    are deleted (disk), and retries.json records every attempt and the policy."""
    cfg = load_config(write_config(tmp_path, tiny_data), ["retry.lr_scale=0.5"])
    layout = layout_of(cfg)
    out = layout.fold("tiny", 1).dir
    for attempt, epochs in enumerate((2, 1)):
        (out / "oof").mkdir(parents=True)
        (out / "oof" / "probs.npy").write_bytes(b"maps")
        for name in ("best.pt", "last.pt"):
            (out / name).write_bytes(b"weights")
        write_log(out / "log.jsonl", [{"epoch": e} for e in range(1, epochs + 1)])
        assert retire_attempt(cfg, "tiny", 1, f"reason {attempt}") == attempt
        assert sorted(p.name for p in out.iterdir()) == [
            *(f"failed_attempt{a}.jsonl" for a in range(attempt + 1)),
            "retries.json",
        ]
    assert read_log(out / "failed_attempt1.jsonl") == [{"epoch": 1}]
    doc = json.loads((out / "retries.json").read_text())
    assert doc["policy"] == RetryPolicy.from_config(cfg).to_dict()
    assert [(f["attempt"], f["reason"], f["epochs"], f["log"]) for f in doc["failed"]] == [
        (0, "reason 0", 2, "failed_attempt0.jsonl"),
        (1, "reason 1", 1, "failed_attempt1.jsonl"),
    ]
    assert [f["lr"] for f in doc["failed"]] == [cfg["train"]["lr"], cfg["train"]["lr"] * 0.5]


def test_the_remedy_reseeds_and_scales_the_learning_rate():
    cfg = {"seed": 3, "train": {"lr": 0.01, "epochs": 5}}
    policy = RetryPolicy.default(attempts=2, lr_scale=0.5)
    assert policy.remedy(cfg, 0) is cfg
    first, second = policy.remedy(cfg, 1), policy.remedy(cfg, 2)
    assert first["train"]["lr"] == pytest.approx(0.005)
    assert second["train"]["lr"] == pytest.approx(0.0025)
    assert len({cfg["seed"], first["seed"], second["seed"]}) == 3
    assert cfg == {"seed": 3, "train": {"lr": 0.01, "epochs": 5}}  # the config is untouched
    assert RetryPolicy.default(reseed=False).remedy(cfg, 1)["seed"] == 3
    assert RetryPolicy.from_config({"retry": None}).attempts == 0  # `retry: null`: off
    assert RetryPolicy.from_config({}).attempts == defaults()["retry"]["attempts"]
    assert RetryPolicy.from_config({"retry": {"attempts": 3}}).attempts == 3
    for bad, named in (({"tries": 1}, "tries"), ({"lr_scale": 2}, "lr_scale")):
        with pytest.raises(ConfigError, match=named):
            RetryPolicy.from_config({"retry": bad})


def test_train_retrains_a_failed_fold_with_the_remedy_then_stops_when_attempts_run_out(
    tmp_path, tiny_data, monkeypatch, capsys
):
    config = write_config(tmp_path, tiny_data, epochs=1, lr=0.004)
    cfg = yaml.safe_load(config.read_text())
    cfg["retry"] = {"attempts": 1, "lr_scale": 0.5}
    config.write_text(yaml.safe_dump(cfg))
    fold = fold_path(tmp_path)

    monkeypatch.setenv("NEOPOLYP_FAIL_FOLD", "tiny:0:1")  # attempt 0 fails, attempt 1 passes
    assert run_main(config, "--fold", "0") == 0
    retries = json.loads((fold / "retries.json").read_text())
    (failed,) = retries["failed"]
    assert failed["attempt"] == 0 and "NEOPOLYP_FAIL_FOLD" in failed["reason"]
    assert failed["seed"] == 0 and failed["lr"] == pytest.approx(0.004)
    first = read_log(fold / failed["log"])
    now = read_log(fold / "log.jsonl")
    assert len(first) == len(now) == 1 and first[0]["train_loss"] != now[0]["train_loss"]
    trained = yaml.safe_load((fold / "config.yaml").read_text())
    assert trained["seed"] != 0 and trained["train"]["lr"] == pytest.approx(0.002)
    assert (fold / "best.pt").is_file() and (fold / "oof" / "probs.npy").is_file()
    # the fold still answers to the config's recipe, not the remedy's: a rerun skips it
    recipe_before = json.loads((fold / "recipe.json").read_text())["recipe"]
    assert recipe_before == fold_recipe(load_config(config), "tiny", recipe_before["split_id"])
    assert run_main(config, "--fold", "0", "--resume") == 0
    assert "skipped (complete)" in capsys.readouterr().out

    monkeypatch.setenv("NEOPOLYP_FAIL_FOLD", "tiny:1:2")  # fold 1 fails both attempts
    assert run_main(config, "--fold", "1") == 1
    err = capsys.readouterr().err
    assert "tiny fold 1 failed after 1 retrain(s)" in err and "retries.json" in err
    assert len(json.loads((fold_path(tmp_path, 1) / "retries.json").read_text())["failed"]) == 1
    # the message names the command that lets the run go on, and it does, as printed
    assert "raise retry.attempts" not in err
    hint = err.split("keep it as it is (the report then flags it): ", 1)[1].strip()
    program, argv = hint.split(" --", 1)
    assert program == "python train.py" and argv.endswith("--set retry.attempts=0")
    assert train.main(shlex.split("--" + argv)) == 0


def test_a_fold_trained_alone_under_nothing_is_kept_and_told_what_to_change(
    tmp_path, tiny_data, monkeypatch, caplog
):
    """Issue 40: `train.py --fold 0 --epochs 1` exited 1 after two retrains with other
    seeds, 'never beat predicting nothing', telling the user to raise retry.attempts. No
    other fold of the model had beaten it either, so no seed could: the fold is kept, and
    the warning names what may help (its best epoch was its last: more epochs)."""
    monkeypatch.delenv("NEOPOLYP_FAIL_FOLD", raising=False)
    config = write_config(tmp_path, tiny_data, epochs=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["retry"] = {"attempts": 2}  # the default policy
    config.write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.WARNING, logger="train"):
        assert run_main(config, "--fold", "0") == 0
    assert not (fold_path(tmp_path) / "retries.json").exists()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("tiny fold 0: best validation competition ")
    assert warning.endswith(
        "not retrained: no other trained fold of tiny beat it either, so the recipe is the "
        "limit, not the seed; it was best at its last epoch: raise train.epochs (now 1)"
    )


def test_the_pipeline_retrains_a_failed_fold_and_the_report_says_so(
    tmp_path, tiny_data, monkeypatch
):
    config = write_config(tmp_path, tiny_data, epochs=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["retry"] = {"attempts": 2}
    cfg["ensemble"] = {"models": ["tiny"], "trials": 2}
    cfg["tune"] = {"trials": 2}
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("NEOPOLYP_FAIL_FOLD", "tiny:0:1,tiny:1:0")
    assert pipeline.main(["--config", str(config), "--parallel", "2"]) == 0
    exp = tmp_path / "out" / "tiny"
    assert (exp / "tiny" / "fold0" / "failed_attempt0.jsonl").is_file()
    assert not (exp / "tiny" / "fold1" / "retries.json").exists()
    html = (exp / "report.html").read_text()
    assert "tiny fold 0 was retrained 1 time(s) after failing" in html
    assert "NEOPOLYP_FAIL_FOLD" in html
    warnings = json.loads((exp / "scores.json").read_text())["warnings"]
    assert any(w.startswith("tiny fold 0 was retrained") for w in warnings)
    # a red line of the report's first screen, above the provenance
    assert html.index("tiny fold 0 was retrained") < html.index("class='provenance'")
