"""pipeline.py end to end on tiny data: every artefact, a valid submission, and a second
call that redoes nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import pipeline
import refine
import report
from chain.evaluation import GAIN, parse_interval
from chain.reporting import read_submission
from core.metrics import class_stats, scores_from_stats
from data.probstore import blend as blend_maps
from data.probstore import load_probs, save_probs
from data.reader import list_test, list_test_gt, load_mask
from data.submission import check_submission
from postprocess import PostprocessParams, class_maps
from tests.trainkit import demo_model, write_config
from workflow import stages

TEST_TABLE = "Test set (original size, test_gt/)"


def _config(tmp_path, tiny_data):
    path = write_config(tmp_path, tiny_data, epochs=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["models"]["tiny2"] = demo_model()
    cfg["ensemble"] = {"models": ["tiny", "tiny2"], "trials": 3, "objective": "competition"}
    cfg["tune"] = {"trials": 3, "objective": "competition"}
    cfg["refine"] = {"enabled": True, "crop": 16, "epochs": 2, "batch_size": 8, "width": 4}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data) -> Path:
    """`_config`'s experiment run to the end once, as `--parallel 1` runs it (one thread,
    train.cpu_threads the default), for the tests below to start from. Read-only: each test
    works on its own copy (`_copy`)."""
    root = tmp_path_factory.mktemp("finished")
    config = _config(root, tiny_data)
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["cpu_threads"] = None  # the default: what --parallel used to change
    config.write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert pipeline.main(["--config", str(config)]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def _copy(finished: Path, root: Path, data: Path) -> Path:
    """The finished experiment copied under `root`, on `data`: the copy's config. Its first
    pipeline call reruns the report alone (the paths moved)."""
    shutil.copytree(finished / "out", root / "out")
    cfg = yaml.safe_load((finished / "tiny.yaml").read_text())
    cfg.update(data_dir=str(data), out_dir=str(root / "out"))
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def _artefacts(exp):
    return sorted(
        [
            *exp.glob("*/fold*/best.pt"),
            *exp.glob("*/fold*/last.pt"),
            *exp.glob("*/oof/meta.json"),
            *exp.glob("*/test/meta.json"),
            exp / "ensemble" / "weights.json",
            exp / "refine" / "refine.json",
            exp / "postprocess.json",
        ]
    )


COUNT_STAGE = """
import argparse, json
from core.config import add_config_arguments, resolve_cli_config
from core.paths import Layout
from core.settings import layout_of

def parser():
    p = argparse.ArgumentParser(description="counts its runs")
    add_config_arguments(p)
    return p

def main(argv):
    layout = layout_of(resolve_cli_config(parser().parse_args(argv)))
    out = layout.root / "count.json"
    runs = json.loads(out.read_text())["runs"] if out.exists() else 0
    out.write_text(json.dumps({"runs": runs + 1, "tuned": layout.postprocess.read_text()}))
    return 0
"""


def add_count_stage(tmp_path, monkeypatch) -> Path:
    """A new stage, added as the issue asks: its script and one table entry. It reads
    postprocess.json and writes count.json, so it reruns only when tune's output changes."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "count.py").write_text(COUNT_STAGE)
    monkeypatch.syspath_prepend(str(scripts))
    import count

    entry = stages.Stage(
        "count",
        count.parser,
        argv=lambda plan, _: list(plan.common),
        outputs=lambda plan, _: [plan.layout.root / "count.json"],
        inputs=lambda plan, _: [plan.layout.postprocess],
    )
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES[:-2], entry, *stages.STAGES[-2:]))
    return tmp_path / "out" / "tiny" / "count.json"


