"""refine.py and regions.py: region matching, crops and paste-back on hand-made masks; the
refiner fixing wrongly classed regions from a learnable cue; its decisions; no leak."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import refine
from data.atomic import write_json
from data.probstore import load_probs, save_probs
from data.reader import DataError
from decisions import SCORE_KEYS, Rule, map_stats, pick
from postprocessing import input_store
from regions import (
    FALSE_POSITIVE,
    crop_box,
    paste_region,
    predicted_regions,
    region_crop,
    true_labels,
)

SETTINGS = refine.RefineSettings(crop=24, epochs=12, batch_size=16, lr=1e-2, width=8)


@pytest.fixture(autouse=True)
def one_thread():
    """The refiner's convolutions are tiny: one thread, as refine.py runs them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def codes(class_map, on=0.8):
    """uint8 store codes putting `on` on the class of each pixel."""
    off = (1 - on) / 2
    p = np.where(np.arange(3)[:, None, None] == class_map[None], on, off)
    return np.rint(p * 255).astype(np.uint8)


def test_true_labels_by_majority_of_ground_truth_polyp_pixels():
    pred = np.zeros((20, 30), np.uint8)
    pred[2:8, 2:8] = 1  # region A: over mostly non-neoplastic truth
    pred[12:18, 2:8] = 2  # region B: over background only
    pred[2:8, 20:28] = 1  # region C: half over neoplastic truth, rest background
    target = np.zeros_like(pred)
    target[2:8, 2:4] = 1
    target[2:8, 4:8] = 2
    target[2:8, 24:28] = 1
    target[14:18, 12:16] = 2  # a polyp no region touches
    labels, regions, _ = predicted_regions(codes(pred))
    assert len(regions) == 3
    truth = true_labels(labels, len(regions), target)
    # regions A, B, C by a pixel of each
    assert [truth[labels[y, x]] for y, x in ((4, 4), (14, 4), (4, 24))] == [2, FALSE_POSITIVE, 1]
    assert truth[0] == FALSE_POSITIVE and len(truth) == 4


def test_a_tie_goes_to_neoplastic_and_corners_join_one_region():
    pred = np.zeros((10, 10), np.uint8)
    pred[2:4, 2:4] = 1
    pred[4:6, 4:6] = 1  # touches the first block at a corner: 8-connectivity joins them
    target = np.zeros_like(pred)
    target[2:4, 2:4] = 2
    target[4:6, 4:6] = 1
    labels, regions, _ = predicted_regions(codes(pred))
    assert len(regions) == 1
    assert true_labels(labels, 1, target)[1] == 1


def test_crop_box_is_square_with_margin_and_stays_inside():
    assert crop_box((10, 20, 10, 30), (100, 100), margin=0.25) == (0, 30, 5, 35)
    y0, y1, x0, x1 = crop_box((0, 4, 95, 100), (100, 100), margin=0.25, min_side=16)
    assert (y0, y1, x0, x1) == (0, 16, 84, 100)
    assert crop_box((0, 50, 0, 80), (50, 80)) == (0, 50, 0, 80)  # larger than the image


def test_crop_channels_and_paste_back_give_one_class_and_spare_other_regions():
    pred = np.zeros((40, 40), np.uint8)
    pred[5:15, 5:15] = 1
    pred[5:15, 7:10] = 2  # a class split inside one region
    pred[30:36, 30:36] = 2  # another region
    probs = codes(pred).astype(np.float32) / 255
    labels, regions, _ = predicted_regions(codes(pred))
    first = next(r for r in regions if r.box[0] < 20)
    image = np.full((40, 40, 3), 128, np.uint8)
    crop = region_crop(image, probs, labels == first.label, first.box, 16)
    assert crop.shape == (7, 16, 16)
    assert crop[6].max() == pytest.approx(1.0) and crop[6].min() == 0.0
    np.testing.assert_allclose(crop[3:6].sum(axis=0), 1.0, atol=0.02)

    out = probs.copy()
    polyp = np.ones((16, 16), np.float32)
    paste_region(out, labels, first, np.array([0.1, 0.2, 0.7]), polyp)
    cls = out.argmax(axis=0)
    assert (cls[labels == first.label] == 2).all()  # one class: the refiner's
    y0, y1, x0, x1 = first.box
    assert (cls[y0:y1, x0:x1] == 2).all()  # the refined mask may grow into background
    np.testing.assert_array_equal(out[:, 30:36, 30:36], probs[:, 30:36, 30:36])

    out = probs.copy()
    paste_region(out, labels, first, np.array([0.9, 0.05, 0.05]), polyp)
    assert (out.argmax(axis=0)[labels == first.label] == 0).all()  # a false positive goes

    out = probs.copy()  # class only: the first stage's mask stays as it was
    paste_region(out, labels, first, np.array([0.1, 0.7, 0.2]), None)
    np.testing.assert_array_equal(out.argmax(axis=0) > 0, pred > 0)
    assert (out.argmax(axis=0)[labels == first.label] == 1).all()


