"""The training machinery: learner, step, epoch, evaluation, checkpoint state, fold logs.

train.py is the stage that drives it over folds; bench/ and hpo-style callers build the
same learner and run the same steps, so what they measure is what training does.

Design points that are easy to break:
- Resuming must reproduce the uninterrupted run. Shuffling, augmentation and dropout are
  seeded from (seed, fold, epoch[, sample]) rather than from a stream that runs on, so a
  run restarted from `last.pt` draws the same batches as one that never stopped, whatever
  the number of loader workers.
- Under DDP, validation is sharded without padding and the per-image `class_stats` rows are
  all-reduced (summed), so the score is exactly the single-process score.
- The training loss that is logged is the main head's, as the validation loss is; the
  total with side outputs (PraNet, EMCAD) is logged apart as `train_loss_total`, so the
  two curves compare like with like.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.config import ConfigError, model_entry
from core.metrics import beats_nothing, class_stats, predict_nothing, scores_from_stats
from core.paths import RunFiles
from core.runtime import (
    Dist,
    Precision,
    choose_precision,
    derive_seed,
    forced_fold_failure,
    rng_state,
    set_rng_state,
)
from core.settings import DataSettings, ExperimentSettings, TrainSettings, config_models, layout_of
from core.ticker import Ticker
from data.atomic import write_json
from data.augment import transforms_for
from data.cache import CachedItem
from data.dataset import SegDataset, to_device
from data.foldlog import failed_attempts, read_log, write_log
from data.loader import SeededDataset, SeededSampler, config_loader, stratum_weights
from data.paste import PolypPaste
from data.prepare import TrainData
from data.probstore import META_FILE
from data.reader import DataError
from models import build_model
from models.inference import NUM_CLASSES
from models.losses import SegLoss
from models.pretrained import from_scratch_hint
from training.optim import build_optimizer, build_scheduler, param_groups
from training.recipe import RetryPolicy

log = logging.getLogger("engine")

# Steps between host syncs of the running loss: one sync per step would stall the GPU queue.
LOSS_CHECK_EVERY = 20


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class FoldFailed(RuntimeError):
    """A fold still fails after every retrain the `retry:` policy allows."""


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    loss_fn: SegLoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: Precision,
    grad_clip: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns the detached (main-head, total) losses, no sync."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        main, loss = loss_fn.terms(model(images), masks)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return main.detach(), loss.detach()


def scaled_batch(
    images: torch.Tensor, masks: torch.Tensor, scales: Sequence[float], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch at one of `scales` of its size (multiples of 32), chosen by `seed`.

    Multi-scale training as in PraNet and RaBiT: images bilinearly, masks nearest, so no
    class is invented at a boundary. The choice is a function of the seed alone, so a
    resumed run draws the same sizes.
    """
    if len(scales) < 2:
        return images, masks
    gen = torch.Generator().manual_seed(seed)
    scale = scales[torch.randint(len(scales), (1,), generator=gen).item()]
    h, w = images.shape[-2:]
    size = (max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32))
    if size == (h, w):
        return images, masks
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return images, masks


