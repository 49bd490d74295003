"""refine.py and regions.py: region matching, crops and paste-back on hand-made masks; the
refiner fixing wrongly classed regions from a learnable cue; its decisions; no leak."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

import refine
from chain.decisions import LENSES, SCORE_KEYS, Rule, map_stats, pick
from chain.records import input_store
from chain.regions import (
    CROP_CHANNELS,
    FALSE_POSITIVE,
    Region,
    crop_box,
    crop_target,
    paste_region,
    predicted_regions,
    region_crop,
    true_labels,
)
from core.config import ConfigError
from core.runtime import derive_seed
from core.settings import RefineSettings
from data.atomic import write_json
from data.probstore import load_probs, save_probs
from data.reader import DataError
from models.refiner import RegionRefiner

SETTINGS = RefineSettings.default(crop=24, epochs=12, batch_size=16, lr=1e-2, width=8)


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
            ["a"], image, probs, None, RefineSettings.default(margin=margin)
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
    settings = RefineSettings.default(crop=16)
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
    refined, models, record = refine.refine_oof(
        ids, images, probs, targets, folds, SETTINGS, seed=0
    )
    doc = record.to_dict()
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
    assert used["out_of_sample"] == pick(map_stats(refined, targets, Rule.default().params))


def test_a_first_stage_that_is_already_right_is_not_kept():
    ids, images, probs, targets = cue_set(n=24, flip_rate=0.0)
    probs = np.stack([codes(t, on=0.7) for t in targets])  # no false positive either
    folds = [i % 3 for i in range(len(ids))]
    _, _, record = refine.refine_oof(ids, images, probs, targets, folds, SETTINGS, seed=0)
    doc = record.to_dict()
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


# The tests below come from the mutation run's survivors in refine.py (docs/mutation.md).


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"crop": 20}, r"refine\.crop must be a multiple of 8, at least 16, got 20"),
        ({"crop": 8}, r"refine\.crop must be a multiple of 8, at least 16, got 8"),
        ({"epochs": 0}, r"refine\.epochs must be positive, got 0"),
        ({"cpu_threads": 0}, r"refine\.cpu_threads must be positive, got 0"),
        ({"margin": 2.5}, r"refine\.margin must be in \[0, 2\] and refine\.lr positive"),
        ({"margin": -0.1}, r"refine\.margin must be in \[0, 2\]"),
        ({"lr": 0.0}, r"refine\.margin must be in \[0, 2\] and refine\.lr positive"),
    ],
)
def test_refine_settings_refuse_values_out_of_range(changes, message):
    with pytest.raises(ConfigError, match=message):
        RefineSettings.default(**changes)


def test_refine_settings_accept_their_bounds():
    assert RefineSettings.default(crop=16, margin=2.0).margin == 2.0
    assert RefineSettings.default(margin=0.0, epochs=1, batch_size=1).epochs == 1


def test_check_split_refuses_stores_without_a_split_id_or_per_image_folds(tmp_path):
    test = _store(tmp_path / "test", "s1", "test")
    with pytest.raises(DataError, match="cannot be refined together"):
        refine.check_split(tmp_path / "folds.json", _store(tmp_path / "o0", "s2"), test)
    no_id = _store(tmp_path / "o1", None)
    with pytest.raises(DataError, match="no split id recorded"):
        refine.check_split(tmp_path / "folds.json", no_id, _store(tmp_path / "t0", None, "test"))
    for folds in (None, [0]):  # none, or not one per image
        oof = _store(tmp_path / "o2", "s1")
        oof.meta["folds"] = folds
        with pytest.raises(DataError, match="no per-image folds recorded"):
            refine.check_split(tmp_path / "folds.json", oof, test)
    oof = _store(tmp_path / "o3", "s1")
    (tmp_path / "folds.json").write_text("{")
    with pytest.raises(DataError, match=r"folds\.json: unreadable"):
        refine.check_split(tmp_path / "folds.json", oof, test)
    write_json(tmp_path / "folds.json", {"split_id": "s0"})
    with pytest.raises(DataError, match=r"predictions from another fold split cannot be refined$"):
        refine.check_split(tmp_path / "folds.json", oof, test)
    write_json(tmp_path / "folds.json", {"split_id": "s1"})
    assert refine.check_split(tmp_path / "folds.json", oof, test) == [0, 1]


def test_collect_regions_crops_each_region_from_its_maps_with_its_truth():
    pred = np.zeros((40, 40), np.uint8)
    pred[4:12, 4:14] = 1
    pred[24:34, 22:30] = 2  # a false positive
    target = np.zeros_like(pred)
    target[4:12, 4:12] = 2
    probs = codes(pred, on=0.7)[None]
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    found = refine.collect_regions(["a"], [image], probs, target[None], SETTINGS)
    labels, regions, _ = predicted_regions(probs[0], SETTINGS.margin)
    assert found.regions == regions and len(regions) == 2
    assert found.image_ids == ["a", "a"] and found.image_index.tolist() == [0, 0]
    assert found.labels.tolist() == [2, FALSE_POSITIVE]
    assert found.crops.dtype == np.float16 and found.masks.dtype == np.float16
    p = probs[0].astype(np.float32) / 255.0
    for row, region in enumerate(regions):
        crop = region_crop(image, p, labels == region.label, region.box, SETTINGS.crop)
        np.testing.assert_array_equal(found.crops[row], crop.astype(np.float16))
        mask = crop_target(target, labels, region, SETTINGS.crop)
        np.testing.assert_array_equal(found.masks[row], mask.astype(np.float16))
    # maps given as floats in [0, 1] give the same crops as their uint8 codes
    as_float = refine.collect_regions(
        ["a"], [image], probs.astype(np.float32) / 255.0, None, SETTINGS
    )
    np.testing.assert_array_equal(as_float.crops, found.crops)
    assert as_float.labels is None and as_float.masks is None  # no truth: none made up
    part = found.take(np.array([1]))
    assert part.image_ids == ["a"] and part.image_index.tolist() == [0]
    assert part.regions == [regions[1]] and part.labels.tolist() == [FALSE_POSITIVE]
    np.testing.assert_array_equal(part.crops, found.crops[1:])
    np.testing.assert_array_equal(part.masks, found.masks[1:])
    assert as_float.take(np.array([1, 0])).labels is None


def test_each_epoch_trains_every_region_under_one_of_the_eight_turns_and_a_full_cycle(
    monkeypatch,
):
    """20 regions in batches of 6: every epoch passes all of them (the last batch has 2),
    each batch under one of the 8 flips/rotations, and the one-cycle learning rate
    schedule has exactly one step per batch, so it ends where it should (also with fewer
    regions than a batch)."""
    x = torch.arange(16.0).reshape(1, 4, 4)
    symmetries = {
        tuple(torch.rot90(t, k, dims=(-2, -1)).flatten().tolist())
        for t in (x, x.flip(-1))
        for k in range(4)
    }
    assert len(symmetries) == 8
    turned = [refine._dihedral(x, code) for code in range(8)]
    assert torch.equal(turned[0], x)
    assert {tuple(t.flatten().tolist()) for t in turned} == symmetries

    rng = np.random.default_rng(0)
    n, side = 20, 16
    data = refine.RegionSet(
        [f"img{i}" for i in range(n)],
        np.arange(n),
        [Region(1, (0, side, 0, side))] * n,
        rng.random((n, CROP_CHANNELS, side, side)).astype(np.float16),
        rng.integers(0, 3, n),
        (rng.random((n, side, side)) > 0.5).astype(np.float16),
    )
    settings = RefineSettings.default(crop=side, epochs=10, batch_size=6, width=4)
    batches, schedules = [], []
    real_dihedral = refine._dihedral

    def spy_dihedral(t, code):
        if t.ndim == 4:  # the crops (the masks follow with the same code)
            batches.append((len(t), code))
        return real_dihedral(t, code)

    class SpySchedule(torch.optim.lr_scheduler.OneCycleLR):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            schedules.append(self)

    monkeypatch.setattr(refine, "_dihedral", spy_dihedral)
    monkeypatch.setattr(torch.optim.lr_scheduler, "OneCycleLR", SpySchedule)
    refine.train_refiner(data, settings, seed=0)
    sizes = [size for size, _ in batches]
    assert sizes == [6, 6, 6, 2] * settings.epochs
    assert {code for _, code in batches} == set(range(8))
    (schedule,) = schedules
    assert schedule.total_steps == len(batches) and schedule.last_epoch == len(batches)
    batches.clear()  # fewer regions than a batch: one step an epoch
    refine.train_refiner(data.take(np.arange(5)), settings, seed=0)
    assert [size for size, _ in batches] == [5] * settings.epochs
    assert schedules[1].total_steps == settings.epochs == schedules[1].last_epoch


def test_train_refiner_is_seeded_has_the_width_and_learns_the_mask_targets():
    ids, images, probs, targets = cue_set(n=12)
    data = refine.collect_regions(ids, images, probs, targets, SETTINGS)
    settings = dataclasses.replace(SETTINGS, epochs=3)
    models = [refine.train_refiner(data, settings, seed) for seed in (3, 3, 4)]

    def weights(model):
        return torch.cat([v.flatten().float() for v in model.state_dict().values()])

    assert torch.equal(weights(models[0]), weights(models[1]))  # the seed is the only source
    assert not torch.equal(weights(models[0]), weights(models[2]))
    assert models[0].enc[0][0].out_channels == settings.width

    def mask_loss(model):
        _, polyp = refine.predict_regions([model], data)
        p = np.clip(polyp, 1e-6, 1 - 1e-6)
        y = data.masks.astype(np.float32)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    untrained = RegionRefiner(CROP_CHANNELS, settings.width).eval()  # the first stage's mask
    trained = refine.train_refiner(data, SETTINGS, seed=0)
    assert mask_loss(trained) < 0.85 * mask_loss(untrained)


def test_paste_rewrites_the_regions_and_keeps_every_other_code():
    pred = np.zeros((40, 40), np.uint8)
    pred[10:20, 10:20] = 1
    probs = np.stack([codes(pred, on=0.8), codes(np.zeros_like(pred), on=0.9)])  # b: no region
    images = [np.full((40, 40, 3), 100, np.uint8)] * 2
    data = refine.collect_regions(["a", "b"], images, probs, None, SETTINGS)
    assert len(data) == 1
    out = refine.paste(probs, data, np.array([[0.1, 0.1, 0.8]], np.float32), None)
    np.testing.assert_array_equal(out[1], probs[1])
    np.testing.assert_array_equal(out[0][:, pred == 0], probs[0][:, pred == 0])
    assert (out[0].argmax(axis=0)[pred > 0] == 2).all()


def _region_set(crops, labels, boxes=None, index=None):
    n = len(crops)
    boxes = boxes or [(0, 2, 0, 2)] * n
    return refine.RegionSet(
        [f"r{i}" for i in range(n)],
        np.asarray(index if index is not None else range(n), np.int64),
        [Region(i + 1, box) for i, box in enumerate(boxes)],
        np.asarray(crops, np.float16),
        None if labels is None else np.asarray(labels, np.int64),
        None,
    )


def test_region_summary_counts_truth_and_relabelling_by_the_blends_class_under_the_mask():
    # per region: (neoplastic, non-neoplastic) probability on its 2 mask pixels and on
    # the 2 pixels outside its mask, its true label and the refiner's class
    rows = [
        ((0.6, 0.2), (0.0, 0.0), 1, 1),
        ((0.2, 0.6), (0.0, 0.0), 1, 1),
        ((0.4, 0.4), (0.0, 0.0), FALSE_POSITIVE, FALSE_POSITIVE),  # a tie: neoplastic
        ((0.1, 0.5), (0.9, 0.0), 2, 1),  # more neoplastic outside the mask only
        ((0.2, 0.7), (0.0, 0.0), 2, 2),
        ((0.7, 0.1), (0.0, 0.0), 1, 1),
        ((0.5, 0.3), (0.0, 0.0), FALSE_POSITIVE, FALSE_POSITIVE),
    ]
    crops = np.zeros((len(rows), CROP_CHANNELS, 2, 2), np.float32)
    for crop, (inside, outside, _, _) in zip(crops, rows, strict=True):
        crop[6, 0] = 1.0  # the region's mask: the first row
        crop[4:6, 0] = np.asarray(inside)[:, None]
        crop[4:6, 1] = np.asarray(outside)[:, None]
    data = _region_set(crops, [r[2] for r in rows])
    assert refine.blend_classes(data).tolist() == [1, 2, 1, 2, 2, 1, 1]
    classes = np.full((len(rows), 3), 0.1, np.float32)
    classes[np.arange(len(rows)), [r[3] for r in rows]] = 0.8
    assert refine.region_summary(data, classes) == {
        "n": 7,
        "true_false_positive": 2,
        "true_neoplastic": 3,
        "true_non_neoplastic": 2,
        "right_before": 4,
        "right_after": 6,
        "relabelled": 4,
        "removed": 2,
    }


def test_most_changed_lists_the_regions_with_most_changed_pixels_first():
    before = np.stack([codes(np.zeros((20, 20), np.uint8))] * 2)
    changed = np.zeros((2, 20, 20), np.uint8)
    changed[0, 0, :5] = 1  # 5 pixels in the first region's window
    changed[0, 10, 10:13] = 2  # 3 in the fourth's
    changed[1, 12, 12] = 1  # 1 in the third's; none in the second's
    after = np.stack([codes(c) for c in changed])
    boxes = [(0, 8, 0, 8), (0, 8, 0, 8), (10, 18, 10, 18), (10, 18, 10, 18)]
    data = _region_set(np.zeros((4, CROP_CHANNELS, 2, 2)), [1, 0, 2, 2], boxes, [0, 1, 1, 0])
    expected = [
        {"id": "a", "box": [0, 8, 0, 8], "changed_pixels": 5, "true_label": 1},
        {"id": "a", "box": [10, 18, 10, 18], "changed_pixels": 3, "true_label": 2},
        {"id": "b", "box": [10, 18, 10, 18], "changed_pixels": 1, "true_label": 2},
    ]
    assert refine.most_changed(["a", "b"], data, before, after, 2) == expected[:2]
    assert refine.most_changed(["a", "b"], data, before, after, 10) == expected
    unlabelled = _region_set(data.crops, None, boxes, [0, 1, 1, 0])
    rows = refine.most_changed(["a", "b"], unlabelled, before, after, 10)
    assert [r["true_label"] for r in rows] == [None] * 3


def _decision_maps(targets, wrong=(), mixed=(10,)):
    """Store codes of the class maps `targets`, with the class of images `wrong` swapped,
    and a third of each region of images `mixed` given the other class with less
    probability (wrong under argmax, right under the region vote of the default lens)."""
    maps = []
    for i, target in enumerate(targets):
        other = np.where(target > 0, 3 - target, 0)
        m = codes(other if i in wrong else target, on=0.8)
        if i in mixed:
            m[:, 8:20, 8:12] = codes(other[8:20, 8:12], on=0.6)
        maps.append(m)
    return np.stack(maps)


@pytest.fixture
def decision_case(monkeypatch):
    """12 images of one square polyp each, 3 folds; the fold refiners replaced by fixed
    ones (their seeds and images recorded) and the paste-back by given maps, so each
    test decides what the class-only and the refined-mask maps are."""
    targets = np.zeros((12, 32, 32), np.uint8)
    for i in range(12):
        targets[i, 8:20, 8:20] = 1 + i % 2
    trained = []

    def fixed_refiner(data, settings, seed):
        model = _FixedRefiner()
        trained.append((seed, set(data.image_ids), model))
        return model

    pasted = {}

    def given_maps(probs, data, classes, polyp):
        return pasted["class only" if polyp is None else "refined mask"].copy()

    monkeypatch.setattr(refine, "train_refiner", fixed_refiner)
    monkeypatch.setattr(refine, "paste", given_maps)
    ids = [f"img{i:02d}" for i in range(12)]
    images = [np.full((32, 32, 3), 100, np.uint8)] * 12
    folds = [i % 3 for i in range(12)]
    return ids, images, targets, folds, trained, pasted


def test_refine_oof_records_each_fold_and_the_refined_maps_under_the_lens(decision_case):
    ids, images, targets, folds, trained, pasted = decision_case
    blend = _decision_maps(targets, wrong=range(8))
    pasted["class only"] = blend  # the classes changed nothing
    pasted["refined mask"] = _decision_maps(targets)  # right everywhere
    rule = Rule.default()
    start = time.perf_counter()
    refined, models, result = refine.refine_oof(
        ids, images, blend, targets, folds, SETTINGS, seed=7, rule=rule
    )
    doc = result.to_dict()
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(refined, pasted["refined mask"])
    # each fold's refiner: its own seed from the config's, trained outside the fold
    assert [seed for seed, _, _ in trained] == [derive_seed(7, k) for k in range(3)]
    assert [images_ for _, images_, _ in trained] == [
        {i for i, f in zip(ids, folds, strict=True) if f != k} for k in range(3)
    ]
    assert models == [model for _, _, model in trained]  # the ones refine_test uses
    lens = rule.params
    for k, record in enumerate(doc["per_fold"]):
        on = np.asarray(folds) == k
        assert 0.0 <= record.pop("seconds") <= elapsed + 0.05  # rounded to 0.1 s
        assert record == {
            "fold": k,
            "train_images": 8,
            "train_regions": 8,
            "val_images": 4,
            "val_regions": 4,
            "before": pick(map_stats(blend[on], targets[on], lens)),
            "after": pick(map_stats(refined[on], targets[on], lens)),
        }
    # every map is judged after the rule's lens (here the region vote), not argmax
    by_lens = {name: pick(map_stats(m, targets, lens)) for name, m in pasted.items()}
    assert pick(map_stats(blend, targets, LENSES["argmax"])) != pick(
        map_stats(blend, targets, lens)
    )
    mask = doc["refined_mask"]
    decision = mask["decision"]
    assert mask == {"kept": True, "reason": decision["reason"], "decision": decision}
    assert decision["chosen"] == "refined mask"
    assert {n: c["out_of_sample"] for n, c in decision["candidates"].items()} == by_lens
    comparison = doc["vs_blend"]["candidates"]
    assert comparison["blend"]["out_of_sample"] == pick(map_stats(blend, targets, lens))
    assert comparison["refined"]["out_of_sample"] == by_lens["refined mask"]
    assert set(doc) == {
        "schema",
        "vs_blend",
        "decide",
        "oof_before",
        "oof_after",
        "per_fold",
        "refined_mask",
        "regions",
        "most_changed",
        "settings",
        "seconds_oof",
        "split_id",
        "seconds",
        "provenance",
        "made_from",
    }
    # the split, the stage's time, provenance and inputs are refine.run's to add
    assert (result.split_id, result.seconds, result.provenance, result.made_from) == (
        None,
        0.0,
        {},
        {},
    )
    assert doc["decide"] == rule.to_dict()
    assert doc["settings"] == dataclasses.asdict(SETTINGS)
    assert 0.0 <= doc["seconds_oof"] <= elapsed + 0.05
    # the 8 regions that changed class, capped at the report's number
    assert len(doc["most_changed"]) == refine.N_MOST_CHANGED
    assert {r["id"] for r in doc["most_changed"]} <= set(ids[:8])


def test_a_gain_within_the_noise_keeps_the_first_stages_mask_and_the_blend(decision_case):
    """Better on one image of 12 only: neither the refined mask over the class-only maps
    nor the refined maps over the blend clear the noise."""
    ids, images, targets, folds, _, pasted = decision_case
    blend = _decision_maps(targets, wrong=(0, 1))
    pasted["class only"] = _decision_maps(targets, wrong=(0,))
    pasted["refined mask"] = _decision_maps(targets)
    refined, _, record = refine.refine_oof(ids, images, blend, targets, folds, SETTINGS)
    doc = record.to_dict()
    np.testing.assert_array_equal(refined, pasted["class only"])
    mask = doc["refined_mask"]
    assert not mask["kept"] and mask["decision"]["chosen"] == "class only"
    assert mask["decision"]["steps"][0]["gain"] > 0  # better, but not beyond the noise
    assert doc["vs_blend"]["chosen"] == "blend"
    assert doc["vs_blend"]["steps"][0]["gain"] > 0
    lens = Rule.default().params
    kept = pick(map_stats(pasted["class only"], targets, lens))
    assert doc["vs_blend"]["candidates"]["refined"]["out_of_sample"] == kept
    on = np.asarray(folds) == 0  # image 0, the one the refined mask would change
    assert doc["per_fold"][0]["after"] == pick(
        map_stats(pasted["class only"][on], targets[on], lens)
    )
