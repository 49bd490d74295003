"""PraNet (Fan et al., MICCAI 2020), written from the paper, with a multi-class head.

The paper's network segments polyp vs background:
  * a Res2Net-50 (26w×4s) backbone; its last three stages (strides 8/16/32) feed
  * receptive-field blocks (RFB) that squeeze each stage to 32 channels with four
    branches of growing receptive field,
  * a parallel partial decoder (PD) that aggregates the three squeezed stages into a
    coarse polyp map at stride 8 (the "global map"),
  * three reverse-attention (RA) stages, deepest first: the current map is resized to
    the stage, turned into an attention `1 − sigmoid(map)` that highlights what the map
    has *not* yet claimed (mostly the boundary), multiplied into the stage's backbone
    features, passed through a few convolutions and added to the map as a residual.
Every map (PD, RA at stride 32, 16, 8) is a side output and is supervised.

Multi-class design (this project, not the paper): each PD/RA head outputs `1 + C`
channels. Channel 0 is the one-channel polyp logit, refined exactly as in the paper and
the only thing that drives reverse attention, so the attention keeps its meaning ("where
is polyp not yet found") whatever the class. The other C channels are class logits refined
the same way: each stage adds its residual to the previous stage's class logits. Class
logits of the last RA stage, upsampled to the input, are the model's prediction; the
polyp logits are used for supervision only (`aux_binary`).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from models.ops import resize


def conv_bn(
    cin: int,
    cout: int,
    kernel: int | tuple[int, int] = 1,
    dilation: int = 1,
    relu: bool = False,
) -> nn.Sequential:
    """Convolution + BN (+ ReLU) with 'same' padding for odd and rectangular kernels."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, (kh, kw), padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RFB(nn.Module):
    """Receptive-field block: branches of 1×1, then (1×k, k×1) and a 3×3 conv dilated by k.

    Branch 0 is a plain 1×1; branches k = 3, 5, 7 see progressively wider context at the
    cost of a few thin convolutions. The concatenation is fused by a 3×3 conv and added to
    a 1×1 projection of the input (the residual), then ReLU.
    """

    def __init__(self, cin: int, cout: int = 32) -> None:
        super().__init__()
        branches = [conv_bn(cin, cout)]
        for k in (3, 5, 7):
            branches.append(
                nn.Sequential(
                    conv_bn(cin, cout),
                    conv_bn(cout, cout, (1, k)),
                    conv_bn(cout, cout, (k, 1)),
                    conv_bn(cout, cout, 3, dilation=k),
                )
            )
        self.branches = nn.ModuleList(branches)
        self.fuse = conv_bn(4 * cout, cout, 3)
        self.residual = conv_bn(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(torch.cat([b(x) for b in self.branches], dim=1))
        return F.relu(fused + self.residual(x))


class PartialDecoder(nn.Module):
    """Parallel partial decoder: aggregates the three RFB outputs into the coarse map.

    Deeper features are upsampled and multiplied into shallower ones (so a location is
    kept only where all levels agree), then the products are concatenated level by level
    from deep to shallow and fused at stride 8.
    """

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        c = channels
        self.gate4_to3 = conv_bn(c, c, 3)
        self.gate4_to2 = conv_bn(c, c, 3)
        self.gate3_to2 = conv_bn(c, c, 3)
        self.carry4 = conv_bn(c, c, 3)
        self.carry3 = conv_bn(2 * c, 2 * c, 3)
        self.fuse3 = conv_bn(2 * c, 2 * c, 3)
        self.fuse2 = conv_bn(3 * c, 3 * c, 3)
        self.refine = conv_bn(3 * c, 3 * c, 3)
        self.head = nn.Conv2d(3 * c, out_channels, 1)

    def forward(self, f2: torch.Tensor, f3: torch.Tensor, f4: torch.Tensor) -> torch.Tensor:
        s2, s3 = f2.shape[-2:], f3.shape[-2:]
        f4_at3, f4_at2 = resize(f4, s3), resize(f4, s2)
        m3 = self.gate4_to3(f4_at3) * f3
        m2 = self.gate4_to2(f4_at2) * self.gate3_to2(resize(f3, s2)) * f2
        a3 = self.fuse3(torch.cat([m3, self.carry4(f4_at3)], dim=1))
        a2 = self.fuse2(torch.cat([m2, self.carry3(resize(a3, s2))], dim=1))
        return self.head(self.refine(a2))


class ReverseAttention(nn.Module):
    """One reverse-attention stage: erase what the map already claims, learn the rest.

    The attention `1 − sigmoid(polyp logit)` is broadcast over the stage's backbone
    features; a 1×1 reduction and `depth` k×k convs produce a `1 + C` residual that is
    added to the incoming polyp logit and class logits.
    """

    def __init__(self, cin: int, width: int, kernel: int, depth: int, out_channels: int):
        super().__init__()
        layers = [conv_bn(cin, width, 1, relu=True)]
        layers += [conv_bn(width, width, kernel, relu=True) for _ in range(depth)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, out_channels, kernel, padding=kernel // 2)

    def forward(self, feat: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        prev = resize(prev, feat.shape[-2:])
        attention = 1.0 - torch.sigmoid(prev[:, :1])
        return prev + self.head(self.body(feat * attention))


class PraNet(nn.Module):
    """PraNet with a polyp logit driving reverse attention and class logits beside it.

    Train mode returns `{"logits", "aux", "aux_binary"}`: `aux` are the class logits of
    the PD, RA-32 and RA-16 side outputs (at their own strides 8, 32, 16), `aux_binary`
    the polyp logits of all four side outputs (PD, RA-32, RA-16, RA-8). Eval mode returns
    the RA-8 class logits upsampled to the input size. `encoder_name` is any timm model whose
    feature stages 1–4 have strides 4–32 (ResNet, Res2Net, ResNeXt families).
    """

    def __init__(
        self,
        num_classes: int = 3,
        encoder_name: str = "res2net50_26w_4s",
        pretrained: bool = False,
        rfb_channels: int = 32,
        ra_widths: tuple[int, int, int] = (256, 64, 64),
    ) -> None:
        super().__init__()
        self.encoder = timm.create_model(
            encoder_name, pretrained=pretrained, features_only=True, out_indices=(1, 2, 3, 4)
        )
        _, c2, c3, c4 = self.encoder.feature_info.channels()
        out = 1 + num_classes
        self.rfb2, self.rfb3, self.rfb4 = (RFB(c, rfb_channels) for c in (c2, c3, c4))
        self.decoder = PartialDecoder(rfb_channels, out)
        w4, w3, w2 = ra_widths
        # Kernel sizes and depths as in the paper: 5×5 convs on the deepest stage.
        self.ra4 = ReverseAttention(c4, w4, kernel=5, depth=3, out_channels=out)
        self.ra3 = ReverseAttention(c3, w3, kernel=3, depth=3, out_channels=out)
        self.ra2 = ReverseAttention(c2, w2, kernel=3, depth=3, out_channels=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, object]:
        _, f2, f3, f4 = self.encoder(x)
        coarse = self.decoder(self.rfb2(f2), self.rfb3(f3), self.rfb4(f4))
        s4 = self.ra4(f4, coarse)
        s3 = self.ra3(f3, s4)
        s2 = self.ra2(f2, s3)
        logits = resize(s2[:, 1:], x.shape[-2:])
        if not self.training:
            return logits
        return {
            "logits": logits,
            "aux": [s[:, 1:] for s in (coarse, s4, s3)],
            "aux_binary": [s[:, :1] for s in (coarse, s4, s3, s2)],
        }
