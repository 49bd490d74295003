"""Any segmentation-models-pytorch architecture, by smp's own name (`smp.create_model`).

smp already implements these well; this module only maps the zoo's arguments
(`num_classes`, `pretrained`) onto smp's and keeps the encoder at `model.encoder`, as for
every model in the zoo. Encoders are smp's own names (`resnet34`) or timm's through the
`tu-` prefix (`tu-regnetx_320`).
"""

from __future__ import annotations

import inspect
from typing import Any

import segmentation_models_pytorch as smp
import timm
from torch import nn

TIMM_PREFIX = "tu-"


def _weights(encoder_name: str) -> str | bool:
    # smp wants True for timm encoders (the tag in the name picks the weights).
    return True if encoder_name.startswith(TIMM_PREFIX) else "imagenet"


def is_encoder(name: str) -> bool:
    """Whether smp builds encoder `name`: one of its own, a deprecated `timm-` name it maps
    to timm, or any timm model (a pretrained tag after the dot aside) as `tu-<name>`."""
    if name.startswith(TIMM_PREFIX):
        return timm.is_model(name.removeprefix(TIMM_PREFIX))
    return name in smp.encoders.encoders or smp.encoders.is_equivalent_to_timm_universal(name)


def encoder_names() -> list[str]:
    """Every encoder name smp takes, for a did-you-mean."""
    return [*smp.encoders.get_encoder_names(), *(TIMM_PREFIX + m for m in timm.list_models())]


def architecture(arch: str) -> type[nn.Module]:
    """smp's class for architecture `arch` (any case); a ValueError listing smp's names."""
    known = smp.MODEL_ARCHITECTURES_MAPPING
    if arch.lower() not in known:
        raise ValueError(f"unknown smp architecture {arch!r}; smp has: {sorted(known)}")
    return known[arch.lower()]


def build_smp(
    arch: str,
    num_classes: int = 3,
    pretrained: bool = False,
    encoder_name: str = "resnet34",
    **kwargs: Any,
) -> nn.Module:
    """An smp model; `pretrained=True` asks smp for its ImageNet encoder weights."""
    cls = architecture(arch)
    if not encoder_name.startswith(TIMM_PREFIX):
        # smp forwards extra arguments to timm encoders only and drops them silently for
        # its own encoders; a typo in a config must not vanish like that.
        unknown = sorted(set(kwargs) - set(inspect.signature(cls).parameters))
        if unknown:
            raise TypeError(f"{cls.__name__} with encoder {encoder_name!r} takes no {unknown}")
    return smp.create_model(
        arch,
        encoder_name=encoder_name,
        encoder_weights=_weights(encoder_name) if pretrained else None,
        in_channels=3,
        classes=num_classes,
        **kwargs,
    )
