"""EMCAD (Rahman et al., CVPR 2024), written from the paper: a PVTv2 encoder and the
efficient multi-scale convolutional attention decoder.

The decoder works deepest first. The stride-32 features are refined by MSCAM; each
following stage upsamples with EUCB, gates the encoder skip with LGAG, adds the two and
refines with MSCAM. A 1×1 prediction head on each of the four stages gives the side
outputs used for deep supervision; the stride-4 head, upsampled ×4, is the prediction.
Every block is depthwise or grouped where it can be, which is why the whole decoder costs
about 1.9M parameters on PVTv2-b2.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class MSDC(nn.Module):
    """Multi-scale depthwise convolution: parallel depthwise k×k convs, outputs summed.

    Several kernel sizes see several scales of context at the price of a depthwise conv
    each (k² parameters per channel).
    """

    def __init__(self, channels: int, kernel_sizes: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU6(inplace=True),
            )
            for k in kernel_sizes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


class MSCB(nn.Module):
    """Multi-scale convolution block, inverted-residual style.

    Pointwise expansion → MSDC → channel shuffle → pointwise projection, with a residual
    when input and output widths agree. The shuffle follows the paper; it mixes the
    depthwise groups before the projection.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        expansion: int = 2,
        kernel_sizes: tuple[int, ...] = (1, 3, 5),
    ) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expand = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)
        )
        self.msdc = MSDC(hidden, kernel_sizes)
        self.shuffle_groups = len(kernel_sizes) if hidden % len(kernel_sizes) == 0 else 1
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = channel_shuffle(self.msdc(self.expand(x)), self.shuffle_groups)
        y = self.project(y)
        return x + y if self.residual else y


class CAB(nn.Module):
    """Channel attention: a shared bottleneck MLP on avg- and max-pooled channels."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        hidden = max(channels // ratio, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)


class SAB(nn.Module):
    """Spatial attention: a 7×7 conv on the channel-wise mean and max maps."""

    def __init__(self, kernel: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class MSCAM(nn.Module):
    """Multi-scale convolutional attention module: CAB, then SAB, then MSCB."""

    def __init__(
        self, channels: int, expansion: int = 2, kernel_sizes: tuple[int, ...] = (1, 3, 5)
    ) -> None:
        super().__init__()
        self.cab = CAB(channels)
        self.sab = SAB()
        self.mscb = MSCB(channels, channels, expansion, kernel_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mscb(self.sab(self.cab(x)))


class LGAG(nn.Module):
    """Large-kernel grouped attention gate: the decoder's gate decides which skip
    pixels pass.

    Grouped 3×3 convs (each group maps two channels to one) embed gate and skip cheaply;
    their sum through ReLU, a 1×1 conv and a sigmoid gives a one-channel mask that
    multiplies the skip.
    """

    def __init__(self, channels: int, kernel: int = 3) -> None:
        super().__init__()
        inner = max(channels // 2, 1)

        def embed() -> nn.Sequential:
            conv = nn.Conv2d(channels, inner, kernel, padding=kernel // 2, groups=inner)
            return nn.Sequential(conv, nn.BatchNorm2d(inner))

        self.gate, self.skip = embed(), embed()
        self.psi = nn.Sequential(nn.Conv2d(inner, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(F.relu(self.gate(gate) + self.skip(skip)))


class EUCB(nn.Module):
    """Efficient up-convolution: ×2 upsampling, depthwise 3×3, BN, ReLU, pointwise."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class EMCADDecoder(nn.Module):
    """The decoder on four encoder stages, deepest last in `channels`."""

    def __init__(
        self,
        channels: tuple[int, int, int, int],
        num_classes: int,
        expansion: int = 2,
        kernel_sizes: tuple[int, ...] = (1, 3, 5),
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.mscam4 = MSCAM(c4, expansion, kernel_sizes)
        self.ups = nn.ModuleList([EUCB(c4, c3), EUCB(c3, c2), EUCB(c2, c1)])
        self.gates = nn.ModuleList([LGAG(c3), LGAG(c2), LGAG(c1)])
        self.mscams = nn.ModuleList(MSCAM(c, expansion, kernel_sizes) for c in (c3, c2, c1))
        self.heads = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in (c4, c3, c2, c1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Side outputs, deepest (stride 32) first, shallowest (stride 4) last."""
        *skips, deepest = feats
        d = self.mscam4(deepest)
        stages = [d]
        for up, gate, mscam, skip in zip(
            self.ups, self.gates, self.mscams, reversed(skips), strict=True
        ):
            d = up(d)
            d = mscam(d + gate(d, skip))
            stages.append(d)
        return [head(s) for head, s in zip(self.heads, stages, strict=True)]


class EMCAD(nn.Module):
    """PVTv2 encoder + EMCAD decoder; four side outputs with deep supervision.

    Train mode returns `{"logits", "aux"}` with `aux` the stride-32, 16 and 8 heads at
    their own resolution; eval mode the stride-4 head upsampled to the input size.
    """

    def __init__(
        self,
        num_classes: int = 3,
        encoder_name: str = "pvt_v2_b2",
        pretrained: bool = False,
        expansion: int = 2,
        kernel_sizes: tuple[int, ...] = (1, 3, 5),
    ) -> None:
        super().__init__()
        self.encoder = timm.create_model(
            encoder_name, pretrained=pretrained, features_only=True, out_indices=(0, 1, 2, 3)
        )
        channels = tuple(self.encoder.feature_info.channels())
        self.decoder = EMCADDecoder(channels, num_classes, expansion, tuple(kernel_sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, object]:
        *aux, last = self.decoder(self.encoder(x))
        logits = F.interpolate(last, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        return {"logits": logits, "aux": aux}
