"""Optimizer and learning-rate schedule by name: every optimizer timm's factory knows, torch's
own schedules.

    train:
      lr: 1.0e-3
      encoder_lr_ratio: 0.1         # the encoder's rate = lr x 0.1 (null: one rate for all)
      optimizer: {name: adamw, weight_decay: 1.0e-2}   # any of timm.optim.list_optimizers()
      scheduler: {name: cosine, warmup_epochs: 1}      # step, cosine, onecycle, poly, none

Optimizer names and their defaults are timm's: `adam` and `adamw` are torch's own, `sgd`
is Nesterov SGD with momentum 0.9 (`momentum` is the classical kind), `lion`, `lamb`,
`adan`, `lookahead_adamw` and the rest as timm registers them. A pretrained encoder often
wants a lower rate than a fresh decoder: `encoder_lr_ratio` gives the encoder (every
model's `.encoder`) its own parameter group, which every schedule scales like the other.
Every schedule steps once per *iteration*, so a short run with few epochs still gets a
smooth curve and a warm-up of a fraction of an epoch is possible. `step` keeps the seed
project's recipe (x`gamma` every `step_epochs` epochs) and is the default, reading the
older `train.lr_step` / `train.lr_gamma` keys when no `scheduler` section is given.
Names and arguments are checked before any data is read (`check_recipe`), so a typo is an
error with the choices listed, not a traceback hours later.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class, get_optimizer_info
from timm.optim import list_optimizers as timm_optimizers
from torch import nn
from torch.optim import lr_scheduler

from core.config import ConfigError
from core.settings import TrainSettings

_LOOKAHEAD = "lookahead_"
# Schedule name -> the arguments it accepts besides `name` and `warmup_epochs`.
SCHEDULES: dict[str, tuple[str, ...]] = {
    "step": ("step_epochs", "gamma"),
    "cosine": ("min_lr_ratio",),
    "onecycle": ("pct_start", "div_factor", "final_div_factor"),
    "poly": ("power",),
    "none": (),
}


def _choice(section: str, spec: dict[str, Any], choices: Iterable[str]) -> str:
    name = str(spec.get("name", "")).lower()
    if name not in choices:
        raise ConfigError(
            f"train.{section}.name {spec.get('name')!r} is unknown; choose one of "
            + ", ".join(choices)
        )
    return name


def optimizer_class(opt: dict[str, Any]) -> type[torch.optim.Optimizer]:
    """timm's class for `train.optimizer.name` (a `lookahead_` prefix wraps it)."""
    name = str(opt.get("name", "")).lower()
    base = name.removeprefix(_LOOKAHEAD)
    known = timm_optimizers()
    if base not in known:
        near = difflib.get_close_matches(base, known, n=5)
        raise ConfigError(
            f"train.optimizer.name {opt.get('name')!r} is not an optimizer timm knows"
            + (f"; did you mean {', '.join(near)}?" if near else "")
            + " (list them: python -c 'import timm.optim; print(timm.optim.list_optimizers())')"
        )
    if get_optimizer_info(base).second_order:
        raise ConfigError(
            f"train.optimizer.name {base!r} is second order: it needs a backward pass with "
            "create_graph, which the training step does not take"
        )
    try:
        return get_optimizer_class(base, bind_defaults=False)
    except ImportError as exc:
        raise ConfigError(f"train.optimizer.name {base!r} needs a package: {exc}") from exc


def check_recipe(train: TrainSettings) -> None:
    """Refuse unknown optimizer/schedule names and arguments, listing what is accepted."""
    opt = train.optimizer_spec
    cls = optimizer_class(opt)
    accepted = set(inspect.signature(cls).parameters) - {"params", "lr"}
    unknown = sorted(set(opt) - accepted - {"name"})
    if unknown:
        raise ConfigError(
            f"train.optimizer: {cls.__name__} takes no {unknown}; it accepts "
            + ", ".join(sorted(accepted))
        )
    sched = train.schedule
    name = _choice("scheduler", sched, SCHEDULES)
    unknown = sorted(set(sched) - {"name", "warmup_epochs", *SCHEDULES[name]})
    if unknown:
        raise ConfigError(
            f"train.scheduler ({name}) takes no {unknown}; it accepts warmup_epochs"
            + "".join(f", {a}" for a in SCHEDULES[name])
        )
    for key, value in sched.items():
        if key != "name" and not isinstance(value, int | float):
            raise ConfigError(f"train.scheduler.{key} must be a number, got {value!r}")


def param_groups(model: nn.Module, train: TrainSettings) -> Any:
    """The model's parameters, or with `train.encoder_lr_ratio` two groups: the rest at
    `train.lr` first (the rate the log's `lr` shows), then the encoder at lr x ratio."""
    ratio = train.encoder_lr_ratio
    if ratio is None:
        return model.parameters()
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ConfigError(
            f"train.encoder_lr_ratio: {type(model).__name__} has no `.encoder` to give its own rate"
        )
    own = {id(p) for p in encoder.parameters()}
    rest = [p for p in model.parameters() if id(p) not in own]
    return [
        {"params": rest, "lr": train.lr},
        {"params": list(encoder.parameters()), "lr": train.lr * ratio},
    ]


def build_optimizer(params: Iterable[Any], train: TrainSettings) -> torch.optim.Optimizer:
    """timm's factory on `params` (tensors or `param_groups`); no parameter filtering of
    its own, so `weight_decay` applies to every parameter, as torch's optimizers do."""
    opt = train.optimizer_spec
    kwargs = {k: v for k, v in opt.items() if k != "name"}
    return create_optimizer_v2(params, opt=str(opt["name"]), lr=train.lr, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSettings, steps_per_epoch: int
) -> lr_scheduler.LRScheduler:
    """A per-iteration schedule over `train.epochs` × `steps_per_epoch` steps."""
    sched = train.schedule
    name = _choice("scheduler", sched, SCHEDULES)
    total = max(1, train.epochs * steps_per_epoch)
    warmup = min(total - 1, round(float(sched.get("warmup_epochs", 0)) * steps_per_epoch))
    if name == "onecycle":
        # OneCycle has its own warm-up (pct_start); warmup_epochs sets it when given.
        pct = warmup / total if warmup else float(sched.get("pct_start", 0.3))
        return lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total,
            pct_start=pct,
            div_factor=float(sched.get("div_factor", 25.0)),
            final_div_factor=float(sched.get("final_div_factor", 1e4)),
        )
    rest = total - warmup
    if name == "step":
        main: lr_scheduler.LRScheduler = lr_scheduler.StepLR(
            optimizer,
            step_size=max(1, int(sched.get("step_epochs", 5)) * steps_per_epoch),
            gamma=float(sched.get("gamma", 0.6)),
        )
    elif name == "cosine":
        # A factor of each group's own rate: torch's CosineAnnealingLR ends every group at
        # one absolute eta_min, which would raise a slower encoder's rate.
        floor = float(sched.get("min_lr_ratio", 0.0))
        main = lr_scheduler.LambdaLR(
            optimizer, lambda t: floor + (1 - floor) * (1 + math.cos(math.pi * t / rest)) / 2
        )
    elif name == "poly":
        main = lr_scheduler.PolynomialLR(
            optimizer, total_iters=rest, power=float(sched.get("power", 0.9))
        )
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
