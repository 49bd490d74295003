"""The region refiner: a small residual network over one region's crop (refine.py).

Input: a crop of `regions.CROP_CHANNELS` channels (RGB, the first stage's three class
probabilities, the region's mask) at a fixed square side (a multiple of 8). Output: the
region's class logits over (false positive, neoplastic, non-neoplastic) and a polyp logit
per crop pixel.

Both outputs are residuals on the first stage's own answer, with zero-initialised last
layers: the class logits start as the log of the region's mean class probabilities, and
the mask logit as the logit of the first stage's polyp probability. An untrained refiner
therefore reproduces the first stage (with one class per region), and training on a few
hundred regions only has to learn where the first stage is wrong, not the whole task.
Small (about 0.1M parameters), so that every fold trains in seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_EPS = 1e-4


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class RegionRefiner(nn.Module):
    """A three-level U-Net with a class head on mask-pooled and globally pooled features."""

    def __init__(self, in_channels: int = 7, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc = nn.ModuleList([_block(in_channels, w), _block(w, 2 * w), _block(2 * w, 4 * w)])
        self.bottom = _block(4 * w, 4 * w)
        self.dec = nn.ModuleList([_block(8 * w, 2 * w), _block(4 * w, w), _block(2 * w, w)])
        self.mask_delta = nn.Conv2d(w, 1, 1)
        self.class_delta = nn.Linear(8 * w, 3)
        for layer in (self.mask_delta, self.class_delta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (N, 3), mask logits (N, side, side)) for crops (N, C, side, side)."""
        probs, region = x[:, 3:6], x[:, 6:7]
        skips = []
        h = x
        for block in self.enc:
            h = block(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottom(h)
        weight = F.adaptive_avg_pool2d(region, h.shape[-2:])
        pooled = torch.cat(
            [
                (h * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(_EPS),
                h.mean((2, 3)),
            ],
            dim=1,
        )
        for block, skip in zip(self.dec, reversed(skips), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1))
        region_sum = region.sum((2, 3)).clamp_min(_EPS)
        mean_probs = (probs * region).sum((2, 3)) / region_sum
        class_prior = torch.log(mean_probs.clamp_min(_EPS))
        polyp = (1.0 - probs[:, 0]).clamp(_EPS, 1.0 - _EPS)
        mask_prior = torch.log(polyp) - torch.log1p(-polyp)
        return class_prior + self.class_delta(pooled), mask_prior + self.mask_delta(h)[:, 0]
