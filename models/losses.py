"""Training loss: cross-entropy + Dice, deep supervision, PraNet's polyp structure loss.

Design choices, and why:
  * **Dice counts absent classes** (default). The competition scores every image × class
    row, and a row whose class is absent scores 1 only if *nothing* of that class is
    predicted; about 70% of images have no green. smp's multiclass `DiceLoss` zeroes
    the term of a class absent from the batch, so it never teaches "predict no green"
    on those batches. Our Dice is computed per image and class with additive smoothing
    `s`: for an absent class it is `P / (P + s)` (P = predicted probability mass), which
    pushes stray mass towards zero. It saturates once P ≫ s; large confusions are
    cross-entropy's job. `dice_count_absent=False` switches to smp's `DiceLoss`
    (batch-level, absent classes ignored) for comparison.
  * **Deep supervision**: side logits are upsampled bilinearly to the mask (the mask is
    never resized, so no interpolated labels) and scored with the same CE + Dice.
    `aux_weights=None` gives each side output weight 1, as both PraNet and EMCAD sum
    their side losses with equal weight; a float applies to every side output, a list
    gives one weight each.
  * **PraNet's polyp logits** (`aux_binary`) get the paper's structure loss on
    polyp-vs-background: BCE and IoU, both weighted per pixel by
    `1 + 5·|avgpool31(mask) − mask|` to stress boundaries. The BCE uses
    `reduction="none"` so the weighting is applied per pixel (public copies used the
    deprecated `reduce="none"`, which averages first and silently drops the weights).
    All side outputs count equally, times `binary_weight`.
  * **smp's focal, Tversky and Lovász losses** can be added to CE + Dice with their own
    weights (`focal_weight`, `tversky_weight` with `tversky_alpha/beta`, `lovasz_weight`;
    all 0 by default). They are smp's own implementations; Tversky scores the foreground
    classes like the Dice term, focal and Lovász all three classes. Tversky with
    alpha < beta punishes missed polyp pixels more than extra ones (NeoUNet uses alpha 0.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, LovaszLoss, TverskyLoss
from torch import nn

from models.ops import resize

ModelOutput = torch.Tensor | dict[str, object]


def soft_dice_per_image(
    logits: torch.Tensor, mask: torch.Tensor, classes: Sequence[int], smooth: float = 1.0
) -> torch.Tensor:
    """1 − soft Dice for each image and class in `classes`, absent classes included."""
    probs = logits.float().softmax(dim=1)[:, list(classes)]
    onehot = F.one_hot(mask, logits.shape[1]).permute(0, 3, 1, 2)[:, list(classes)]
    onehot = onehot.to(probs.dtype)
    inter = (probs * onehot).sum(dim=(2, 3))
    total = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    return 1.0 - (2.0 * inter + smooth) / (total + smooth)


def structure_loss(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PraNet's boundary-weighted BCE + IoU on one-channel logits, target (N,1,H,W) 0/1."""
    weight = 1.0 + 5.0 * (F.avg_pool2d(target, 31, stride=1, padding=15) - target).abs()
    bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logit)
    inter = (prob * target * weight).sum(dim=(2, 3))
    union = ((prob + target) * weight).sum(dim=(2, 3))
    wiou = 1.0 - (inter + 1.0) / (union - inter + 1.0)
    return (wbce + wiou).mean()


class SegLoss(nn.Module):
    """CE + Dice on the logits and side outputs, plus the structure loss on `aux_binary`.

    `loss(output, mask)`: `output` is a Tensor (N,C,H,W) or the train-mode dict
    `{"logits", "aux", "aux_binary"}`; `mask` is int64 (N,H,W) class ids.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        dice_include_background: bool = False,
        aux_weights: float | Sequence[float] | None = None,
        binary_weight: float = 1.0,
        dice_smooth: float = 1.0,
        dice_count_absent: bool = True,
        ce_class_weights: Sequence[float] | None = None,
        focal_weight: float = 0.0,
        tversky_weight: float = 0.0,
        tversky_alpha: float = 0.5,
        tversky_beta: float = 0.5,
        lovasz_weight: float = 0.0,
    ) -> None:
        super().__init__()
        # Per-class CE weights, e.g. to up-weight the rarer non-neoplastic class; a buffer,
        # so it follows the loss to the training device.
        weights = None if ce_class_weights is None else torch.tensor(ce_class_weights).float()
        self.register_buffer("ce_class_weights", weights)
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.aux_weights = aux_weights
        self.binary_weight = binary_weight
        self.dice_smooth = dice_smooth
        self.first_class = 0 if dice_include_background else 1
        self.dice_count_absent = dice_count_absent
        classes = list(range(self.first_class, 3))
        self.extra = [
            (float(weight), loss)
            for weight, loss in (
                (focal_weight, FocalLoss("multiclass")),
                (
                    tversky_weight,
                    TverskyLoss(
                        "multiclass", classes=classes, alpha=tversky_alpha, beta=tversky_beta
                    ),
                ),
                (lovasz_weight, LovaszLoss("multiclass")),
            )
            if weight
        ]

    def seg_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """CE + Dice of one set of class logits, upsampled to the mask if needed."""
        logits = resize(logits, mask.shape[-2:]).float()
        loss = self.ce_weight * F.cross_entropy(logits, mask, weight=self.ce_class_weights)
        classes = list(range(self.first_class, logits.shape[1]))
        if self.dice_count_absent:
            dice = soft_dice_per_image(logits, mask, classes, self.dice_smooth).mean()
        else:
            dice = DiceLoss("multiclass", classes=classes, from_logits=True)(logits, mask)
        loss = loss + self.dice_weight * dice
        for weight, extra in self.extra:
            loss = loss + weight * extra(logits, mask)
        return loss

    def _weights(self, n_aux: int) -> list[float]:
        if self.aux_weights is None:
            return [1.0] * n_aux
        if isinstance(self.aux_weights, (int, float)):
            return [float(self.aux_weights)] * n_aux
        weights = [float(w) for w in self.aux_weights]
        if len(weights) != n_aux:
            raise ValueError(
                f"aux_weights has {len(weights)} entries but the model gives {n_aux} side outputs"
            )
        return weights

    def forward(self, output: ModelOutput, mask: torch.Tensor) -> torch.Tensor:
        return self.terms(output, mask)[1]

    def terms(self, output: ModelOutput, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(main head's loss, total with the side outputs).

        The main head's loss is what validation measures (models give only the main
        logits in eval mode), so it is the training curve comparable with validation.
        """
        if isinstance(output, torch.Tensor):
            loss = self.seg_loss(output, mask)
            return loss, loss
        main = loss = self.seg_loss(output["logits"], mask)
        aux = list(output.get("aux") or [])
        for weight, side in zip(self._weights(len(aux)), aux, strict=True):
            loss = loss + weight * self.seg_loss(side, mask)
        binary = list(output.get("aux_binary") or [])
        if binary and self.binary_weight:
            target = (mask > 0).unsqueeze(1).float()
            for side in binary:
                side = resize(side, mask.shape[-2:]).float()
                loss = loss + self.binary_weight * structure_loss(side, target)
        return main, loss
