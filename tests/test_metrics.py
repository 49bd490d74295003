import numpy as np
import pytest
import segmentation_models_pytorch.metrics as smpm
import torch

from core.metrics import class_stats, dice_scores, scores_from_stats


def test_both_empty_scores_one_and_one_empty_scores_zero():
    target = np.zeros((1, 4, 4), np.uint8)
    pred = np.zeros((1, 4, 4), np.uint8)
    s = dice_scores(pred, target)
    assert s["competition"] == 1.0
    assert s["dice_neo"] == s["dice_non"] == s["dice_seg"] == 1.0

    target[0, 0, 0] = 1  # neo present, predicted empty; non absent everywhere
    s = dice_scores(pred, target)
    assert s["competition_neo"] == 0.0
    assert s["competition_non"] == 1.0
    assert s["competition"] == 0.5
    assert s["dice_neo"] == 0.0 and s["dice_seg"] == 0.0 and s["dice_non"] == 1.0


def test_partial_overlap_by_hand():
    # image 0: target neo = 4 px (top-left 2x2), pred neo = 2 of them + 2 outside, pred non 1 px.
    target = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros((2, 4, 4), np.uint8)
    target[0, :2, :2] = 1
    pred[0, 0, :4] = 1
    pred[0, 3, 3] = 2
    # image 1: target non = 3 px, pred non = same 3 px + 1 px predicted neo inside the truth.
    target[1, 2, :3] = 2
    target[1, 1, 0] = 2
    pred[1, 2, :3] = 2
    pred[1, 1, 0] = 1

    stats = class_stats(pred, target)
    assert stats.dtype == np.int64 and stats.shape == (2, 3, 3)
    np.testing.assert_array_equal(stats[0], [[2, 4, 4], [0, 1, 0], [2, 5, 4]])
    np.testing.assert_array_equal(stats[1], [[0, 1, 0], [3, 3, 4], [4, 4, 4]])

    s = scores_from_stats(stats)
    # rows: img0 neo 2*2/8, img0 non 0 (1 px predicted, none true), img1 neo 0, img1 non 6/7
    assert s["competition"] == pytest.approx((0.5 + 0 + 0 + 6 / 7) / 4)
    assert s["competition_neo"] == pytest.approx(0.25)
    assert s["competition_non"] == pytest.approx(3 / 7)
    assert s["dice_neo"] == pytest.approx(2 * 2 / (5 + 4))
    assert s["dice_non"] == pytest.approx(2 * 3 / (4 + 4))
    assert s["dice_seg"] == pytest.approx(2 * 6 / (9 + 8))
    assert s["mean_micro"] == pytest.approx((s["dice_neo"] + s["dice_non"]) / 2)


def test_stats_are_additive_and_lists_of_sizes_match_stacked():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (5, 7, 9), dtype=np.uint8)
    target = rng.integers(0, 3, (5, 7, 9), dtype=np.uint8)
    stacked = class_stats(pred, target)
    # per-fold stats summed give the whole set's counts, hence its micro Dice
    folds = ([0, 2, 4], [1, 3])
    per_fold = [class_stats(pred[f], target[f]) for f in folds]
    summed = sum(s.sum(axis=0) for s in per_fold)
    np.testing.assert_array_equal(summed, stacked.sum(axis=0))
    whole = scores_from_stats(stacked)
    for row, key in enumerate(("dice_neo", "dice_non", "dice_seg")):
        inter, n_pred, n_true = summed[row]
        assert whole[key] == pytest.approx(2 * inter / (n_pred + n_true))
    assert scores_from_stats(np.concatenate(per_fold)) == pytest.approx(whole)
    listed = class_stats(list(pred), list(target))
    np.testing.assert_array_equal(stacked, listed)
    np.testing.assert_array_equal(class_stats(torch.from_numpy(pred), target), stacked)
    # sizes differing per image are fine in list form
    odd = class_stats([pred[0], pred[1, :3, :4]], [target[0], target[1, :3, :4]])
    assert odd[1, 2, 2] == (target[1, :3, :4] > 0).sum()


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"image 0: pred shape \(2, 2\) != target shape \(2, 3\)"):
        class_stats([np.zeros((2, 2), np.uint8)], [np.zeros((2, 3), np.uint8)])
    with pytest.raises(ValueError, match="shape"):
        class_stats(np.zeros((1, 2, 2), np.uint8), np.zeros((1, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        class_stats(np.full((1, 2, 2), 3, np.uint8), np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        scores_from_stats(np.zeros((0, 3, 3), np.int64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_segmentation_models_pytorch(seed):
    rng = np.random.default_rng(seed)
    n, h, w = 12, 16, 20
    target = np.zeros((n, h, w), np.int64)
    pred = np.zeros((n, h, w), np.int64)
    for i in range(n):
        # blobs of one class per image, some images empty, plus random noise in the prediction
        cls = rng.integers(0, 3)
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
        target[i, y : y + 6, x : x + 6] = cls
        pred[i] = np.where(rng.random((h, w)) < 0.8, target[i], rng.integers(0, 3, (h, w)))
    pred[0] = 0  # an image with nothing predicted
    ours = dice_scores(pred, target)

    pt, tt = torch.from_numpy(pred), torch.from_numpy(target)
    tp, fp, fn, tn = smpm.get_stats(pt, tt, mode="multiclass", num_classes=3)
    for c, key in ((1, "dice_neo"), (2, "dice_non")):
        micro = smpm.f1_score(tp[:, c], fp[:, c], fn[:, c], tn[:, c], reduction="micro")
        assert ours[key] == pytest.approx(float(micro))
    per_image = smpm.f1_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)
    assert ours["competition"] == pytest.approx(float(per_image[:, 1:].mean()))

    tp, fp, fn, tn = smpm.get_stats((pt > 0).long(), (tt > 0).long(), mode="binary")
    assert ours["dice_seg"] == pytest.approx(float(smpm.f1_score(tp, fp, fn, tn, "micro")))
