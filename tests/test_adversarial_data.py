"""Data identity (issue 39, items 2, 3 and 11): what a stage trained or scored on is the
bytes of the training images and masks, not their ids; ids are unique across train and
test; the pipeline reads the test tree infer.py reads or refuses it by name; a bad
`test_gt/` fails before training; compare refuses a pair scored against other masks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import compare
import pipeline
import train
from chain.stamps import digest
from core.runtime import Dist
from core.settings import layout_of
from data.cache import prepare
from data.check import check_dataset
from data.prepare import prepare_train_data
from data.probstore import load_probs
from data.reader import DataError, list_image_tree, list_test, list_train
from tests.trainkit import write_config
from training.recipe import stale_training_data
from workflow.stages import STAGES, Plan

CPU = Dist(rank=0, world_size=1, device=torch.device("cpu"))


def _config(root: Path, data_dir: Path) -> Path:
    """One light model, one epoch, refinement on: every stage that reads masks runs."""
    path = write_config(root, data_dir, epochs=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["ensemble"] = {"models": ["tiny"], "trials": 3, "objective": "competition"}
    cfg["tune"] = {"trials": 3, "objective": "competition"}
    cfg["refine"] = {"enabled": True, "crop": 16, "epochs": 2, "batch_size": 8, "width": 4}
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def _logged() -> Iterator[list[str]]:
    """The INFO and higher log lines of the block (a module fixture has no caplog)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _run(config: Path, *extra: str) -> tuple[list[str], str]:
    """pipeline.py -v on `config`: its log lines and its printed output, the stages' own
    included; it must succeed."""
    out = io.StringIO()
    with _logged() as lines, contextlib.redirect_stdout(out):
        assert pipeline.main(["--config", str(config), "-v", *extra]) == 0
    return lines, out.getvalue()


def _stages_run(printed: str) -> set[str]:
    """The stages after training that ran, by the "Stages of this call" table."""
    table = printed.split("Stages of this call")[1].strip().split("\n\n")[0]
    rows = [line.rsplit(None, 1) for line in table.splitlines()[1:]]
    return {name.strip() for name, ran in rows if ran != "reused" and not name.startswith("train")}


def _shift_mask(path: Path) -> None:
    """The polyps moved 6 px to the right, same classes: a cleaned mask."""
    mask = cv2.imread(str(path))
    assert cv2.imwrite(str(path), np.roll(mask, 6, axis=1))