def test_paste_spares_a_neighbouring_region_inside_the_window():
    """Another region inside the pasted window keeps its pixels, even where the refined
    polyp probability beats its own (the paste may claim background only)."""
    pred = np.zeros((40, 40), np.uint8)
    pred[5:10, 5:20] = 1  # an L: its window covers the corner it leaves free
    pred[5:20, 5:10] = 1
    pred[14:19, 14:19] = 2  # a weak neighbour in that corner, not touching the L
    probs = codes(pred).astype(np.float32) / 255
    probs[:, 14:19, 14:19] = np.array([0.4, 0.0, 0.6], np.float32)[:, None, None]
    labels, regions, _ = predicted_regions(probs)
    ell = next(r for r in regions if labels[5, 5] == r.label)
    y0, y1, x0, x1 = ell.box
    assert y0 <= 14 and y1 >= 19 and x0 <= 14 and x1 >= 19  # the neighbour is in the window
    out = probs.copy()
    paste_region(out, labels, ell, np.array([0.02, 0.96, 0.02]), np.ones((16, 16), np.float32))
    np.testing.assert_array_equal(out[:, 14:19, 14:19], probs[:, 14:19, 14:19])
    assert (out.argmax(axis=0)[10:14, 10:14] == 1).all()  # background it may claim


def test_the_configured_margin_sets_each_regions_window():
    pred = np.zeros((64, 64), np.uint8)
    pred[24:36, 24:36] = 1  # 12 pixels: windows of 12 x (1 + 2 margin) pixels
    probs = codes(pred)[None]
    image = [np.zeros((64, 64, 3), np.uint8)]
    for margin, side in ((0.0, 16), (0.5, 24), (1.0, 36)):
        found = refine.collect_regions(
            ["a"], image, probs, None, refine.RefineSettings(margin=margin)
        )
        y0, y1, x0, x1 = found.regions[0].box
        assert (y1 - y0, x1 - x0) == (side, side), margin


