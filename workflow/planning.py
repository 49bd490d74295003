"""`pipeline.py --plan`: the run's time and disk, before any of it is spent.

A competitor's session has a clock (Kaggle: 12 hours) and a disk (about 20 GB); the
default recipe is 6 models x 5 folds x 50 epochs, and nothing said before hours were
spent whether it fits. The plan measures each model on this machine (a few training steps
on the real loader and device, and a few predicted images), caches that per model, size,
batch, precision and device, and multiplies out: the training and prediction time per
fold, per stage and in total (with `--parallel`), and the disk each artefact will take
against the free space under `out_dir`. Ensemble, refine, tune and the submission take
minutes where training takes hours; they are listed, not estimated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from core.config import build_entry, config_hash
from core.runtime import Dist, configure_cpu_threads
from core.settings import DataSettings, ExperimentSettings, TrainSettings, layout_of, refining
from core.ticker import Ticker
from data.atomic import write_json
from data.dataset import to_device
from data.foldlog import read_log
from data.loader import loader_workers
from data.prepare import TrainData, prepare_train_data
from data.reader import DataError, list_test
from models.inference import NUM_CLASSES
from training.engine import build_learner, build_loaders, fold_complete
from training.recipe import training_data_changes

CALIBRATION_STEPS = 8  # timed training steps per model, after the loader's warm-up
# The measurement is waited on before any work starts: told twice as often as a loop.
MEASURE_PROGRESS_S = 30.0
ADAM_BYTES = 12  # last.pt per parameter: the weights and Adam's two moments, fp32

log = logging.getLogger("plan")


@dataclass(frozen=True)
class Calibration:
    """One model measured on this machine."""

    step_s: float  # one training step of train.batch_size images, loading included
    predict_s: float  # one image predicted, one view (no TTA)
    params: int


@dataclass(frozen=True)
class ModelPlan:
    name: str
    folds: int
    epochs: int
    train_images: int  # per fold
    val_images: int  # per fold
    batch_size: int
    calibration: Calibration
    # The epochs each fold not complete yet has trained (0: not started); None: every fold.
    unfinished: tuple[int, ...] | None = None
    predicts: bool = True  # predict.py has to run for this model (its stores are stale)

    @property
    def epoch_s(self) -> float:
        """One training epoch with its validation."""
        steps = max(1, self.train_images // self.batch_size)
        return steps * self.calibration.step_s + self.val_images * self.calibration.predict_s

    @property
    def oof_s(self) -> float:
        """A finished fold's OOF maps (one view)."""
        return self.val_images * self.calibration.predict_s

    @property
    def fold_s(self) -> float:
        """Training epochs with their validation, then the fold's OOF maps (one view)."""
        return self.epochs * self.epoch_s + self.oof_s

    @property
    def to_train(self) -> tuple[int, ...]:
        """The epochs already trained by each fold still to finish."""
        return (0,) * self.folds if self.unfinished is None else self.unfinished

    def left_s(self, epochs: int | None = None) -> float:
        """The training still to do, with `epochs` per fold (default: the config's): each
        unfinished fold resumes where it stopped (the pipeline trains with --resume)."""
        epochs = self.epochs if epochs is None else epochs
        return sum(max(0, epochs - done) * self.epoch_s + self.oof_s for done in self.to_train)


@dataclass(frozen=True)
class Plan:
    models: list[ModelPlan]
    parallel: int
    lanes: float  # folds that truly run side by side (`lanes`)
    test_images: int
    views: int  # TTA views per predicted image
    disk: dict[str, int]  # artefact -> bytes when the run is finished
    free: int  # bytes free under out_dir
    written: int = 0  # bytes already under the experiment folder and the image cache

    def train_time(self, epochs: int | None = None) -> float:
        """The training still to do, with `epochs` per fold for every model (default: each
        model's own), over the lanes."""
        return sum(m.left_s(epochs) for m in self.models) / self.lanes

    @property
    def train_s(self) -> float:
        return self.train_time()

    @property
    def predict_s(self) -> float:
        """predict.py: every fold's test maps with TTA (the OOF maps come from training),
        for the models whose stores are not current."""
        return sum(
            m.folds * self.test_images * self.views * m.calibration.predict_s
            for m in self.models
            if m.predicts
        )

    @property
    def total_s(self) -> float:
        return self.train_s + self.predict_s

    def total_time(self, epochs: int) -> float:
        """What is left with `epochs` per fold for every model (`--set train.epochs=E`)."""
        return self.train_time(epochs) + self.predict_s

    @property
    def disk_total(self) -> int:
        return sum(self.disk.values())

    @property
    def disk_left(self) -> int:
        """What the run still has to write: the finished run less what is on disk."""
        return max(0, self.disk_total - self.written)

    def without(self, model: ModelPlan) -> Plan:
        """The plan with one model fewer (`ensemble.models` naming the others)."""
        return replace(self, models=[m for m in self.models if m is not model])

    @property
    def done(self) -> bool:
        return not any(m.to_train or m.predicts for m in self.models)


