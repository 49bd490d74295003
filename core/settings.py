"""The `data`, `train` and `refine` sections of an experiment config, typed and checked once.

Stages read these sections in many places (the loaders, the learner, the cache, the
schedule, the threads). Reading them raw spread the same coercions and defaults over
every reader, and a wrong type surfaced deep inside a fold. Built here, a section's
values have one type and one check, and `configs/defaults.yaml` stays the one place
where defaults are written: a section is the defaults with the config's keys over them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.config import ConfigError, defaults, settings_from

STRATA = ("red", "green", "both", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train.precision (runtime.choose_precision)
TTA_CHOICES = ("none", "hflip", "flip", "d4")  # predict.tta (models.inference.tta_transforms)


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The config's section over its defaults (tests and tools pass partial configs)."""
    return {**defaults()[name], **(cfg.get(name) or {})}


def _set(obj: Any, **values: Any) -> None:
    for key, value in values.items():
        object.__setattr__(obj, key, value)


@dataclass(frozen=True)
class DataSettings:
    """`data:`: working size, split, loader, mask reading and sampling."""

    img_size: tuple[int, int]
    n_folds: int
    fold_seed: int
    num_workers: int
    loader_timeout_s: float
    mask: dict[str, Any]  # data.reader.MaskThresholds fields (checked by that class)
    augment: dict[str, Any]  # data.augment.build_transforms arguments (checked there)
    sampling: dict[str, float]
    paste: dict[str, Any] | None
    allow_empty_masks: bool
    max_ambiguous_frac: float

    def __post_init__(self) -> None:
        size = self.img_size
        if not (
            isinstance(size, list | tuple)
            and len(size) == 2
            and all(isinstance(s, int) for s in size)
        ):
            raise ConfigError(f"data.img_size must be [height, width], got {size!r}")
        if any(s <= 0 or s % 32 for s in size):
            raise ConfigError(f"data.img_size {list(size)} must be positive multiples of 32")
        if int(self.n_folds) < 2:
            raise ConfigError("data.n_folds must be at least 2")
        paste = self.paste or {}
        if not isinstance(paste, dict) or set(paste) - {"p", "classes"}:
            raise ConfigError(f"data.paste is {{p: 0..1, classes: [1, 2]}} or null; got {paste!r}")
        if not set(paste.get("classes", [2])) <= {1, 2} or not 0 <= paste.get("p", 0.5) <= 1:
            raise ConfigError(f"data.paste: p in [0, 1], classes from [1, 2]; got {paste!r}")
        sampling = self.sampling or {}
        if not isinstance(sampling, dict) or set(sampling) - set(STRATA):
            raise ConfigError(
                f"data.sampling maps strata ({', '.join(sorted(STRATA))}) to weights; "
                f"got {sampling!r}"
            )
        if any(not isinstance(w, int | float) or w < 0 for w in sampling.values()):
            raise ConfigError(f"data.sampling weights must be non-negative numbers: {sampling!r}")
        _set(
            self,
            img_size=(size[0], size[1]),
            n_folds=int(self.n_folds),
            fold_seed=int(self.fold_seed or 0),
            num_workers=int(self.num_workers or 0),
            loader_timeout_s=float(self.loader_timeout_s),
            mask=dict(self.mask or {}),
            augment=dict(self.augment or {}),
            sampling=dict(sampling),
            paste=dict(paste) if paste else None,
            allow_empty_masks=bool(self.allow_empty_masks),
            max_ambiguous_frac=float(self.max_ambiguous_frac),
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DataSettings:
        return settings_from(cls, _section(cfg, "data"), "data")


@dataclass(frozen=True)
class TrainSettings:
    """`train:` (or a model's `models.<name>.train` merged over it): the recipe of a fold.

    Options that are off are stored as their neutral value (no clipping is 0.0, no
    early stop 0, one scale (1.0,)), so readers need no None checks.
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_step: int
    lr_gamma: float
    encoder_lr_ratio: float | None
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    loss: dict[str, Any]  # models.losses.SegLoss arguments (checked by recipe.check_config)
    ema: float | None
    multiscale: tuple[float, ...]
    grad_clip: float
    early_stop_patience: int
    best_metric: str
    keep_last: bool
    half_best: bool
    precision: str  # PRECISIONS
    channels_last: bool
    compile: bool
    sync_bn: bool
    wandb: bool
    wandb_project: str
    cpu_threads: int
    deterministic: bool

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"train.{key} must be at least 1")
        if float(self.lr) <= 0:
            raise ConfigError("train.lr must be positive")
        ratio = self.encoder_lr_ratio
        if ratio is not None and not (isinstance(ratio, int | float) and ratio > 0):
            raise ConfigError(
                f"train.encoder_lr_ratio must be a positive number or null: {ratio!r}"
            )
        scales = self.multiscale or [1.0]
        if not all(isinstance(x, int | float) and 0.25 <= x <= 4 for x in scales):
            raise ConfigError(f"train.multiscale must list scales in [0.25, 4], got {scales!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"train.precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}"
            )
        if self.ema is not None and not 0 < float(self.ema) < 1:
            raise ConfigError(f"train.ema is the EMA decay, in (0, 1) or null; got {self.ema!r}")
        _set(
            self,
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            encoder_lr_ratio=None if ratio is None else float(ratio),
            optimizer=dict(self.optimizer) if self.optimizer else None,
            scheduler=dict(self.scheduler) if self.scheduler else None,
            loss=dict(self.loss or {}),
            ema=None if self.ema is None else float(self.ema),
            multiscale=tuple(float(x) for x in scales),
            grad_clip=float(self.grad_clip or 0.0),
            early_stop_patience=int(self.early_stop_patience or 0),
            best_metric=str(self.best_metric),
            cpu_threads=int(self.cpu_threads or 1),
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TrainSettings:
        return settings_from(cls, _section(cfg, "train"), "train")

    @property
    def optimizer_spec(self) -> dict[str, Any]:
        """`optimizer`, defaulting to the seed's Adam with `weight_decay`."""
        spec = dict(self.optimizer or {"name": "adam"})
        spec.setdefault("weight_decay", self.weight_decay)
        return spec

    @property
    def schedule(self) -> dict[str, Any]:
        """`scheduler`, defaulting to the seed's step schedule (`lr_step`, `lr_gamma`)."""
        if self.scheduler:
            return dict(self.scheduler)
        return {"name": "step", "step_epochs": self.lr_step, "gamma": self.lr_gamma}


@dataclass(frozen=True)
class RefineSettings:
    """The `refine:` section of a config (besides `enabled`)."""

    crop: int = 64  # side of the square crop, a multiple of 8
    margin: float = 0.25  # context around the region's box, per side, as a fraction of it
    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 16  # channels of the refiner's first level
    # Tiny convolutions: more threads only add synchronisation (on 2 busy cores, one
    # thread trained a fold 15x faster than two).
    cpu_threads: int = 1

    def __post_init__(self) -> None:
        if self.crop < 16 or self.crop % 8:
            raise ConfigError(f"refine.crop must be a multiple of 8, at least 16, got {self.crop}")
        for name in ("epochs", "batch_size", "width", "cpu_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"refine.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.margin <= 2.0 or self.lr <= 0:
            raise ConfigError(f"refine.margin must be in [0, 2] and refine.lr positive: {self}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> RefineSettings:
        section = dict(cfg.get("refine") or {})
        section.pop("enabled", None)
        return settings_from(cls, section, "refine")


def refining(cfg: Mapping[str, Any]) -> bool:
    """Whether `refine.enabled` turns the region refinement stage on (its other keys are
    `RefineSettings`)."""
    return bool((cfg.get("refine") or {}).get("enabled"))
