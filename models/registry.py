"""The model zoo: every architecture the pipeline can train, built by name.

Configs name a zoo entry (`models.<name>.arch`, the entry's own name by default) and may
override any of its defaults (`kwargs`). The zoo holds the six architectures of the
competition recipe, with their published sizes; lighter variants are config entries
(`configs/demo.yaml`: `arch: smp.Unet` with a MobileNetV3 encoder), not code. Every
model takes its encoder as `encoder_name`. Any segmentation-models-pytorch architecture
also works by name, `arch: smp.MAnet`, through `smp.create_model`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import timm
from torch import nn

from core.config import ConfigError, model_entry
from models.emcad import EMCAD
from models.pranet import PraNet
from models.pretrained import imagenet_download, load_encoder_weights, parse_pretrained
from models.smp_models import architecture, build_smp, encoder_names, is_encoder

SMP_PREFIX = "smp."
# The reference PraNet builds a complete Res2Net-50, ImageNet classifier (2048→1000)
# included, and never uses it; the published 32.5M counts it, our encoder drops it.
RES2NET_FC_M = (2048 * 1000 + 1000) / 1e6


@dataclass(frozen=True)
class Encoders:
    """The `encoder_name`s an architecture takes, and how to say so."""

    known: Callable[[str], bool]
    names: Callable[[], list[str]]
    said: str


SMP_ENCODERS = Encoders(is_encoder, encoder_names, "smp's encoders, or any timm model as tu-<name>")
TIMM_ENCODERS = Encoders(timm.is_model, timm.list_models, "a timm model name")


@dataclass(frozen=True)
class ZooEntry:
    builder: Callable[..., nn.Module]  # builder(num_classes=, pretrained=bool, **kwargs)
    defaults: dict[str, Any] = field(default_factory=dict)
    published_m: float | None = None  # published parameter count (millions), for checks
    note: str = ""
    # Parameters the published figure counts that this model rightly lacks (millions).
    published_extra_m: float = 0.0
    encoders: Encoders = SMP_ENCODERS

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
        encoders=TIMM_ENCODERS,
    ),
    "emcad": ZooEntry(EMCAD, published_m=26.8, note="PVTv2-b2 (EMCAD-B)", encoders=TIMM_ENCODERS),
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


def zoo_entry(name: str) -> ZooEntry:
    """The zoo's entry for architecture `name` (an `smp.<Name>` is made on the fly)."""
    if name.startswith(SMP_PREFIX):
        arch = name.removeprefix(SMP_PREFIX)
        try:
            architecture(arch)
        except ValueError as exc:
            raise ConfigError(f"model {name!r}: {exc}") from None
        return ZooEntry(partial(build_smp, arch))
    if name in ZOO:
        return ZOO[name]
    raise ConfigError(
        f"unknown model {name!r}; the zoo has: {', '.join(sorted(ZOO))}, "
        f"or any smp architecture as {SMP_PREFIX}<Name> (e.g. {SMP_PREFIX}MAnet)"
    )


def check_encoder(name: str, kwargs: dict[str, Any], where: str) -> None:
    """Refuse an `encoder_name` that architecture `name` cannot build, with the nearest
    names: timm and smp say so only deep inside the build (a RuntimeError, a KeyError
    listing every name), after the data is prepared."""
    entry = zoo_entry(name)
    encoder = {**entry.defaults, **kwargs}.get("encoder_name")
    if not isinstance(encoder, str) or entry.encoders.known(encoder):
        return  # absent: the builder's default; not a string: its TypeError says so
    close = difflib.get_close_matches(encoder, entry.encoders.names(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"{where}: unknown encoder_name {encoder!r} for {name}{hint} "
        f"(it takes {entry.encoders.said})"
    )


def check_model(cfg: dict[str, Any], model: str) -> None:
    """Config model `model`'s architecture and encoder, before any data is read."""
    entry = model_entry(cfg, model)
    check_encoder(entry["arch"], entry["kwargs"], f"models.{model}")


def build_model(
    name: str,
    num_classes: int = 3,
    pretrained: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build zoo model `name`; `pretrained` is None, "imagenet" or an encoder weights file.

    Raises `config.ConfigError` for an unknown name, encoder or arguments the model does
    not take, and `PretrainedWeightsError` (a ConfigError) when weights cannot be had, so
    the CLIs report both as a clear message.
    """
    entry = zoo_entry(name)
    check_encoder(name, kwargs, f"model {name!r}")
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
