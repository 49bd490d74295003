"""Optimizer and learning-rate schedule by name, from torch's own implementations.

    train:
      lr: 1.0e-3
      optimizer: {name: adamw, weight_decay: 1.0e-2}          # adam | adamw | sgd
      scheduler: {name: cosine, warmup_epochs: 1}   # step, cosine, onecycle, poly, none

Every schedule steps once per *iteration*, so a short run with few epochs still gets a
smooth curve and a warm-up of a fraction of an epoch is possible. `step` keeps the seed
project's recipe (×`gamma` every `step_epochs` epochs) and is the default, reading the
older `train.lr_step` / `train.lr_gamma` keys when no `scheduler` section is given.
Names and arguments are checked before any data is read (`check_recipe`), so a typo is an
error with the choices listed, not a traceback hours later.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import lr_scheduler

from config import ConfigError

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
# Schedule name -> the arguments it accepts besides `name` and `warmup_epochs`.
SCHEDULES: dict[str, tuple[str, ...]] = {
    "step": ("step_epochs", "gamma"),
    "cosine": ("min_lr_ratio",),
    "onecycle": ("pct_start", "div_factor", "final_div_factor"),
    "poly": ("power",),
    "none": (),
}


def optimizer_cfg(tcfg: dict[str, Any]) -> dict[str, Any]:
    """`train.optimizer`, defaulting to the seed's Adam with `train.weight_decay`."""
    cfg = dict(tcfg.get("optimizer") or {"name": "adam"})
    if "weight_decay" not in cfg and "weight_decay" in tcfg:
        cfg["weight_decay"] = tcfg["weight_decay"]
    return cfg


def scheduler_cfg(tcfg: dict[str, Any]) -> dict[str, Any]:
    """`train.scheduler`, defaulting to the seed's step schedule (`lr_step`, `lr_gamma`)."""
    if tcfg.get("scheduler"):
        return dict(tcfg["scheduler"])
    return {
        "name": "step",
        "step_epochs": tcfg.get("lr_step", 5),
        "gamma": tcfg.get("lr_gamma", 0.6),
    }


def _choice(section: str, cfg: dict[str, Any], choices: Iterable[str]) -> str:
    name = str(cfg.get("name", "")).lower()
    if name not in choices:
        raise ConfigError(
            f"train.{section}.name {cfg.get('name')!r} is unknown; choose one of "
            + ", ".join(choices)
        )
    return name


def check_recipe(tcfg: dict[str, Any]) -> None:
    """Refuse unknown optimizer/schedule names and arguments, listing what is accepted."""
    opt = optimizer_cfg(tcfg)
    cls = OPTIMIZERS[_choice("optimizer", opt, OPTIMIZERS)]
    accepted = set(inspect.signature(cls).parameters) - {"params", "lr"}
    unknown = sorted(set(opt) - accepted - {"name"})
    if unknown:
        raise ConfigError(
            f"train.optimizer: {cls.__name__} takes no {unknown}; it accepts "
            + ", ".join(sorted(accepted))
        )
    sched = scheduler_cfg(tcfg)
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


def build_optimizer(params: Iterable[Any], tcfg: dict[str, Any]) -> torch.optim.Optimizer:
    opt = optimizer_cfg(tcfg)
    cls = OPTIMIZERS[_choice("optimizer", opt, OPTIMIZERS)]
    kwargs = {k: v for k, v in opt.items() if k != "name"}
    return cls(params, lr=float(tcfg["lr"]), **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, tcfg: dict[str, Any], steps_per_epoch: int
) -> lr_scheduler.LRScheduler:
    """A per-iteration schedule over `train.epochs` × `steps_per_epoch` steps."""
    sched = scheduler_cfg(tcfg)
    name = _choice("scheduler", sched, SCHEDULES)
    total = max(1, int(tcfg["epochs"]) * steps_per_epoch)
    warmup = min(total - 1, round(float(sched.get("warmup_epochs", 0)) * steps_per_epoch))
    lr = float(tcfg["lr"])
    if name == "onecycle":
        # OneCycle has its own warm-up (pct_start); warmup_epochs sets it when given.
        pct = warmup / total if warmup else float(sched.get("pct_start", 0.3))
        return lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=lr,
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
        main = lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=rest, eta_min=lr * float(sched.get("min_lr_ratio", 0.0))
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