def train_epoch(
    learner: Learner, loader: DataLoader, dist: Dist, desc: str, seed: int
) -> dict[str, float]:
    """Mean main-head and total training losses over the epoch and images/s (all ranks).

    The schedule and the EMA step with every optimizer step. Raises TrainingError on a
    non-finite loss; the caller then saves nothing for this epoch, so `last.pt` stays the
    last good state.
    """
    learner.train_net.train()
    device = dist.device
    total = torch.zeros(2, device=device, dtype=torch.float64)  # main head, with side outputs
    seen = 0
    start = time.perf_counter()
    bar = tqdm(
        loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if dist.is_main else True
    )
    # plain lines within a long epoch (hours of them on real data) for notebooks and logs
    ticker = Ticker(desc, len(loader), "batches", logger=log, enabled=dist.is_main)
    with ticker:
        for step, batch in enumerate(ticker.track(bar), 1):
            images, masks = to_device(batch, device, learner.precision)
            images, masks = scaled_batch(images, masks, learner.multiscale, derive_seed(seed, step))
            losses = torch.stack(learner.step(images, masks))
            learner.scheduler.step()
            if learner.ema is not None:
                learner.ema.update_parameters(learner.raw)
            total += losses * images.shape[0]
            seen += images.shape[0]
            if step % LOSS_CHECK_EVERY == 0 or step == len(loader):
                mean = total[1].item() / seen
                # Every rank must stop together: one that raised alone would leave the others
                # waiting in the next all-reduce.
                bad = torch.tensor(float(not math.isfinite(mean)), device=device)
                if dist.enabled:
                    tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
                if bad.item():
                    raise TrainingError(
                        f"{desc}: training loss became non-finite ({mean} on rank {dist.rank}) "
                        f"by step {step}"
                    )
                rate = seen * dist.world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{rate:.1f}")
    elapsed = time.perf_counter() - start
    stats = torch.cat([total, torch.tensor([float(seen)], dtype=torch.float64, device=device)])
    if dist.enabled:
        tdist.all_reduce(stats)
    n = stats[2].item()
    return {
        "train_loss": stats[0].item() / n,
        "train_loss_total": stats[1].item() / n,
        "images_per_s": n / elapsed,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    n_items: int,
    loss_fn: SegLoss,
    precision: Precision,
    dist: Dist,
) -> dict[str, float]:
    """Validation loss and scores at working resolution, exact under DDP.

    Each rank fills the `class_stats` rows of the images it saw into a zero array of all
    validation images; the all-reduced sum is then the full per-image table.
    """
    model.eval()
    device = dist.device
    stats = torch.zeros((n_items, 3, 3), dtype=torch.int64, device=device)
    loss = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        images, masks = to_device(batch, device, precision)
        with precision.autocast():
            logits = model(images)
        loss[0] += loss_fn(logits.float(), masks).double() * images.shape[0]
        loss[1] += images.shape[0]
        rows = torch.from_numpy(class_stats(logits.argmax(1), masks)).to(device)
        stats[batch["index"].to(device)] = rows
    if dist.enabled:
        tdist.all_reduce(stats)
        tdist.all_reduce(loss)
    stats_np = stats.cpu().numpy()
    return {
        "val_loss": loss[0].item() / max(loss[1].item(), 1.0),
        **scores_from_stats(stats_np),
        "nothing": scores_from_stats(predict_nothing(stats_np)),
    }


def fold_complete(run: RunFiles, epochs: int) -> bool:
    """best.pt and oof/ exist and the log has reached the epoch count or stopped early."""
    if not (run.best.is_file() and (run.oof / META_FILE).is_file()):
        return False
    try:
        history = read_log(run.log)
    except DataError as exc:
        # The log is a copy of last.pt's history: the fold is redone from there (--resume
        # rewrites the log and the OOF maps), not reported complete from a broken file.
        log.warning("%s; treating the fold as unfinished", exc)
        return False
    return bool(history) and (
        history[-1]["epoch"] >= epochs or bool(history[-1].get("stopped_early"))
    )