class _FixedRefiner(torch.nn.Module):
    """Says every region is neoplastic with a mask covering its whole window."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        classes = torch.tensor([[-5.0, 5.0, -5.0]]).expand(len(x), 3)
        return classes, torch.full((len(x), *x.shape[-2:]), 5.0)


def test_test_maps_take_the_refined_mask_only_when_refine_json_kept_it():
    pred = np.zeros((48, 48), np.uint8)
    pred[16:26, 16:26] = 2
    probs = codes(pred)[None]
    image = [np.full((48, 48, 3), 100, np.uint8)]
    settings = refine.RefineSettings(crop=16)
    models = [_FixedRefiner()]
    class_only = refine.refine_test(models, ["a"], image, probs, settings, use_mask=False)
    np.testing.assert_array_equal(class_only[0].argmax(axis=0) > 0, pred > 0)
    assert (class_only[0].argmax(axis=0)[pred > 0] == 1).all()
    with_mask = refine.refine_test(models, ["a"], image, probs, settings, use_mask=True)
    assert (with_mask[0].argmax(axis=0) > 0).sum() > (pred > 0).sum()  # the mask grew


def cue_set(n=36, flip_rate=0.4, seed=0):
    """Images whose polyps' colour tells their class; predicted maps with the right shapes
    but some whole regions given the other class, and a few false-positive blobs."""
    rng = np.random.default_rng(seed)
    images, probs, targets = [], [], []
    for i in range(n):
        image = rng.integers(90, 110, (48, 48, 3)).astype(np.uint8)
        target = np.zeros((48, 48), np.uint8)
        pred = np.zeros_like(target)
        for cy, cx in ((12, 12), (34, 32))[: 1 + i % 2]:
            cls = int(rng.integers(1, 3))
            r = int(rng.integers(5, 9))
            yy, xx = np.ogrid[:48, :48]
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            target[disc] = cls
            image[disc] = (200, 60, 60) if cls == 1 else (60, 200, 60)
            wrong = rng.random() < flip_rate
            pred[disc] = 3 - cls if wrong else cls
        if i % 4 == 0:  # a false positive on plain background
            pred[38:43, 4:9] = int(rng.integers(1, 3))
        images.append(image)
        probs.append(codes(pred, on=0.7))
        targets.append(target)
    return [f"img{i:02d}" for i in range(n)], images, np.stack(probs), np.stack(targets)


def test_the_refiner_fixes_wrongly_classed_regions_and_beats_the_blend():
    ids, images, probs, targets = cue_set()
    folds = [i % 3 for i in range(len(ids))]
    refined, models, doc = refine.refine_oof(ids, images, probs, targets, folds, SETTINGS, seed=0)
    regions = doc["regions"]
    wrong_before = regions["n"] - regions["right_before"]
    wrong_after = regions["n"] - regions["right_after"]
    assert wrong_before >= 15
    assert wrong_after <= wrong_before // 3  # most of the wrong regions are fixed
    assert doc["vs_blend"]["chosen"] == "refined", doc["vs_blend"]["reason"]
    before, after = doc["oof_before"], doc["oof_after"]
    assert after["competition"] > before["competition"] + 0.1
    assert set(before) == set(SCORE_KEYS)
    assert [r["fold"] for r in doc["per_fold"]] == [0, 1, 2] and len(models) == 3
    # the record is what the refined maps score
    stats = refine.argmax_stats(refined, targets)
    assert pick(stats) == after
    assert doc["most_changed"] and doc["most_changed"][0]["changed_pixels"] > 0
    # the refined mask is used only where it beat the first stage's mask out of sample
    mask = doc["refined_mask"]
    assert mask["kept"] == (mask["decision"]["chosen"] == "refined mask")
    used = mask["decision"]["candidates"]["refined mask" if mask["kept"] else "class only"]
    assert used["out_of_sample"] == pick(map_stats(refined, targets, Rule().params))


def test_a_first_stage_that_is_already_right_is_not_kept():
    ids, images, probs, targets = cue_set(n=24, flip_rate=0.0)
    probs = np.stack([codes(t, on=0.7) for t in targets])  # no false positive either
    folds = [i % 3 for i in range(len(ids))]
    _, _, doc = refine.refine_oof(ids, images, probs, targets, folds, SETTINGS, seed=0)
    assert doc["oof_before"]["competition"] == 1.0
    assert doc["vs_blend"]["chosen"] == "blend"


def test_no_image_is_refined_by_a_refiner_that_trained_on_it(monkeypatch):
    ids, images, probs, targets = cue_set(n=18)
    folds = [i % 3 for i in range(len(ids))]
    trained_on: dict[int, set[str]] = {}
    refined_by: dict[str, int] = {}
    real_train, real_predict = refine.train_refiner, refine.predict_regions

    def spy_train(data, settings, seed):
        model = real_train(data, settings, seed)
        model.spy_id = len(trained_on)
        trained_on[model.spy_id] = set(data.image_ids)
        return model

    def spy_predict(models, data, batch_size=64):
        (model,) = models
        for image_id in data.image_ids:
            refined_by[image_id] = model.spy_id
        return real_predict(models, data, batch_size)

    monkeypatch.setattr(refine, "train_refiner", spy_train)
    monkeypatch.setattr(refine, "predict_regions", spy_predict)
    refine.cross_refine(ids, images, probs, targets, folds, SETTINGS)
    assert set(refined_by) == set(ids)  # every image has at least one region here
    for image_id, model in refined_by.items():
        assert image_id not in trained_on[model]
    assert all(trained_on.values())


def _store(path, split_id, kind="oof", folds=(0, 1)):
    probs = np.stack([codes(np.zeros((8, 8), np.uint8))] * 2)
    save_probs(
        path,
        ["a", "b"],
        probs,
        [(8, 8)] * 2,
        kind=kind,
        model="m",
        split_id=split_id,
        folds=list(folds),
    )
    return load_probs(path)


def test_inputs_from_another_split_are_refused(tmp_path):
    oof = _store(tmp_path / "ensemble" / "oof", "s1")
    assert refine.check_split(
        tmp_path / "folds.json", oof, _store(tmp_path / "t1", "s1", "test")
    ) == [0, 1]
    with pytest.raises(DataError, match="different fold splits"):
        refine.check_split(tmp_path / "folds.json", oof, _store(tmp_path / "t2", "s2", "test"))
    write_json(tmp_path / "folds.json", {"split_id": "s0"})
    with pytest.raises(DataError, match=r"folds\.json has 's0'"):
        refine.check_split(tmp_path / "folds.json", oof, _store(tmp_path / "t1", "s1", "test"))


def test_tune_and_submission_read_the_store_tune_chose(tmp_path):
    cfg = {"experiment": "e", "out_dir": str(tmp_path), "refine": {"enabled": True}}
    exp = tmp_path / "e"
    _store(exp / "ensemble" / "oof", "s1")
    assert input_store(cfg, "oof")[0] == exp / "ensemble" / "oof"  # no postprocess.json yet
    write_json(exp / "postprocess.json", {"source": "blend", "chosen": "blend, tuned"})
    path, why = input_store(cfg, "oof")
    assert path == exp / "ensemble" / "oof" and "blend, tuned" in why
    write_json(exp / "postprocess.json", {"source": "refined", "chosen": "refined, argmax"})
    assert input_store(cfg, "test")[0] == exp / "refine" / "test"
    assert input_store(cfg, "oof")[0] == exp / "refine" / "oof"
    write_json(exp / "postprocess.json", {"source": "other"})
    with pytest.raises(DataError, match="unknown source"):
        input_store(cfg, "oof")
    (exp / "postprocess.json").write_text("{")
    with pytest.raises(DataError, match=r"postprocess\.json"):
        input_store(cfg, "oof")
