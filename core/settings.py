"""Every section of an experiment config, typed and checked: the one place that reads it.

Stages read the config in many places (the loaders, the learner, the cache, the stages'
searches, the layout). Reading it raw spread the same coercions and defaults over every
reader (`predict.tta` fell back to "none" in three modules while the defaults said
"flip"), and a wrong type surfaced deep inside a fold. Built here, a section's values have
one type and one check, and `configs/defaults.yaml` stays the one place where defaults
are written: a section is the defaults with the config's keys over them, so the classes
below declare fields, never default values. `Settings.of(cfg)` checks every section at
once (each command calls it where it starts: `cli.checked`, in the config resolvers the
stage table names, which `stages.preflight` and the commands' mains call); modules outside
`core/config.py` and this one read a section by its class
(`PredictSettings.from_config(cfg).tta`), never `cfg[...]` (tests/test_settings.py).
Classes with behaviour extend the section they read where the behaviour lives
(`decisions.Rule(DecideSettings)`, `recipe.RetryPolicy(RetrySettings)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from core.config import ConfigError, defaults, settings_from
from core.metrics import OBJECTIVES
from core.paths import Layout

STRATA = ("red", "green", "both", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train.precision (runtime.choose_precision)
TTA_CHOICES = ("none", "hflip", "flip", "d4")  # predict.tta (models.inference.tta_transforms)
LENS_NAMES = ("argmax", "region")  # decide.lens (decisions.LENSES: what each judges after)
ADJUSTMENTS = ("bonferroni", "none")  # decide.adjust
# Fewer resamples put the interval's ends (the 5th and 95th percentiles) on a handful of draws.
MIN_N_BOOT = 100
S = TypeVar("S", bound="Section")


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The config's section over its defaults (tests and tools pass partial configs)."""
    return {**defaults()[name], **(cfg.get(name) or {})}