def _flip_image(path: Path) -> None:
    assert cv2.imwrite(str(path), cv2.flip(cv2.imread(str(path)), 1))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A finished one-model experiment on a private copy of the tiny data (read-only)."""
    root = tmp_path_factory.mktemp("finished")
    data = Path(shutil.copytree(tiny_data, root / "data"))
    _run(_config(root, data))
    return root


def _copy(finished: Path, root: Path) -> Path:
    """The finished experiment and its data under `root`; the config of the copy."""
    data = Path(shutil.copytree(finished / "data", root / "data"))
    shutil.copytree(finished / "out" / "tiny", root / "out" / "tiny")
    return _config(root, data)


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory, finished: Path) -> dict:
    """A copy of `finished` rerun after one training mask was cleaned and one training
    image replaced, both in fold 0's validation images (so only fold 1 trained on them),
    then rerun once more unchanged."""
    root = tmp_path_factory.mktemp("edited")
    config = _copy(finished, root)
    folds = json.loads((root / "out" / "tiny" / "folds.json").read_text())["folds"]
    samples = {s.id: s for s in list_train(root / "data")}
    mask_id, image_id = sorted(i for i, k in folds.items() if k == 0)[:2]
    _shift_mask(samples[mask_id].mask)
    _flip_image(samples[image_id].image)
    lines, printed = _run(config)
    again_lines, again = _run(config)
    return {
        "root": root,
        "folds": folds,
        "mask": samples[mask_id].mask,
        "image": samples[image_id].image,
        "lines": lines,
        "ran": _stages_run(printed),
        "printed": printed,
        "again_lines": again_lines,
        "again": _stages_run(again),
    }


def test_an_edited_training_file_retrains_exactly_the_folds_that_trained_on_it(edited):
    """Issue 39 item 2: the rerun named the files and retrained fold 1, kept fold 0, and
    reran every stage after training; the retrained fold records the new bytes."""
    image, mask = edited["image"], edited["mask"]
    line = (
        "tiny fold 1: retraining, its training data changed since it trained: "
        f"1 image (train/{image.name}) and 1 mask (train_gt/{mask.name})"
    )
    assert line in edited["lines"], edited["lines"]
    assert not any(x.startswith("tiny fold 0: retraining") for x in edited["lines"])
    assert "tiny fold 1: best competition" in edited["printed"]
    assert "(1 epochs)" in edited["printed"].split("tiny fold 1: best")[1].splitlines()[0]
    assert "skipped (complete)" in edited["printed"].split("tiny fold 0: best")[1].splitlines()[0]
    assert {"predict tiny", "ensemble", "refine", "tune"} <= edited["ran"], edited["ran"]
    recipe = json.loads((edited["root"] / "out/tiny/tiny/fold1/recipe.json").read_text())
    assert recipe["trained_on"]["masks"][mask.stem] == _sha(mask)
    assert recipe["trained_on"]["images"][image.stem] == _sha(image)
    # fold 0 did not train on them: its record is of the other training images
    recipe0 = json.loads((edited["root"] / "out/tiny/tiny/fold0/recipe.json").read_text())
    assert mask.stem not in recipe0["trained_on"]["masks"]
    # and once retrained, nothing is stale: the next call trains and reruns nothing
    assert not any("retraining" in x for x in edited["again_lines"])
    assert not edited["again"] & {"predict tiny", "ensemble", "refine", "tune"}, edited["again"]


def test_a_replaced_validation_image_is_predicted_again_not_read_from_the_fold(edited, finished):
    """The fold that validated on the replaced image was kept (it did not train on it),
    but its out-of-fold map comes from the new image, not the fold's stored one."""
    before = load_probs(finished / "out" / "tiny" / "tiny" / "oof")
    after = load_probs(edited["root"] / "out" / "tiny" / "tiny" / "oof")
    replaced = edited["image"].stem
    for i in (i for i, k in edited["folds"].items() if k == 0):
        same = np.array_equal(before.raw[before.ids.index(i)], after.raw[after.ids.index(i)])
        assert same == (i != replaced), i


def test_compare_refuses_experiments_trained_on_other_masks(edited, finished, capsys):
    """Issue 39 item 11: the same ids, one cleaned mask: no difference is printed."""
    assert compare.main([str(finished / "out" / "tiny"), str(edited["root"] / "out/tiny")]) == 0
    pairs = capsys.readouterr().out.split("second - first)")[1]
    assert "not comparable: other training masks under the same ids" in pairs
    assert f"1 differ (e.g. {edited['mask'].stem})" in pairs
    assert "within the noise" not in pairs and "real" not in pairs.split()


def test_the_stages_that_score_oof_maps_follow_the_training_masks(finished, tmp_path):
    """ensemble, refine and tune compare OOF maps with the masks: a cleaned mask changes
    their inputs' digest even where no map changed; predict's does not move."""
    data = Path(shutil.copytree(finished / "data", tmp_path / "data"))
    cfg = yaml.safe_load(_config(tmp_path, data).read_text())
    layout = layout_of({**cfg, "out_dir": str(finished / "out")})
    stages = {s.name: s for s in STAGES}

    def digests() -> dict[str, str]:
        plan = Plan(cfg, layout, ["tiny"], [], [])
        return {
            name: digest(stages[name].inputs(plan, "tiny"))
            for name in ("predict", "ensemble", "refine", "tune")
        }

    before = digests()
    _shift_mask(list_train(data)[0].mask)
    after = digests()
    assert [n for n in before if before[n] != after[n]] == ["ensemble", "refine", "tune"]