@pytest.mark.slow(70)
def test_pipeline_runs_end_to_end_then_skips_everything(
    finished, tmp_path, tiny_data, capsys, monkeypatch
):
    """The finished run has every artefact and a valid submission; a new stage runs once,
    then only when its input changes; a rerun redoes nothing, a changed setting what
    depends on it."""
    config = _copy(finished, tmp_path, tiny_data)
    counted = add_count_stage(tmp_path, monkeypatch)
    assert pipeline.main(["--config", str(config)]) == 0
    assert json.loads(counted.read_text())["runs"] == 1
    capsys.readouterr()
    exp = tmp_path / "out" / "tiny"
    logged = (exp / "logs" / "pipeline.log").read_text()  # the stages' own output
    assert "Test set (original size, test_gt/)" in logged and "blend" in logged
    assert check_submission(exp / "submission.csv", tiny_data) == []
    html = (exp / "report.html").read_text()
    assert "Training curves" in html and "Worst out-of-fold cases" in html
    assert "data:image/png;base64," in html
    tables = json.loads((exp / "scores.json").read_text())["tables"]
    test_rows = tables[TEST_TABLE]
    tuned = json.loads((exp / "postprocess.json").read_text())
    expected = {
        "predict nothing",
        "tiny",
        "tiny2",
        "blend, equal weights",
        "blend, tuned weights",
        "refined",
        f"submission ({tuned['source']} maps)",
    }
    assert {r["model"] for r in test_rows} == expected
    assert all(0.0 <= r["competition"] <= 1.0 for r in test_rows)
    # The baseline row, recomputed by hand: a row (image x class) scores 1 when its class
    # is absent from the ground truth and 0 otherwise.
    masks = [load_mask(s.mask) for s in list_test_gt(tiny_data)]
    empty_rows = sum(int(not (m == c).any()) for m in masks for c in (1, 2))
    assert test_rows[0]["model"] == "predict nothing"
    assert test_rows[0]["competition"] == pytest.approx(empty_rows / (2 * len(masks)))

    artefacts = _artefacts(exp)
    # 2 models x 2 folds x 2 checkpoints, 4 x (oof, test) stores (models, blend, refined),
    # weights, refine.json, postprocess.json
    assert len(artefacts) == 8 + 8 + 3
    refined = json.loads((exp / "refine" / "refine.json").read_text())
    assert refined["split_id"] == load_probs(exp / "ensemble" / "oof").split_id
    assert {"vs_blend", "oof_before", "oof_after", "per_fold", "refined_mask"} <= set(refined)
    assert tuned["sources"] == ["blend", "refined"] and tuned["source"] in tuned["sources"]
    assert tuned["chosen"].startswith(tuned["source"] + ", ")
    assert {r["model"] for r in tables["Out-of-fold (working resolution)"]} >= {
        "refined" if tuned["source"] == "refined" else "refined (not used)"
    }
    assert "Region refinement: " in html
    # the submission holds exactly the chain the decisions recorded: the chosen store's
    # test maps with the chosen parameters
    store = exp / ("refine" if tuned["source"] == "refined" else "ensemble") / "test"
    chain = dict(class_maps(load_probs(store), PostprocessParams.from_dict(tuned["params"])))
    assert read_submission(exp / "submission.csv", sizes_of(tiny_data)).keys() == chain.keys()
    for image_id, maps in read_submission(exp / "submission.csv", sizes_of(tiny_data)).items():
        np.testing.assert_array_equal(maps, chain[image_id])
    submitted = next(r for r in test_rows if r["role"] == "submission")
    assert submitted["competition"] == pytest.approx(
        _competition_by_hand(store, tiny_data, tuned["params"])
    )
    # every chain's paired gain over the submission, with its interval around it
    for row in test_rows[1:-1]:
        gain, low, high = parse_interval(row[GAIN])
        assert gain == pytest.approx(row["competition"] - submitted["competition"], abs=1e-4)
        assert low <= gain <= high
    notes = json.loads((exp / "scores.json").read_text())["notes"]
    assert any(f"paired bootstrap over the {len(masks)} test images" in n for n in notes)
    # report.py alone rebuilds the report and the tables from the artefacts
    scores = (exp / "scores.json").read_text()
    (exp / "report.html").unlink()
    (exp / "scores.json").unlink()
    assert report.main(["--config", str(config)]) == 0
    assert "Test set (original size, test_gt/)" in capsys.readouterr().out
    assert (exp / "scores.json").read_text() == scores
    assert "Training curves" in (exp / "report.html").read_text()
    before = {p: p.stat().st_mtime_ns for p in artefacts}
    assert pipeline.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in artefacts} == before
    ran = _stages_run(out)
    assert not any(s.startswith(("predict", "ensemble", "refine", "tune", "count")) for s in ran)
    assert json.loads(counted.read_text())["runs"] == 1

    # The test set's "post-processed" rows use the tuned parameters: here, hand-set ones
    # in a postprocess.json that is still up to date, so tune.py does not rerun.
    tuned_file = exp / "postprocess.json"
    tuned = json.loads(tuned_file.read_text())
    tuned["params"] = PostprocessParams(fg_threshold=0.05, min_area_frac=0.01).to_dict()
    tuned_file.write_text(json.dumps(tuned))
    assert pipeline.main(["--config", str(config)]) == 0
    ran = _stages_run(capsys.readouterr().out)
    assert "tune" not in ran
    # ...but the new stage reads postprocess.json, whose bytes changed
    assert "count" in ran and json.loads(counted.read_text())["runs"] == 2
    rows = json.loads((exp / "scores.json").read_text())["tables"][TEST_TABLE]
    blend = {r["variant"]: r for r in rows if r["model"] == "blend, equal weights"}
    equal = exp / "equal_test"
    weights = json.loads((exp / "ensemble" / "weights.json").read_text())["candidates"]
    test_stores = [load_probs(exp / m / "test") for m in ("tiny", "tiny2")]
    save_probs(
        equal,
        test_stores[0].ids,
        blend_maps(test_stores, weights["equal"]["weights"]),
        test_stores[0].orig_sizes,
        kind="test",
        model="equal",
    )
    by_hand = _competition_by_hand(equal, tiny_data, tuned["params"])
    assert blend["submitted post-processing"]["competition"] == pytest.approx(by_hand)
    assert blend["argmax"]["competition"] != pytest.approx(by_hand)

    # a changed setting reruns the stage that depends on it, and what follows, not training
    assert pipeline.main(["--config", str(config), "--set", "tune.trials=4"]) == 0
    ran = _stages_run(capsys.readouterr().out)
    assert "tune" in ran and not any(s.startswith(("predict", "ensemble")) for s in ran)
    # the new stage follows its input: tune wrote another postprocess.json
    assert "count" in ran and json.loads(counted.read_text())["runs"] == 3
    assert json.loads(counted.read_text())["tuned"] == tuned_file.read_text()
    assert pipeline.main(["--config", str(config), "--set", "predict.tta=hflip"]) == 0
    ran = _stages_run(capsys.readouterr().out)
    assert {"predict tiny", "predict tiny2", "ensemble", "refine", "tune"} <= ran
    assert load_probs(exp / "tiny" / "oof").meta["tta"] == "hflip"
    assert all(p.stat().st_mtime_ns == before[p] for p in exp.glob("*/fold*/*.pt"))
    # another model list reruns the blend, although every model store is older than it
    hflip_tiny = ["--set", "predict.tta=hflip", "--set", "ensemble.models=[tiny]"]
    assert pipeline.main(["--config", str(config), *hflip_tiny]) == 0
    ran = _stages_run(capsys.readouterr().out)
    assert "ensemble" in ran and not any(s.startswith("predict") for s in ran), ran
    assert json.loads((exp / "ensemble" / "weights.json").read_text())["models"] == ["tiny"]
    assert load_probs(exp / "ensemble" / "test").meta["models"] == ["tiny"]


