"""regions.py on hand-made maps: what a region's crop holds, what its training target may
claim, and how a refined region is written back. Each test was seen to fail on the
mutants of docs/mutation.md it names."""

from __future__ import annotations

import numpy as np

from chain.regions import Region, crop_target, paste_region, predicted_regions, region_crop
from data.dataset import MEAN, STD


def test_a_tie_with_background_is_background() -> None:
    probs = np.zeros((3, 8, 8), np.float32)
    probs[0] = 1.0
    probs[:, 2:5, 2:5] = np.array([0.2, 0.7, 0.1])[:, None, None]
    probs[:, 6, 6] = [0.5, 0.5, 0.0]  # p_polyp class equals background: not a region
    labels, regions, fg = predicted_regions(probs)
    assert len(regions) == 1 and fg.sum() == 9 and labels[6, 6] == 0


def test_a_crop_holds_normalised_rgb_the_probabilities_and_the_region_mask() -> None:
    image = np.full((20, 20, 3), (128, 64, 200), np.uint8)
    probs = np.zeros((3, 20, 20), np.float32)
    probs[0], probs[1, 5:10, 5:10] = 0.25, 0.75
    mask = np.zeros((20, 20), np.uint8)
    mask[5:10, 5:10] = 1
    crop = region_crop(image, probs, mask, (0, 20, 0, 20), 20)  # the window's own size
    assert crop.shape == (7, 20, 20) and crop.dtype == np.float32
    for c, value in enumerate((128, 64, 200)):
        np.testing.assert_allclose(crop[c], (value / 255.0 - MEAN[c]) / STD[c], rtol=1e-6)
    np.testing.assert_array_equal(crop[3:6], probs)
    np.testing.assert_array_equal(crop[6], mask)


def test_a_regions_target_is_the_true_polyp_it_may_claim() -> None:
    """Its own pixels and the background's, never a neighbouring region's (a paste never
    writes those), whatever their true class."""
    labels = np.zeros((10, 10), np.int32)
    labels[2:8, 1:5] = 1
    labels[2:8, 6:9] = 2  # the neighbour, inside the window
    target = np.zeros((10, 10), np.uint8)
    target[1:9, 0:4] = 1  # neoplastic: over region 1 and the background around it
    target[3:6, 4:10] = 2  # non-neoplastic: region 1's edge, a gap, region 2, background
    got = crop_target(target, labels, Region(1, (0, 10, 0, 10)), 10)
    claimable = (labels == 1) | (labels == 0)
    np.testing.assert_array_equal(got, ((target > 0) & claimable).astype(np.float32))
    assert got[3:6, 4:6].all() and not got[3:6, 6:9].any() and got[3:6, 9].all()
    assert got[1:9, 0:4].all() and got.sum() == 8 * 4 + 3 * 3


def test_a_pasted_region_splits_its_polyp_probability_by_its_class_share() -> None:
    out = np.zeros((3, 6, 6), np.float32)
    out[0] = 1.0
    out[:, 1:4, 1:4] = np.array([0.3, 0.4, 0.3])[:, None, None]
    out[:, 5, 5] = [0.6, 0.1, 0.3]  # background, its polyp probability 0.4
    labels, regions, _ = predicted_regions(out)
    assert regions[0].box == (0, 6, 0, 6)  # the whole map: the refined crop maps 1:1
    paste_region(out, labels, regions[0], np.array([0.2, 0.6, 0.2]), np.full((6, 6), 0.9))
    inside = out[:, 1:4, 1:4]
    p_polyp = 0.9 * (1 - 0.2)
    np.testing.assert_allclose(inside[0], 1 - p_polyp, rtol=1e-6)
    np.testing.assert_allclose(inside[1], p_polyp * 0.75, rtol=1e-6)  # 0.6 / (0.6 + 0.2)
    np.testing.assert_allclose(inside[2], p_polyp * 0.25, rtol=1e-6)


def test_keeping_the_mask_leaves_the_background_as_it_was() -> None:
    """With the polyp probability kept (polyp None) and no false-positive mass, the
    background's claim equals its own: it is not rewritten, so its split stays its own."""
    out = np.zeros((3, 6, 6), np.float32)
    out[0] = 1.0
    out[:, 1:4, 1:4] = np.array([0.3, 0.4, 0.3])[:, None, None]
    out[:, 5, 5] = [0.6, 0.1, 0.3]
    before = out.copy()
    labels, regions, _ = predicted_regions(out)
    paste_region(out, labels, regions[0], np.array([0.0, 1.0, 0.0]), None)
    np.testing.assert_array_equal(out[:, labels == 0], before[:, labels == 0])
    np.testing.assert_allclose(out[1][labels == 1], 0.7, rtol=1e-6)
    assert not out[2][labels == 1].any()