def test_train_py_by_hand_retrains_a_fold_on_changed_data_and_never_resumes_it(
    tmp_path, tiny_data_copy, caplog
):
    """A finished fold extended with --resume after one of its training masks changed is
    trained again from scratch, with the reason; a fold from before the record keeps its
    weights, with a warning, and is watched from then on."""
    caplog.set_level(logging.INFO)
    config = write_config(tmp_path, tiny_data_copy, epochs=1)
    argv = ["--config", str(config), "--model", "tiny", "--fold", "0"]
    assert train.main(argv) == 0
    cfg = yaml.safe_load(config.read_text())
    run = layout_of(cfg).fold("tiny", 0)
    data = prepare_train_data(cfg, CPU)
    trained = data.folds.train_ids(0)[0]
    mask = data.samples[trained].mask
    _shift_mask(mask)
    caplog.clear()
    assert train.main([*argv, "--resume", "--epochs", "2"]) == 0
    line = (
        "tiny fold 0: retraining, its training data changed since it trained: "
        f"1 mask (train_gt/{mask.name})"
    )
    assert line in caplog.messages
    assert not any(m.startswith("tiny fold 0: resuming") for m in caplog.messages)
    history = [json.loads(x) for x in run.log.read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert json.loads(run.recipe.read_text())["trained_on"]["masks"][trained] == _sha(mask)

    # a fold trained before recipe.json recorded its files: recorded now, then followed
    doc = json.loads(run.recipe.read_text())
    del doc["trained_on"]
    run.recipe.write_text(json.dumps(doc))
    data = prepare_train_data(cfg, CPU)
    caplog.clear()
    assert stale_training_data(run, data, "tiny", 0) is None
    assert "train.py --model tiny --fold 0 --force" in caplog.text
    assert "trained_on" in json.loads(run.recipe.read_text())
    _shift_mask(mask)
    note = stale_training_data(run, prepare_train_data(cfg, CPU), "tiny", 0)
    assert note == line


def test_the_cache_records_the_sha256_of_the_files_it_read(tiny_data, tmp_path):
    """What a fold's identity is made of: the bytes' sha256, the same on a cache hit."""
    samples = list_train(tiny_data)[:3] + list_test(tiny_data)[:1]
    for _ in range(2):  # processed, then reused
        items = prepare(samples, (32, 32), tmp_path / "cache", workers=1)
        for sample, item in zip(samples, items, strict=True):
            assert item.image_sha256 == _sha(sample.image)
            assert item.mask_sha256 == (None if sample.mask is None else _sha(sample.mask))


def test_a_test_image_with_a_training_images_id_is_refused_before_any_work(
    tmp_path, tiny_data_copy, capsys
):
    """Issue 39 item 3: the cache and every map are keyed by id; both files are named."""
    shutil.rmtree(tiny_data_copy / "test_gt")  # as in the competition's data
    config = _config(tmp_path, tiny_data_copy)
    train_image = list_train(tiny_data_copy)[0].image
    clash = tiny_data_copy / "test" / train_image.name
    clash.write_bytes(list_test(tiny_data_copy)[0].image.read_bytes())
    assert pipeline.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"one id {train_image.stem!r} for a training and a test image" in err
    assert str(train_image) in err and str(clash) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert train.main(["--config", str(config), "--model", "tiny", "--fold", "0"]) == 2
    assert str(clash) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    report = check_dataset(tiny_data_copy, workers=1)
    assert any(str(clash) in p for p in report.problems)


def test_a_subfolder_of_test_images_is_refused_by_name(tmp_path, tiny_data_copy, capsys):
    """Issue 39 item 11: infer.py reads test/video1/ (ids "video1/..."), the stages would
    not: the pipeline names the subfolder before any work instead of ignoring it."""
    config = _config(tmp_path, tiny_data_copy)
    first = list_test(tiny_data_copy)[0].image
    sub = tiny_data_copy / "test" / "video1"
    sub.mkdir()
    shutil.copy(first, sub / "0001.jpeg")
    (tiny_data_copy / "test" / ".cache").mkdir()  # hidden folders stay ignored, as infer does
    shutil.copy(first, tiny_data_copy / "test" / ".cache" / "x.jpeg")
    assert "video1/0001" in dict(list_image_tree(tiny_data_copy / "test"))
    assert pipeline.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{sub}: a subfolder of test images" in err and ".cache" not in err
    assert not (tmp_path / "out").exists()
    assert any(str(sub) in p for p in check_dataset(tiny_data_copy, workers=1).problems)
    with pytest.raises(DataError, match="video1"):
        list_test(tiny_data_copy)


@pytest.mark.parametrize("damage", ["unpaired", "truncated"])
def test_a_bad_test_gt_file_fails_before_training(tmp_path, tiny_data_copy, capsys, damage):
    """Issue 39 item 11: only the report reads test_gt/, after the submission; the
    pipeline's preflight names the file before the experiment folder exists."""
    config = _config(tmp_path, tiny_data_copy)
    gt = sorted((tiny_data_copy / "test_gt").iterdir())[0]
    bad = gt.with_name("extra" + gt.suffix) if damage == "unpaired" else gt
    bad.write_bytes(gt.read_bytes()[: 300 if damage == "truncated" else None])
    assert pipeline.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