def lanes(parallel: int, device: torch.device, loader_workers: int) -> float:
    """How many of `parallel` fold processes gain time: one per GPU; on a CPU, the cores
    over what one fold keeps busy (its compute thread and its loader workers), which errs
    on the long side for a budget. On the demo (2 cores, 2 loader workers) this gives 1,
    where --parallel 2 trained 1.5x faster than one fold at a time on an idle machine and
    1.14x with other work running (BENCHMARKS.md, plan)."""
    if device.type == "cuda":
        return float(min(parallel, max(1, torch.cuda.device_count())))
    return float(min(parallel, max(1.0, (os.cpu_count() or 1) / (1 + loader_workers))))


def calibration_key(cfg: dict[str, Any], name: str, device: torch.device) -> str:
    """What a measurement depends on: the network, the working size, the batch, the
    augmentation and loader, the precision, the threads and the device."""
    train = TrainSettings.from_config(cfg)
    data = DataSettings.from_config(cfg)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return config_hash(
        {
            "entry": build_entry(cfg, name),
            "data": asdict(data),
            "train": [train.batch_size, train.precision, train.channels_last, train.cpu_threads],
            "train_loss": train.loss,
            "device": [device.type, gpu, platform.machine()],
        }
    )


def warm_steps(cfg: dict[str, Any]) -> int:
    """Training steps run before the timed ones: the loader's workers start and prefetch
    two batches each meanwhile, and steps until those are used up would time the model
    without its loading, the real pace's half."""
    return 2 * loader_workers(DataSettings.from_config(cfg).num_workers) + 1


def calibrate(
    cfg: dict[str, Any], name: str, data: TrainData, dist: Dist, ticker: Ticker | None = None
) -> Calibration:
    """A few training steps of model `name` on fold 0's real loader, and a few predicted
    images, on this device; each training step is a `ticker` step."""
    # train.py's threads: on a CPU one thread per fold process (runtime.py), not all cores
    configure_cpu_threads(TrainSettings.from_config(cfg).cpu_threads)
    loaders = build_loaders(cfg, data, 0, dist)
    learner = build_learner(cfg, build_entry(cfg, name), 0, dist, len(loaders.train))
    learner.train_net.train()

    def batches(loader: Any) -> Any:
        while True:
            yield from loader

    train = batches(loaders.train)
    warm = warm_steps(cfg)
    timed = 0.0
    for step in range(warm + CALIBRATION_STEPS):
        start = time.perf_counter()
        images, masks = to_device(next(train), dist.device, learner.precision)
        learner.step(images, masks)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warm:
            timed += time.perf_counter() - start
        if ticker is not None:
            ticker.step()
    model = learner.raw.eval()
    seen, spent = 0, 0.0
    with torch.no_grad():
        for batch in loaders.val:
            images, _ = to_device(batch, dist.device, learner.precision)
            start = time.perf_counter()
            with learner.precision.autocast():
                model(images)
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            spent += time.perf_counter() - start
            seen += images.shape[0]
            if seen >= 2 * TrainSettings.from_config(cfg).batch_size:
                break
    params = sum(p.numel() for p in learner.raw.parameters())
    return Calibration(timed / CALIBRATION_STEPS, spent / max(1, seen), params)


def calibrations(
    model_cfgs: dict[str, dict[str, Any]], data: TrainData, dist: Dist, cache: Path
) -> dict[str, Calibration]:
    """Each model's calibration, measured once per key and kept in `cache`. A measurement
    takes minutes for a large model on a CPU, before any work: it says which model it
    measures, and how far it is at least every MEASURE_PROGRESS_S."""
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    keys = {name: calibration_key(cfg, name, dist.device) for name, cfg in model_cfgs.items()}
    todo = [name for name, key in keys.items() if key not in known]
    for i, name in enumerate(todo, 1):
        cfg = model_cfgs[name]
        what = f"measuring {name} ({i} of {len(todo)})"
        steps = warm_steps(cfg) + CALIBRATION_STEPS
        log.info(
            "%s on %s: %d training steps and a few images; kept in %s",
            what,
            dist.device.type,
            steps,
            cache,
        )
        with Ticker(what, steps, "steps", logger=log, every_s=MEASURE_PROGRESS_S) as ticker:
            known[keys[name]] = asdict(calibrate(cfg, name, data, dist, ticker))
        write_json(cache, known)
    return {name: Calibration(**known[key]) for name, key in keys.items()}


