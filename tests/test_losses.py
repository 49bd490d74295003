"""SegLoss on hand-made predictions: right answers cost little, wrong ones a lot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.losses import SegLoss, soft_dice_per_image, structure_loss


def make_mask() -> torch.Tensor:
    """Two 32×48 masks: a red square in one image, a green one in the other, no overlap."""
    mask = torch.zeros(2, 32, 48, dtype=torch.long)
    mask[0, 8:20, 10:26] = 1
    mask[1, 12:28, 20:40] = 2
    return mask


def logits_for(mask: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    return scale * F.one_hot(mask, 3).permute(0, 3, 1, 2).float()


def test_perfect_prediction_costs_nearly_nothing() -> None:
    mask = make_mask()
    assert SegLoss()(logits_for(mask), mask).item() < 1e-3


def test_inverted_prediction_costs_a_lot() -> None:
    mask = make_mask()
    inverted = (mask + 1) % 3  # every pixel assigned a wrong class
    assert SegLoss()(logits_for(inverted), mask).item() > 10


def test_loss_orders_predictions_by_quality() -> None:
    mask = make_mask()
    half = mask.clone()
    half[0, 8:20, 10:18] = 0  # half of the red polyp missed
    loss = SegLoss()
    assert loss(logits_for(mask), mask) < loss(logits_for(half), mask)
    assert loss(logits_for(half), mask) < loss(logits_for((mask + 1) % 3), mask)


def test_stray_pixels_of_an_absent_class_are_penalised() -> None:
    # The batch has no green; the prediction is perfect except a few green pixels.
    mask = make_mask()
    mask[1] = 0
    mask[1, 12:28, 20:40] = 1
    stray = mask.clone()
    stray[0, 0:3, 0:3] = 2
    counting = SegLoss(ce_weight=0.0)
    ignoring = SegLoss(ce_weight=0.0, dice_count_absent=False)  # smp's DiceLoss
    assert counting(logits_for(stray), mask) > 0.2
    assert ignoring(logits_for(stray), mask) < 1e-3
    assert counting(logits_for(mask), mask) < 1e-3


def test_soft_dice_per_image_and_class() -> None:
    mask = make_mask()
    dice = soft_dice_per_image(logits_for(mask), mask, classes=[1, 2])
    assert dice.shape == (2, 2)
    assert dice.max() < 1e-3
    wrong = soft_dice_per_image(logits_for(torch.zeros_like(mask)), mask, classes=[1, 2])
    # image 0 has red, predicted none: ~1; image 0 has no green, predicted none: 0
    assert wrong[0, 0] > 0.99 and wrong[0, 1] < 1e-3


def test_background_in_dice_only_when_asked() -> None:
    mask = make_mask()
    no_fg = logits_for(torch.zeros_like(mask))
    without = SegLoss(ce_weight=0.0)(no_fg, mask)
    with_bg = SegLoss(ce_weight=0.0, dice_include_background=True)(no_fg, mask)
    # Background Dice is good here, so averaging it in lowers the loss.
    assert with_bg < without


def test_aux_weights_apply_to_upsampled_side_outputs() -> None:
    mask = make_mask()
    loss = SegLoss(aux_weights=[0.0, 2.0])
    wrong_side = logits_for((mask + 1) % 3)[:, :, ::2, ::2]  # half resolution
    good_side = logits_for(mask)[:, :, ::4, ::4]
    out = {"logits": logits_for(mask), "aux": [wrong_side, good_side]}
    main = loss.seg_loss(out["logits"], mask)
    expected = main + 2.0 * loss.seg_loss(good_side, mask)
    assert torch.allclose(loss(out, mask), expected)
    out_swapped = {"logits": out["logits"], "aux": [good_side, wrong_side]}
    assert loss(out_swapped, mask) > loss(out, mask) + 10


def test_default_aux_weights_are_equal() -> None:
    mask = make_mask()
    side = logits_for((mask + 1) % 3)[:, :, ::2, ::2]
    out = {"logits": logits_for(mask), "aux": [side, side]}
    loss = SegLoss()
    assert torch.allclose(
        loss(out, mask), loss.seg_loss(out["logits"], mask) + 2 * loss.seg_loss(side, mask)
    )
    assert torch.allclose(
        SegLoss(aux_weights=0.5)(out, mask),
        loss.seg_loss(out["logits"], mask) + loss.seg_loss(side, mask),
    )


def test_wrong_number_of_aux_weights_is_an_error() -> None:
    mask = make_mask()
    out = {"logits": logits_for(mask), "aux": [logits_for(mask)]}
    with pytest.raises(ValueError, match="2 entries but the model gives 1"):
        SegLoss(aux_weights=[1.0, 1.0])(out, mask)


def test_binary_side_outputs_get_the_structure_loss() -> None:
    mask = make_mask()
    polyp = (mask > 0).float().unsqueeze(1)
    good = 20 * (2 * polyp - 1)
    out = {"logits": logits_for(mask), "aux": [], "aux_binary": [good[:, :, ::2, ::2], good]}
    base = SegLoss()(logits_for(mask), mask)
    assert SegLoss()(out, mask) - base < 0.01
    bad = {**out, "aux_binary": [-good[:, :, ::2, ::2], good]}
    assert SegLoss()(bad, mask) - base > 1.0
    assert torch.allclose(SegLoss(binary_weight=0.0)(bad, mask), base)


def test_structure_loss_weights_boundary_errors_per_pixel() -> None:
    # Same number of wrong pixels; on the polyp boundary they weigh more than far away.
    # (With the deprecated `reduce='none'` the BCE is averaged first and both are equal.)
    target = torch.zeros(1, 1, 64, 64)
    target[:, :, 20:44, 20:44] = 1
    perfect = 20 * (2 * target - 1)
    at_boundary, far_away = perfect.clone(), perfect.clone()
    at_boundary[:, :, 20, 20:30] = -20
    far_away[:, :, 62, 0:10] = 20
    assert structure_loss(at_boundary, target) > 3 * structure_loss(far_away, target)


def test_loss_backpropagates_to_every_output() -> None:
    mask = make_mask()
    logits = torch.zeros(2, 3, 32, 48, requires_grad=True)
    side = torch.zeros(2, 3, 8, 12, requires_grad=True)
    binary = torch.zeros(2, 1, 16, 24, requires_grad=True)
    SegLoss()({"logits": logits, "aux": [side], "aux_binary": [binary]}, mask).backward()
    for t in (logits, side, binary):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_ce_class_weights_make_errors_on_that_class_cost_more() -> None:
    mask = torch.tensor([[[1, 1, 2, 2]]])  # (1, 1, 4): two neoplastic, two non-neoplastic
    confident = torch.full((1, 3, 1, 4), -5.0)
    miss_non = confident.clone()
    miss_non[0, 1, 0, :] = 5.0  # everything called neoplastic: the non pixels are wrong
    miss_neo = confident.clone()
    miss_neo[0, 2, 0, :] = 5.0  # everything called non-neoplastic: the neo pixels are wrong
    plain = SegLoss(dice_weight=0.0)
    weighted = SegLoss(dice_weight=0.0, ce_class_weights=[1.0, 1.0, 4.0])
    assert plain(miss_non, mask) == pytest.approx(plain(miss_neo, mask).item())
    assert weighted(miss_non, mask) > 1.5 * weighted(miss_neo, mask)
