"""The model zoo: every architecture the pipeline can train, built by name.

Configs name a zoo entry (`models.<name>.arch`, the entry's own name by default) and may
override any of its defaults (`kwargs`). The zoo holds the six architectures of the
competition recipe, with their published sizes; lighter variants are config entries
(`configs/demo.yaml`: `arch: smp.Unet` with a MobileNetV3 encoder), not code. Every
model takes its encoder as `encoder_name`. Any segmentation-models-pytorch architecture
also works by name, `arch: smp.MAnet`, through `smp.create_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from config import ConfigError
from models.emcad import EMCAD
from models.pranet import PraNet
from models.pretrained import imagenet_download, load_encoder_weights, parse_pretrained
from models.smp_models import build_smp

SMP_PREFIX = "smp."
# The reference PraNet builds a complete Res2Net-50, ImageNet classifier (2048→1000)
# included, and never uses it; the published 32.5M counts it, our encoder drops it.
RES2NET_FC_M = (2048 * 1000 + 1000) / 1e6


@dataclass(frozen=True)
class ZooEntry:
    builder: Callable[..., nn.Module]  # builder(num_classes=, pretrained=bool, **kwargs)
    defaults: dict[str, Any] = field(default_factory=dict)
    published_m: float | None = None  # published parameter count (millions), for checks
    note: str = ""
    # Parameters the published figure counts that this model rightly lacks (millions).
    published_extra_m: float = 0.0

    @property
    def comparable_m(self) -> float | None:
        """The published count less what it counts that this model does not have."""
        return None if self.published_m is None else self.published_m - self.published_extra_m


ZOO: dict[str, ZooEntry] = {
    "pranet": ZooEntry(
        PraNet,
        published_m=32.5,
        note="Res2Net-50 26w×4s; published 32.5M counts the unused 2.05M ImageNet fc",
        published_extra_m=RES2NET_FC_M,
    ),
    "emcad": ZooEntry(EMCAD, published_m=26.8, note="PVTv2-b2 (EMCAD-B)"),
    "deeplabv3plus_regnetx320": ZooEntry(
        partial(build_smp, "deeplabv3plus"),
        {"encoder_name": "tu-regnetx_320"},
        109.0,
        "timm RegNetX-320, OS 16",
    ),
    "deeplabv3plus_resnet50": ZooEntry(
        partial(build_smp, "deeplabv3plus"),
        {"encoder_name": "tu-resnet50"},
        26.7,
        "timm ResNet-50, OS 16",
    ),
    "unet": ZooEntry(partial(build_smp, "unet"), {"encoder_name": "resnet34"}, note="ResNet-34"),
    "unetplusplus": ZooEntry(
        partial(build_smp, "unetplusplus"), {"encoder_name": "resnet34"}, note="ResNet-34"
    ),
}


def build_model(
    name: str,
    num_classes: int = 3,
    pretrained: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build zoo model `name`; `pretrained` is None, "imagenet" or an encoder weights file.

    Raises `config.ConfigError` for an unknown name or arguments the model does not take,
    and `PretrainedWeightsError` (a ConfigError) when weights cannot be had, so the CLIs
    report both as a clear message.
    """
    if name.startswith(SMP_PREFIX):
        entry = ZooEntry(partial(build_smp, name.removeprefix(SMP_PREFIX)))
    elif name in ZOO:
        entry = ZOO[name]
    else:
        raise ConfigError(
            f"unknown model {name!r}; the zoo has: {', '.join(sorted(ZOO))}, "
            f"or any smp architecture as {SMP_PREFIX}<Name> (e.g. {SMP_PREFIX}MAnet)"
        )
    spec = parse_pretrained(pretrained)
    args = {**entry.defaults, **kwargs}
    try:
        if spec == "imagenet":
            with imagenet_download(name):
                model = entry.builder(num_classes=num_classes, pretrained=True, **args)
        else:
            model = entry.builder(num_classes=num_classes, pretrained=False, **args)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # smp: an unknown architecture is a ValueError
        raise ConfigError(f"model {name!r}: bad arguments {args}: {exc}") from exc
    if isinstance(spec, Path):
        load_encoder_weights(model, spec)
    return model