def _competition_by_hand(store_dir: Path, data_dir: Path, params: dict) -> float:
    """Competition score of a test store post-processed with `params`, from `metrics`."""
    gt = {s.id: load_mask(s.mask) for s in list_test_gt(data_dir)}
    ids, preds = zip(*class_maps(load_probs(store_dir), PostprocessParams(**params)), strict=True)
    return scores_from_stats(class_stats(list(preds), [gt[i] for i in ids]))["competition"]


def sizes_of(data_dir: Path) -> dict[str, Path]:
    """Test id -> image file, what `reporting.read_submission` decodes sizes from."""
    return {s.id: s.image for s in list_test(data_dir)}


def _stages_run(out: str) -> set[str]:
    """The stages after training that ran, by the "Stages of this call" table: every stage
    has a row, with its seconds when the pipeline found it stale, however fast it was, and
    `reused` otherwise."""
    table = out.split("Stages of this call")[1].strip().split("\n\n")[0]
    rows = [line.rsplit(None, 1) for line in table.splitlines()[1:]]
    return {name.strip() for name, ran in rows if ran != "reused" and not name.startswith("train")}


def test_a_bad_config_fails_before_any_stage(tmp_path, tiny_data, capsys):
    config = _config(tmp_path, tiny_data)
    assert pipeline.main(["--config", str(config), "--set", "ensemble.models=[nope]"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny").exists()


def test_storage_is_passed_to_the_optuna_stages_only(tmp_path, tiny_data, monkeypatch):
    config = _config(tmp_path, tiny_data)
    calls = []

    def run_stage(name, main, argv):
        calls.append((name, list(argv)))
        return 0.0

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    assert pipeline.main(["--config", str(config), "--storage", url]) == 0
    assert {"train", "ensemble", "tune", "postprocess"} <= {name for name, _ in calls}
    for name, argv in calls:
        searched = name in ("ensemble", "tune")
        assert ("--storage" in argv) == searched, (name, argv)
        assert not searched or argv[argv.index("--storage") + 1] == url


def test_a_bad_storage_fails_before_any_stage(tmp_path, tiny_data, capsys):
    config = _config(tmp_path, tiny_data)
    assert pipeline.main(["--config", str(config), "--storage", "nosuchdb://u:secret@h/db"]) == 2
    err = capsys.readouterr().err
    assert "optuna storage" in err and "secret" not in err
    assert not (tmp_path / "out" / "tiny").exists()


@pytest.mark.slow(100)
def test_the_same_command_writes_the_same_bytes_whatever_the_parallelism(
    finished, tmp_path, tiny_data, capsys
):
    """--parallel 1 or 2, loader workers or none, other thread counts in the pipeline
    process: the same config gives byte-identical stores, decisions and submission."""
    config = tmp_path / "tiny.yaml"
    cfg = yaml.safe_load((finished / "tiny.yaml").read_text())
    config.write_text(yaml.safe_dump({**cfg, "out_dir": str(tmp_path / "out")}))
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        torch.set_num_threads(2)  # as a machine with more cores would start the process
        cv2.setNumThreads(2)
        par = ["--config", str(config), "--parallel", "2", "--set", "data.num_workers=1"]
        assert pipeline.main(par) == 0
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    assert "train (parallel)" in capsys.readouterr().out
    seq, par = finished / "out" / "tiny", tmp_path / "out" / "tiny"
    assert len(list((par / "logs").glob("train_*_fold*.log"))) == 4
    stores = sorted(p.relative_to(seq) for p in seq.rglob("probs.npy"))
    assert len(stores) == 4 + 4 + 2 + 2  # folds' OOF, models' oof and test, blend, refined
    for name in [*stores, Path("submission.csv")]:
        assert (seq / name).read_bytes() == (par / name).read_bytes(), name
    for name, key in (("ensemble/weights.json", "weights"), ("postprocess.json", "params")):
        assert (
            json.loads((seq / name).read_text())[key] == json.loads((par / name).read_text())[key]
        )


def test_later_stage_settings_and_test_images_are_checked_before_training(
    tmp_path, tiny_data_copy, capsys
):
    config = _config(tmp_path, tiny_data_copy)
    for bad, named in (
        ("predict.tta=flipp", "flipp"),
        ("ensemble.trials=abc", "ensemble.trials"),
        ("tune.objective=dice", "tune.objective"),
        ("train.loss.ce_wieght=1", "ce_wieght"),
    ):
        assert pipeline.main(["--config", str(config), "--set", bad]) == 2
        assert named in capsys.readouterr().err
    test_image = sorted((tiny_data_copy / "test").iterdir())[0]
    test_image.write_bytes(test_image.read_bytes()[:300])
    assert pipeline.main(["--config", str(config)]) == 2
    assert test_image.name in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny").exists()


@pytest.mark.slow(70)
def test_reruns_follow_the_bytes_of_inputs_and_settings_not_the_clock(
    finished, tmp_path, tiny_data_copy, capsys, monkeypatch
):
    """A restored or copied folder (file times an hour ahead), a changed refine setting,
    a replaced and an added test image: each reruns exactly what depends on it, and the
    refined test maps follow refine.json's decision on the refined mask."""
    config = _copy(finished, tmp_path, tiny_data_copy)
    run = ["--config", str(config)]
    assert pipeline.main(run) == 0
    capsys.readouterr()
    exp = tmp_path / "out" / "tiny"
    ahead = time.time() + 3600
    for path in exp.rglob("*"):
        os.utime(path, (ahead, ahead))
    assert pipeline.main([*run, "--set", "predict.tta=hflip"]) == 0
    ran = _stages_run(capsys.readouterr().out)
    assert {"predict tiny", "predict tiny2", "ensemble", "refine", "tune"} <= ran, ran
    assert load_probs(exp / "ensemble" / "test").meta["provenance"]["time"] == max(
        load_probs(exp / m / "test").meta["provenance"]["time"] for m in ("ensemble", "tiny")
    )

    # the refined mask not kept (forced): the test maps get the refined classes only
    used = []
    decide, refine_test = refine.refine_oof, refine.refine_test

    def class_only(*args, **kwargs):
        refined, models, doc = decide(*args, **kwargs)
        mask = dataclasses.replace(doc.refined_mask, kept=False)
        return refined, models, dataclasses.replace(doc, refined_mask=mask)

    def spy(*args):
        used.append(args[-1])
        return refine_test(*args)

    monkeypatch.setattr(refine, "refine_oof", class_only)
    monkeypatch.setattr(refine, "refine_test", spy)
    hflip = [*run, "--set", "predict.tta=hflip"]
    assert pipeline.main([*hflip, "--set", "refine.epochs=3"]) == 0
    ran = _stages_run(capsys.readouterr().out)
    assert "refine" in ran and not any(s.startswith(("predict", "ensemble")) for s in ran), ran
    assert "tune" in ran  # it reads the refined maps, which changed
    assert used == [False]
    blend = load_probs(exp / "ensemble" / "test").raw.argmax(axis=1) > 0
    refined = load_probs(exp / "refine" / "test").raw.argmax(axis=1) > 0
    assert not (refined & ~blend).any()  # class only: no pixel joins the polyps
    monkeypatch.undo()

    # a replaced test image is predicted again, an added one too
    tests = list_test(tiny_data_copy)
    first, second = tests[0], tests[1]
    before = load_probs(exp / "ensemble" / "test")
    row = before.ids.index(first.id)
    old_map = np.array(before.raw[row])
    first.image.write_bytes(second.image.read_bytes())
    assert pipeline.main([*hflip, "--set", "refine.epochs=3"]) == 0
    ran = _stages_run(capsys.readouterr().out)
    assert {"predict tiny", "predict tiny2", "ensemble", "refine", "tune"} <= ran, ran
    after = load_probs(exp / "ensemble" / "test")
    assert not np.array_equal(after.raw[after.ids.index(first.id)], old_map)
    gt = next(s.mask for s in list_test_gt(tiny_data_copy) if s.id == first.id)
    gt.with_name("f" * 32 + gt.suffix).write_bytes(gt.read_bytes())  # the demo's scoring
    added = first.image.with_name("f" * 32 + first.image.suffix)
    added.write_bytes(first.image.read_bytes())
    assert pipeline.main([*hflip, "--set", "refine.epochs=3"]) == 0
    assert {"predict tiny", "predict tiny2"} <= _stages_run(capsys.readouterr().out)
    assert "f" * 32 in load_probs(exp / "ensemble" / "test").ids
    assert check_submission(exp / "submission.csv", tiny_data_copy) == []