class Section:
    """A section of the config (`NAME`), read over its defaults, unknown keys named."""

    NAME: ClassVar[str]
    # keys whose null in a config means their default, as it always did (a trial count)
    NULL_IS_DEFAULT: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def section(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The keys the class is built from (a subclass may drop or change some)."""
        section = _section(cfg, cls.NAME)
        for key in cls.NULL_IS_DEFAULT:
            if section.get(key) is None:
                section[key] = defaults()[cls.NAME][key]
        return section

    @classmethod
    def from_config(cls: type[S], cfg: Mapping[str, Any]) -> S:
        return settings_from(cls, cls.section(cfg), cls.NAME)  # type: ignore[attr-defined]

    @classmethod
    def default(cls: type[S], **changes: Any) -> S:
        """The defaults (configs/defaults.yaml) with `changes`: for code and tests that
        hold no config."""
        return cls.from_config({cls.NAME: changes})  # type: ignore[attr-defined]


def _whole(key: str, value: Any, least: int = 1) -> int:
    """`value` if a whole number of at least `least`, else the ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{key} must be a whole number of at least {least}, got {value!r}")
    return value


def _set(obj: Any, **values: Any) -> None:
    for key, value in values.items():
        object.__setattr__(obj, key, value)


@dataclass(frozen=True)
class DataSettings(Section):
    """`data:`: working size, split, loader, mask reading and sampling."""

    NAME: ClassVar[str] = "data"

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


@dataclass(frozen=True)
class TrainSettings(Section):
    """`train:` (or a model's `models.<name>.train` merged over it): the recipe of a fold.

    Options that are off are stored as their neutral value (no clipping is 0.0, no
    early stop 0, one scale (1.0,)), so readers need no None checks.
    """

    NAME: ClassVar[str] = "train"

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
class RefineSettings(Section):
    """`refine:` besides `enabled` (`refining`): the second-stage region refiner."""

    NAME: ClassVar[str] = "refine"

    crop: int  # side of the square crop, a multiple of 8
    margin: float  # context around the region's box, per side, as a fraction of it
    epochs: int
    batch_size: int
    lr: float
    width: int  # channels of the refiner's first level
    # Tiny convolutions: more threads only add synchronisation (on 2 busy cores, one
    # thread trained a fold 15x faster than two).
    cpu_threads: int

    def __post_init__(self) -> None:
        if self.crop < 16 or self.crop % 8:
            raise ConfigError(f"refine.crop must be a multiple of 8, at least 16, got {self.crop}")
        for name in ("epochs", "batch_size", "width", "cpu_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"refine.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.margin <= 2.0 or self.lr <= 0:
            raise ConfigError(f"refine.margin must be in [0, 2] and refine.lr positive: {self}")

    @classmethod
    def section(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        section = _section(cfg, cls.NAME)
        section.pop("enabled")  # the stage's switch (`refining`), not a setting
        return section


def refining(cfg: Mapping[str, Any]) -> bool:
    """Whether `refine.enabled` turns the region refinement stage on (its other keys are
    `RefineSettings`)."""
    return bool(_section(cfg, "refine")["enabled"])


@dataclass(frozen=True)
class ExperimentSettings:
    """The config's top level: where the data is read and the experiment written, the
    training seed, and where offline encoder weights are found."""

    experiment: str | None  # a loaded config always has one (the file's stem by default)
    data_dir: Path | None
    out_dir: Path
    seed: int
    pretrained_dir: Path | None

    def __post_init__(self) -> None:
        try:
            seed = int(self.seed)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"seed must be a whole number, got {self.seed!r}") from exc
        _set(
            self,
            experiment=None if self.experiment is None else str(self.experiment),
            data_dir=Path(self.data_dir) if self.data_dir not in (None, "") else None,
            out_dir=Path(self.out_dir),
            seed=seed,
            pretrained_dir=None if self.pretrained_dir is None else Path(self.pretrained_dir),
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ExperimentSettings:
        top = {k: cfg.get(k, v) for k, v in defaults().items() if k in TOP_LEVEL}
        return cls(**top)

    def data(self) -> Path:
        """The dataset folder; a config without one is refused by name (a call, so that
        a command may ask for the refusal before it needs the folder)."""
        if self.data_dir is None:
            raise ConfigError("no data dir: give --data-dir or set data_dir in the config")
        return self.data_dir

    @property
    def layout(self) -> Layout:
        """Where this experiment's artefacts go: <out_dir>/<experiment>."""
        if self.experiment is None:
            raise ConfigError("no experiment name: set experiment in the config")
        return Layout(self.out_dir / self.experiment, self.out_dir)


TOP_LEVEL = tuple(f.name for f in dataclasses.fields(ExperimentSettings))


def layout_of(cfg: Mapping[str, Any]) -> Layout:
    """The artefact paths of the experiment `cfg` describes (<out_dir>/<experiment>)."""
    return ExperimentSettings.from_config(cfg).layout


@dataclass(frozen=True)
class PredictSettings(Section):
    """`predict:`: the test-time augmentation and batch of predict.py, export and infer."""

    NAME: ClassVar[str] = "predict"

    tta: str  # TTA_CHOICES
    batch_size: int

    def __post_init__(self) -> None:
        if self.tta not in TTA_CHOICES:
            raise ConfigError(f"predict.tta {self.tta!r}: choose one of {', '.join(TTA_CHOICES)}")
        _whole("predict.batch_size", self.batch_size)


@dataclass(frozen=True)
class SearchSettings(Section):
    """`tune:` (and the search part of `ensemble:`): an optuna search's trial count and
    the score it maximises."""

    NAME: ClassVar[str] = "tune"
    NULL_IS_DEFAULT = ("trials",)

    trials: int
    objective: str

    def __post_init__(self) -> None:
        name = self.NAME
        _whole(f"{name}.trials", self.trials)
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"{name}.objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )


@dataclass(frozen=True)
class EnsembleSettings(SearchSettings):
    """`ensemble:`: the blended models (null: every model of the config) and the search."""

    NAME: ClassVar[str] = "ensemble"

    models: list[str] | None

    def __post_init__(self) -> None:
        super().__post_init__()
        models = self.models
        if models is not None and not (
            isinstance(models, list) and all(isinstance(m, str) for m in models)
        ):
            raise ConfigError(f"ensemble.models must list model names or be null, got {models!r}")


def search_section(name: str) -> type[SearchSettings]:
    """The settings class of the optuna stage `name` (ensemble or tune)."""
    return {"ensemble": EnsembleSettings, "tune": SearchSettings}[name]


@dataclass(frozen=True)
class HpoSettings(Section):
    """`hpo:`: hpo.py's search space, pruner, the fold each trial trains, and its counts."""

    NAME: ClassVar[str] = "hpo"
    NULL_IS_DEFAULT = ("trials",)

    space: dict[str, Any]
    pruner: dict[str, Any] | None
    fold: int
    epochs: int | None  # null: train.epochs
    trials: int

    def __post_init__(self) -> None:
        _whole("hpo.trials", self.trials)
        _whole("hpo.fold", self.fold, least=0)
        if self.epochs is not None:
            _whole("hpo.epochs", self.epochs)
        _set(self, space=dict(self.space or {}))


@dataclass(frozen=True)
class DecideSettings(Section):
    """`decide:`: the metric, the lens, and the bootstrap that measures noise
    (decisions.Rule adds what the rule does with them)."""

    NAME: ClassVar[str] = "decide"

    metric: str
    lens: str
    confidence: float  # two-sided level of the gain's interval
    n_boot: int
    seed: int
    adjust: str  # for picking a level's best of m: bonferroni, or none

    def __post_init__(self) -> None:
        if self.metric not in OBJECTIVES:
            raise ConfigError(f"decide.metric must be one of {OBJECTIVES}, got {self.metric!r}")
        if self.lens not in LENS_NAMES:
            raise ConfigError(f"decide.lens must be one of {LENS_NAMES}, got {self.lens!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"decide.confidence must be in (0, 1), got {self.confidence}")
        if self.adjust not in ADJUSTMENTS:
            raise ConfigError(f"decide.adjust must be one of {ADJUSTMENTS}, got {self.adjust!r}")
        if self.n_boot < MIN_N_BOOT:
            raise ConfigError(f"decide.n_boot must be at least {MIN_N_BOOT}, got {self.n_boot}")


@dataclass(frozen=True)
class RetrySettings(Section):
    """`retry:`: when a trained fold counts as failed and how often it is retrained
    (recipe.RetryPolicy adds the remedy); `retry: null` turns retraining off."""

    NAME: ClassVar[str] = "retry"

    attempts: int
    margin: float | None
    lr_scale: float
    reseed: bool

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ConfigError(f"retry.attempts must be 0 or more, got {self.attempts}")
        if self.margin is not None and self.margin < 0:
            raise ConfigError(f"retry.margin must be non-negative or null, got {self.margin}")
        if not 0 < self.lr_scale <= 1:
            raise ConfigError(f"retry.lr_scale must be in (0, 1], got {self.lr_scale}")

    @classmethod
    def section(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        section = _section(cfg, cls.NAME)
        if cls.NAME in cfg and cfg[cls.NAME] is None:
            section["attempts"] = 0
        return section


@dataclass(frozen=True)
class SlurmSettings(Section):
    """`slurm:`: what each fold job asks of the cluster (null: the cluster's default)."""

    NAME: ClassVar[str] = "slurm"

    partition: str | None
    account: str | None
    gpus_per_node: int
    cpus_per_task: int | None
    mem_gb: float | None
    timeout_min: int


def config_models(cfg: Mapping[str, Any]) -> list[str]:
    """The names of the config's `models:`, in its order."""
    return list(cfg.get("models") or {})


@dataclass(frozen=True)
class Settings:
    """The whole config, every section typed and checked at once."""

    top: ExperimentSettings
    data: DataSettings
    train: TrainSettings
    predict: PredictSettings
    ensemble: EnsembleSettings
    tune: SearchSettings
    decide: DecideSettings
    retry: RetrySettings
    refine: RefineSettings
    slurm: SlurmSettings
    hpo: HpoSettings

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> Settings:
        """Every section of `cfg` built, so that a bad value anywhere is one ConfigError
        where the command starts rather than in the stage that reads it last."""
        return cls(
            top=ExperimentSettings.from_config(cfg),
            data=DataSettings.from_config(cfg),
            train=TrainSettings.from_config(cfg),
            predict=PredictSettings.from_config(cfg),
            ensemble=EnsembleSettings.from_config(cfg),
            tune=SearchSettings.from_config(cfg),
            decide=DecideSettings.from_config(cfg),
            retry=RetrySettings.from_config(cfg),
            refine=RefineSettings.from_config(cfg),
            slurm=SlurmSettings.from_config(cfg),
            hpo=HpoSettings.from_config(cfg),
        )
