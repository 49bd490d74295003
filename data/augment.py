"""Training and evaluation transforms (albumentations 2.x), image and mask in one call.

The training recipe follows the seed project: flips, 90° rotations, affine
shift/scale/rotate, random gamma, Gaussian blur and coarse dropout. Each of these presets
is configured by a dict of albumentations arguments merged over the defaults below (or a
number, taken as its probability; 0/None/False turns it off), e.g. in YAML
`augment: {dropout: {p: 0.5, num_holes_range: [2, 6]}, blur: 0}`. Any other key is the
name of an albumentations transform, built with its own defaults and the arguments given,
and applied after the presets in the order written:
`augment: {CLAHE: {p: 0.3, clip_limit: 2.0}, HueSaturationValue: 0.5}`.

Albumentations 2.x only *warns* about unknown arguments, so an old 1.x name such as
`max_holes` would silently fall back to a default. Transforms are therefore built with
warnings turned into errors, and any such problem becomes a `ConfigError` naming the step.
Masks always use nearest-neighbour interpolation and are filled with background. With a
non-square working size a 90° turn swaps height and width, and the final resize brings the
picture back to the working size (a mild aspect change); set `rotate90: 0` to avoid it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import albumentations as A
import cv2

from core.config import ConfigError
from core.settings import DataSettings

_NEAREST = cv2.INTER_NEAREST
_GEOMETRY = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}

# Step name -> (albumentations class, default arguments), in the order they are applied.
RECIPE: dict[str, tuple[type[A.BasicTransform], dict[str, Any]]] = {
    "hflip": (A.HorizontalFlip, {"p": 0.5}),
    "vflip": (A.VerticalFlip, {"p": 0.5}),
    "rotate90": (A.RandomRotate90, {"p": 0.5}),
    "affine": (
        A.Affine,
        {
            "p": 0.5,
            "translate_percent": (-0.1, 0.1),
            "scale": (0.85, 1.2),
            "rotate": (-30, 30),
            "interpolation": cv2.INTER_LINEAR,
            "mask_interpolation": _NEAREST,
            **_GEOMETRY,
        },
    ),
    "gamma": (A.RandomGamma, {"p": 0.3, "gamma_limit": (80, 120)}),
    "blur": (A.GaussianBlur, {"p": 0.2, "blur_limit": (3, 7)}),
    "dropout": (
        A.CoarseDropout,
        {
            "p": 0.3,
            "num_holes_range": (1, 6),
            "hole_height_range": (0.03, 0.1),
            "hole_width_range": (0.03, 0.1),
            "fill": 0,
            "fill_mask": None,  # the lesion is still there under an occluding hole
        },
    ),
}


def _library_transform(name: str) -> type[A.BasicTransform]:
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise ConfigError(
            f"augment.{name}: neither a preset ({', '.join(RECIPE)}) nor an albumentations "
            f"transform class (albumentations {A.__version__}; names are case-sensitive)"
        )
    return cls


def _step_args(name: str, value: Any, defaults: dict[str, Any]) -> dict[str, Any] | None:
    """Merge one step's config over its defaults; None means the step is off."""
    if value is None or value is False:
        return None
    if isinstance(value, bool):
        return dict(defaults)
    if isinstance(value, int | float):
        return {**defaults, "p": float(value)} if value > 0 else None
    if isinstance(value, Mapping):
        return {**defaults, **value}
    raise ConfigError(f"augment.{name}: expected a mapping, a probability or null, got {value!r}")


def _build(name: str, cls: type[A.BasicTransform], args: dict[str, Any]) -> A.BasicTransform:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return cls(**args)
        except (Warning, ValueError, TypeError) as exc:
            raise ConfigError(f"augment.{name} ({cls.__name__}): {exc}") from exc


def build_transforms(size: tuple[int, int], train: bool, **augment: Any) -> A.Compose:
    """The transform for training (`train=True`) or evaluation, ending at `size` (H, W).

    The final resize is a no-op when the input already has the working size (the cache
    stores images at that size); otherwise images are shrunk with INTER_AREA.
    """
    extra = {name: _library_transform(name) for name in augment if name not in RECIPE}
    steps = []
    if train:
        for name, (cls, defaults) in RECIPE.items():
            args = _step_args(name, augment.get(name, True), defaults)
            if args is not None:
                steps.append(_build(name, cls, args))
        for name, cls in extra.items():
            args = _step_args(name, augment[name], {})
            if args is not None:
                steps.append(_build(name, cls, args))
    height, width = size
    resize_args = {
        "height": height,
        "width": width,
        "interpolation": cv2.INTER_LINEAR,
        "mask_interpolation": _NEAREST,
        "area_for_downscale": "image",
    }
    steps.append(_build("resize", A.Resize, resize_args))
    return A.Compose(steps)


def transforms_for(data: DataSettings, train: bool) -> A.Compose:
    """The config's transform (`data.img_size`, `data.augment`) for training or evaluation."""
    return build_transforms(data.img_size, train=train, **data.augment)