def disk_bytes(
    model_cfgs: dict[str, dict[str, Any]],
    calibrated: dict[str, Calibration],
    n_train: int,
    n_test: int,
    refining: bool,
) -> dict[str, int]:
    """Bytes of each kind of artefact of the finished run (last.pt: the folds in flight
    hold one each while training; kept after only with train.keep_last)."""
    first = next(iter(model_cfgs.values()))
    height, width = DataSettings.from_config(first).img_size
    n_folds = DataSettings.from_config(first).n_folds
    maps = (n_train + n_test) * NUM_CLASSES * height * width  # uint8 probabilities
    best = last = 0
    for name, cfg in model_cfgs.items():
        train = TrainSettings.from_config(cfg)
        params = calibrated[name].params
        best += params * (2 if train.half_best else 4) * n_folds
        last += params * ADAM_BYTES * (n_folds if train.keep_last else 0)
    return {
        "best weights": best,
        "last checkpoints (kept)": last,
        "probability maps": maps * (len(model_cfgs) + 1 + int(refining)),
        "image cache": (n_train + n_test) * height * width * 4,
    }


def folds_to_train(cfg: dict[str, Any], name: str, data: TrainData) -> dict[int, tuple[int, str]]:
    """{fold: (the epochs it has trained, why it trains)} for each fold of model `name` that
    train.py will train, as it will see it: it skips a complete fold, retrains one whose
    training images or masks changed from scratch, and continues one with a last.pt (the
    pipeline's --resume) from the history the fold's log copies."""
    epochs = TrainSettings.from_config(cfg).epochs
    layout = layout_of(cfg)
    left = {}
    for k in range(data.folds.n_folds):
        run = layout.fold(name, k)
        changes = training_data_changes(run, data, name, k)
        if changes:
            left[k] = (0, f"its training data changed: {changes}")
            continue
        if fold_complete(run, epochs):
            continue
        history: list[dict[str, Any]] = []
        if run.last.is_file():
            with contextlib.suppress(DataError):  # resumed from last.pt, which rewrites it
                history = read_log(run.log)
        done = history[-1]["epoch"] if history else 0
        if done:
            left[k] = (done, f"continued from epoch {done} to {epochs}")
        elif run.best.is_file():
            left[k] = (0, f"trained again to {epochs} epochs: no last.pt to continue")
        else:
            left[k] = (0, "not trained yet")
    return left


def unfinished_folds(cfg: dict[str, Any], name: str, data: TrainData) -> tuple[int, ...]:
    """The epochs each fold of model `name` that is not complete has trained (`folds_to_train`)."""
    return tuple(done for done, _ in folds_to_train(cfg, name, data).values())


def bytes_under(*folders: Path) -> int:
    """The bytes of every file under `folders` (those that exist)."""
    return sum(
        f.stat().st_size
        for folder in folders
        if folder.is_dir()
        for f in folder.rglob("*")
        if f.is_file()
    )


def free_bytes(out_dir: Path) -> int:
    """Free space on the filesystem that will hold `out_dir` (its nearest existing parent)."""
    path = out_dir.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def make_plan(
    model_cfgs: dict[str, dict[str, Any]],
    data: TrainData,
    n_test: int,
    views: int,
    parallel: int,
    refining: bool,
    dist: Dist,
    predicted: Collection[str] = (),
) -> Plan:
    """What is left of the run: the folds not complete and the predictions not current
    (`predicted`: the models whose stores are, until one of their folds trains again)."""
    first = next(iter(model_cfgs.values()))
    layout = layout_of(first)
    calibrated = calibrations(model_cfgs, data, dist, layout.plan_calibration)
    folds = data.folds
    models = []
    for name, cfg in model_cfgs.items():
        unfinished = unfinished_folds(cfg, name, data)
        models.append(
            ModelPlan(
                name,
                folds.n_folds,
                TrainSettings.from_config(cfg).epochs,
                len(folds.train_ids(0)),
                len(folds.val_ids(0)),
                TrainSettings.from_config(cfg).batch_size,
                calibrated[name],
                unfinished,
                bool(unfinished) or name not in predicted,
            )
        )
    n_train = len(data.items)
    disk = disk_bytes(model_cfgs, calibrated, n_train, n_test, refining)
    workers = loader_workers(DataSettings.from_config(first).num_workers)
    return Plan(
        models,
        parallel,
        lanes(parallel, dist.device, workers),
        n_test,
        views,
        disk,
        free_bytes(layout.out_dir),
        bytes_under(layout.root, layout.cache),
    )