def compile_guarded(model: nn.Module, backend: Any = "inductor") -> nn.Module:
    """`torch.compile(model)`, or the eager model with a warning when compiling fails.

    A missing compiler toolchain or an unsupported operator must cost speed, not the run:
    failures at compile time (the first forward) fall back to eager through dynamo's
    `suppress_errors`, and a torch.compile that cannot even start returns `model`.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    try:
        return torch.compile(model, backend=backend)
    except Exception as exc:  # any failure to set up compilation means: run eager
        log.warning("torch.compile is unavailable (%s); training eagerly", exc)
        return model


@dataclass
class Learner:
    """The model and what steps it, built identically for a fresh and a resumed fold.

    `raw` owns the weights (checkpoints save its state dict); `net` is `raw` compiled when
    asked and is what evaluation runs; `train_net` is `net` wrapped in DDP under torchrun.
    """

    raw: nn.Module
    net: nn.Module
    train_net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: SegLoss
    precision: Precision
    ema: AveragedModel | None = None
    grad_clip: float = 0.0
    multiscale: Sequence[float] = (1.0,)

    def step(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step of this learner's recipe (the schedule is the caller's)."""
        return train_step(
            self.train_net,
            images,
            masks,
            self.loss_fn,
            self.optimizer,
            self.scaler,
            self.precision,
            self.grad_clip,
        )

    @property
    def eval_net(self) -> nn.Module:
        """What validation, OOF maps and best.pt use: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.net

    def inference_weights(self) -> dict[str, Any]:
        return (self.ema.module if self.ema is not None else self.raw).state_dict()

    def training_state(self) -> dict[str, Any]:
        return {
            "model": self.raw.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }

    def load_training_state(self, ckpt: dict[str, Any]) -> None:
        self.raw.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])


def build_learner(
    cfg: dict[str, Any], entry: dict[str, Any], fold: int, dist: Dist, steps_per_epoch: int = 1
) -> Learner:
    """Model (initialised from (seed, fold)), optimizer, per-step schedule, EMA, loss."""
    train = TrainSettings.from_config(cfg)
    precision = choose_precision(dist.device, train.precision, train.channels_last)
    torch.manual_seed(derive_seed(ExperimentSettings.from_config(cfg).seed, fold))
    # the config's names of this entry, for the hint that trains it from scratch instead
    names = [n for n in config_models(cfg) if model_entry(cfg, n) == entry]
    with from_scratch_hint(names):
        raw = build_model(
            entry["arch"],
            num_classes=NUM_CLASSES,
            pretrained=entry.get("pretrained"),
            **entry["kwargs"],
        )
    if dist.enabled and dist.device.type == "cuda" and train.sync_bn:
        # A few images per GPU give noisy BatchNorm statistics; SyncBatchNorm keeps the
        # same parameter names, so its checkpoints load into the plain model for inference.
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    fmt = torch.channels_last if precision.channels_last else torch.preserve_format
    raw = raw.to(dist.device, memory_format=fmt)
    optimizer = build_optimizer(param_groups(raw, train), train)
    scheduler = build_scheduler(optimizer, train, steps_per_epoch)
    ema = None
    if train.ema:
        # BatchNorm statistics are averaged too (use_buffers), so the EMA model is usable
        # as it is, without a pass over the data to recompute them.
        ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(train.ema), use_buffers=True)
    net = compile_guarded(raw) if train.compile else raw
    return Learner(
        raw=raw,
        net=net,
        train_net=nn.parallel.DistributedDataParallel(net) if dist.enabled else net,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(precision.device_type, enabled=precision.needs_scaler),
        loss_fn=SegLoss(**train.loss).to(dist.device),
        precision=precision,
        ema=ema,
        grad_clip=train.grad_clip,
        multiscale=train.multiscale,
    )


@dataclass
class FoldLoaders:
    sampler: SeededSampler
    train: DataLoader
    val: DataLoader
    val_items: list[CachedItem]


def paste_for(data: DataSettings, items: list[CachedItem]) -> PolypPaste | None:
    """`data.paste: {p, classes}` as a PolypPaste over the fold's training items, or None."""
    paste = data.paste
    if not paste:
        return None
    return PolypPaste(items, float(paste.get("p", 0.5)), paste.get("classes", [2]))


def build_loaders(cfg: dict[str, Any], data: TrainData, fold: int, dist: Dist) -> FoldLoaders:
    """Train loader (seeded, sharded, drop_last) and validation loader (sharded, unpadded)."""
    train_items = data.subset(data.folds.train_ids(fold))
    val_items = data.subset(data.folds.val_ids(fold))
    batch_size = TrainSettings.from_config(cfg).batch_size
    settings = DataSettings.from_config(cfg)
    sampler = SeededSampler(
        len(train_items),
        ExperimentSettings.from_config(cfg).seed,
        dist.rank,
        dist.world_size,
        stratum_weights([it.classes for it in train_items], settings.sampling),
    )
    name = f"{ExperimentSettings.from_config(cfg).experiment} fold {fold}"
    train = config_loader(
        cfg,
        SeededDataset(
            SegDataset(
                train_items, transforms_for(settings, train=True), paste_for(settings, train_items)
            )
        ),
        batch_size,
        dist.device,
        sampler,
        name=f"{name} training",
        drop_last=True,
    )
    if len(train) == 0:
        raise ConfigError(
            f"batch size {batch_size} x {dist.world_size} process(es) exceeds the "
            f"{len(train_items)} training images of fold {fold}"
        )
    val = config_loader(
        cfg,
        SegDataset(val_items, transforms_for(settings, train=False)),
        batch_size,
        dist.device,
        list(range(dist.rank, len(val_items), dist.world_size)),
        name=f"{name} validation",
    )
    return FoldLoaders(sampler, train, val, val_items)


def run_epoch(
    learner: Learner, loaders: FoldLoaders, epoch: int, dist: Dist, desc: str, seed: int
) -> dict[str, Any]:
    """Train and validate one epoch (0-based); the log record."""
    loaders.sampler.set_epoch(epoch)
    rates = {
        key: group["lr"]
        for key, group in zip(("lr", "encoder_lr"), learner.optimizer.param_groups, strict=False)
    }
    started = time.perf_counter()
    train = train_epoch(learner, loaders.train, dist, desc, seed)
    scores = evaluate(
        learner.eval_net,
        loaders.val,
        len(loaders.val_items),
        learner.loss_fn,
        learner.precision,
        dist,
    )
    return {
        "epoch": epoch + 1,
        "train_loss": train["train_loss"],
        "train_loss_total": train["train_loss_total"],
        **scores,
        **rates,
        "images_per_s": train["images_per_s"],
        "epoch_time_s": time.perf_counter() - started,
        "precision": learner.precision.name,
    }


@dataclass
class FitState:
    """A fold's training so far: what `last.pt` saves and a resumed run starts from."""

    epoch: int = 0
    best_score: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)


def _flat_for(history: list[dict[str, Any]], patience: int) -> bool:
    """True when the best validation score is `patience` or more epochs old."""
    best = max(i for i, r in enumerate(history) if r["best"])
    return len(history) - 1 - best >= patience


def fit(
    cfg: dict[str, Any],
    learner: Learner,
    loaders: FoldLoaders,
    fold: int,
    dist: Dist,
    name: str,
    state: FitState,
) -> Iterator[dict[str, Any]]:
    """Train the epochs after `state.epoch` up to train.epochs, yielding each epoch's record.

    One loop for every caller, so a search trial trains exactly as train.py does: each
    epoch is seeded from (seed, fold, epoch), and `state` already holds the record when it
    is yielded, with `best` (a new best `train.best_metric`) and `stopped_early`
    (`early_stop_patience` epochs without one; training ends after it). The caller acts
    between epochs: train.py checkpoints, hpo.py reports to optuna and stops by raising.
    """
    train = TrainSettings.from_config(cfg)
    epochs, patience, best_metric = train.epochs, train.early_stop_patience, train.best_metric
    if state.history and state.history[-1].get("stopped_early"):
        return
    for epoch in range(state.epoch, epochs):
        seed = derive_seed(ExperimentSettings.from_config(cfg).seed, fold, epoch)
        torch.manual_seed(seed)
        record = run_epoch(
            learner, loaders, epoch, dist, f"{name} epoch {epoch + 1}/{epochs}", seed
        )
        record["best"] = record[best_metric] > state.best_score
        state.best_score = max(state.best_score, record[best_metric])
        state.history = [*state.history, record]
        state.epoch = epoch + 1
        record["stopped_early"] = bool(patience) and _flat_for(state.history, patience)
        yield record
        if record["stopped_early"]:
            log.info("%s: no better score for %d epochs; stopped early", name, patience)
            return


def log_epoch(name: str, epochs: int, record: dict[str, Any]) -> None:
    log.info(
        "%s epoch %d/%d: loss %.4f val %.4f competition %.4f seg %.4f neo %.4f non %.4f "
        "lr %.2e %.1f img/s %.1fs%s",
        name,
        record["epoch"],
        epochs,
        record["train_loss"],
        record["val_loss"],
        record["competition"],
        record["dice_seg"],
        record["dice_neo"],
        record["dice_non"],
        record["lr"],
        record["images_per_s"],
        record["epoch_time_s"],
        " (best)" if record["best"] else "",
    )


# --------------------------------------------------------------------------- failed folds


@dataclass(frozen=True)
class Verdict:
    """Why a trained fold counts as failed, and whether retraining it can help.

    `kind` is "nothing" (it never beat predicting nothing), "trails" (its gain over that
    trails its model's other folds) or "forced" (the NEOPOLYP_FAIL_FOLD test hook).
    `retrain` is False for a fold that never beat predicting nothing when no other fold
    of its model did either: then the recipe, not the seed, is the limit (a one-epoch
    smoke run, a fold trained alone), so a retrain would spend the time again for the
    same result, and failing the run would punish a deliberately short recipe. Such a
    fold is kept, and its reason names what to change.
    """

    reason: str
    kind: str
    retrain: bool = True


def _best_and_nothing(history: Sequence[dict[str, Any]], metric: str) -> tuple[float, float] | None:
    """A fold's best validation `metric` and predicting nothing's on its validation
    images; None for a log written before the predict-nothing score was recorded."""
    if not history or "nothing" not in history[-1]:
        return None
    return max(r[metric] for r in history), history[-1]["nothing"][metric]