def plan_run(
    cfg: dict[str, Any],
    model_cfgs: dict[str, dict[str, Any]],
    views: int,
    parallel: int,
    device: torch.device,
    predicted: Collection[str] = (),
) -> Plan:
    """The plan of what is left of an experiment's run on `device`: its split (made now
    if it is the first call), its test images with `views` TTA passes each, refinement as
    configured; `predicted`: the models whose prediction stores are current."""
    data = prepare_train_data(cfg, Dist(rank=0, world_size=1, device=torch.device("cpu")))
    n_test = len(list_test(ExperimentSettings.from_config(cfg).data()))
    dist = Dist(rank=0, world_size=1, device=device)
    return make_plan(model_cfgs, data, n_test, views, parallel, refining(cfg), dist, predicted)


def hours(seconds: float) -> str:
    """A duration at the scale it is read at: hours, minutes, or seconds for a tiny run (whose
    every figure read "0.0 min", its budget line included)."""
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def report(plan: Plan) -> list[str]:
    """The plan as the lines pipeline.py prints."""
    lines = [
        f"plan: {len(plan.models)} models x {plan.models[0].folds} folds, "
        f"{plan.parallel} fold(s) at once, test {plan.test_images} images x {plan.views} "
        "TTA view(s)",
        "model | epochs | train images/fold | s/step | ms/image | per fold | all folds | "
        "folds to train",
    ]
    for m in plan.models:
        c = m.calibration
        lines.append(
            f"{m.name} | {m.epochs} | {m.train_images} | {c.step_s:.3f} | "
            f"{1000 * c.predict_s:.1f} | {hours(m.fold_s)} | {hours(m.fold_s * m.folds)} | "
            f"{len(m.to_train)} of {m.folds}"
        )
    predicting = [m for m in plan.models if m.predicts]
    lines += [
        f"train, what is left (--parallel {plan.parallel}, {plan.lanes:g} at full speed): "
        f"{hours(plan.train_s)}",
        f"predict (test maps, every fold, TTA; {len(predicting)} of {len(plan.models)} "
        f"models): {hours(plan.predict_s)}",
        "ensemble, refine, tune, postprocess, report: minutes, not estimated",
        f"total: {hours(plan.total_s)}"
        + (" (nothing left to train or predict)" if plan.done else ""),
        "disk when finished: "
        + ", ".join(f"{k} {gigabytes(v)}" for k, v in plan.disk.items() if v)
        + f"; total {gigabytes(plan.disk_total)}, {gigabytes(plan.disk_left)} still to "
        f"write, of {gigabytes(plan.free)} free",
    ]
    return lines


def epochs_that_fit(plan: Plan, budget_s: float) -> int | None:
    """The most epochs per fold, the same for every model as `--set train.epochs=E` makes
    them, with which what is left fits in `budget_s`; None when not even one does."""
    top = max(m.epochs for m in plan.models)
    return next((e for e in range(top, 0, -1) if plan.total_time(e) <= budget_s), None)


def setting(override: str) -> str:
    """`--set KEY=VALUE` as a shell reads it back (a YAML list's brackets quoted)."""
    return shlex.join(["--set", override])


def over_budget(plan: Plan, budget_h: float | None) -> list[str]:
    """Why what is left of the plan does not fit (time budget, free disk), and settings of
    the same command that would make it fit; empty when it fits."""
    problems = []
    if budget_h is not None and plan.total_s > budget_h * 3600:
        budget = budget_h * 3600
        fits = epochs_that_fit(plan, budget)
        if fits is None:
            knobs = [f"no epoch count does (1 epoch per fold: {hours(plan.total_time(1))})"]
        else:
            knobs = [f"{setting(f'train.epochs={fits}')} ({hours(plan.total_time(fits))})"]
        if len(plan.models) > 1:
            slowest = min(plan.models, key=lambda m: plan.without(m).total_s)
            kept = plan.without(slowest)
            names = ",".join(m.name for m in kept.models)
            knobs.append(
                f"{setting(f'ensemble.models=[{names}]')} ({hours(kept.total_s)} without "
                f"the slowest model, {slowest.name})"
            )
        knobs.append("a smaller data.img_size, or more GPUs with --parallel")
        problems.append(
            f"what is left takes {hours(plan.total_s)}, over the budget of {hours(budget)}. "
            "To fit: " + "; or ".join(knobs)
        )
    if plan.disk_left > plan.free:
        problems.append(
            f"the run still has to write {gigabytes(plan.disk_left)}, over the "
            f"{gigabytes(plan.free)} free under out_dir: "
            f"{setting('train.keep_last=false')}, {setting('train.half_best=true')}, or "
            "fewer models"
        )
    return problems