def fold_verdict(
    history: Sequence[dict[str, Any]],
    metric: str,
    others: Sequence[Sequence[dict[str, Any]]],
    margin: float | None,
) -> Verdict | None:
    """Why a trained fold counts as failed, or None when it does not.

    Failed: its best validation `metric` never beat predicting nothing on its own
    validation images (metrics.beats_nothing), or (`margin` not None, at least two other
    complete folds) its gain over predicting nothing is more than `margin` below the
    median gain of `others`. The first is worth a retrain only when one of `others` beat
    predicting nothing, which shows that the recipe can. Logs written before the
    predict-nothing score was recorded are never judged.
    """
    scores = _best_and_nothing(history, metric)
    if scores is None:
        return None
    best, nothing = scores
    peers = [s for s in (_best_and_nothing(h, metric) for h in others) if s is not None]
    if not beats_nothing(best, nothing):
        return Verdict(
            f"best validation {metric} {best:.4f} never beat predicting nothing ({nothing:.4f})",
            "nothing",
            retrain=any(beats_nothing(*s) for s in peers),
        )
    gains = [b - n for b, n in peers]
    if margin is not None and len(gains) >= 2:
        median = float(np.median(gains))
        if best - nothing < median - margin:
            return Verdict(
                f"gain over predicting nothing {best - nothing:.4f} trails the median of its "
                f"model's other folds ({median:.4f}) by more than {margin}",
                "trails",
            )
    return None


def recipe_limit(model_name: str, history: Sequence[dict[str, Any]], train: TrainSettings) -> str:
    """What a kept fold's reason adds: why it was not retrained, and the setting to change,
    read from its curve: still rising at its last epoch, it needs more epochs; past its
    best, more of the same will not help, but another learning rate may."""
    scores = [r[train.best_metric] for r in history]
    best_epoch = int(np.argmax(scores)) + 1
    head = (
        f"not retrained: no other trained fold of {model_name} beat it either, so the "
        "recipe is the limit, not the seed"
    )
    if best_epoch == len(history):
        return f"{head}; it was best at its last epoch: raise train.epochs (now {train.epochs})"
    return (
        f"{head}; its best epoch was {best_epoch} of {len(history)}: try another train.lr "
        f"(now {train.lr:g})"
    )


def judge_fold(cfg: dict[str, Any], model_name: str, fold: int) -> Verdict | None:
    """`fold_verdict` of a complete fold against its model's other complete folds, on
    `train.best_metric`; None for a fold that is fine or not complete yet. A kept fold's
    reason ends with `recipe_limit`."""
    layout = layout_of(cfg)
    attempts = len(failed_attempts(layout.fold(model_name, fold)))
    forced = forced_fold_failure(model_name, fold, attempts)
    if forced is not None:
        return (
            Verdict("forced to fail by NEOPOLYP_FAIL_FOLD (a test hook)", "forced")
            if forced
            else None
        )
    train = TrainSettings.from_config(cfg)
    if not fold_complete(layout.fold(model_name, fold), train.epochs):
        return None
    others = [
        read_log(layout.fold(model_name, j).log)
        for j in range(DataSettings.from_config(cfg).n_folds)
        if j != fold and fold_complete(layout.fold(model_name, j), train.epochs)
    ]
    history = read_log(layout.fold(model_name, fold).log)
    verdict = fold_verdict(history, train.best_metric, others, RetryPolicy.from_config(cfg).margin)
    if verdict is None or verdict.retrain:
        return verdict
    limit = recipe_limit(model_name, history, train)
    return replace(verdict, reason=f"{verdict.reason}; {limit}")


def retire_attempt(cfg: dict[str, Any], model_name: str, fold: int, reason: str) -> int:
    """Record a failed attempt and clear the fold for the next one; returns its number.

    The log is kept as `failed_attempt<n>.jsonl`, the checkpoints and OOF maps go (a
    Kaggle session has ~20 GB of disk), and `retries.json` is written last: a kill before
    it leaves the attempt unrecorded, and the rerun trains the same attempt again.
    """
    out = layout_of(cfg).fold(model_name, fold)
    failed = failed_attempts(out)
    attempt = len(failed)
    history = read_log(out.log)
    write_log(out.failed_log(attempt), history)
    for path in (out.best, out.last, out.log):
        path.unlink(missing_ok=True)
    shutil.rmtree(out.oof, ignore_errors=True)
    policy = RetryPolicy.from_config(cfg)
    tried = policy.remedy(cfg, attempt)
    failed.append(
        {
            "attempt": attempt,
            "reason": reason,
            "seed": ExperimentSettings.from_config(tried).seed,
            "lr": TrainSettings.from_config(tried).lr,
            "epochs": len(history),
            "log": out.failed_log(attempt).name,
        }
    )
    write_json(out.retries, {"failed": failed, "policy": policy.to_dict()})
    return attempt
