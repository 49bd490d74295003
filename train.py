"""Stage 1: train one model on one or more folds of the shared split.

    python train.py --model deeplabv3plus_resnet50 --fold 0
    python train.py --model unet --fold all --epochs 3 train.lr=3e-4
    torchrun --nproc_per_node=4 train.py --model pranet --fold 2

Everything a fold produces lives in `<out_dir>/<experiment>/<model>/fold<k>/` (see
docs/contracts.md): `last.pt` after every epoch, `best.pt` by validation competition Dice,
`log.jsonl`, the resolved `config.yaml` and, at the end, the fold's out-of-fold
probabilities `oof/`.

Design points that are easy to break:
- Resuming must reproduce the uninterrupted run. Shuffling, augmentation and dropout are
  seeded from (seed, fold, epoch[, sample]) rather than from a stream that runs on, so a
  run restarted from `last.pt` draws the same batches as one that never stopped, whatever
  the number of loader workers.
- The log is part of the checkpoint (`history`) and rewritten from it, so `log.jsonl`
  never holds an epoch twice or an epoch the checkpoint does not know about.
- Under DDP, validation is sharded without padding and the per-image `class_stats` rows are
  all-reduced (summed), so the score is exactly the single-process score.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

import tracking
from config import (
    ConfigError,
    add_config_arguments,
    experiment_dir,
    model_entry,
    provenance,
    reports_environment_errors,
    resolve_cli_config,
    save_config,
    setup_logging,
)
from data.atomic import save_torch, write_text
from data.augment import build_transforms
from data.cache import CachedItem, check_masks, prepare_for_config
from data.dataset import SegDataset
from data.folds import Folds, load_or_make_folds
from data.loader import (
    LoaderStalled,
    SeededDataset,
    SeededSampler,
    config_loader,
    stratum_weights,
)
from data.paste import PolypPaste
from data.probstore import save_probs
from data.reader import DataError, MaskThresholds, list_train
from metrics import OBJECTIVES, class_stats, scores_from_stats
from models import build_model
from models.inference import (
    NUM_CLASSES,
    Probabilities,
    load_checkpoint,
    predict_probs,
)
from models.losses import SegLoss
from models.pretrained import parse_pretrained
from optim import build_optimizer, build_scheduler, check_recipe, scheduler_cfg
from recipe import check_fold, fold_recipe, recipe_hash, write_recipe
from runtime import (
    Dist,
    Precision,
    add_runtime_arguments,
    choose_precision,
    configure_cpu_threads,
    derive_seed,
    init_dist,
    kill_point,
    rng_state,
    runtime_flags,
    set_rng_state,
    to_device,
)

log = logging.getLogger("train")

DEFAULT_CONFIG = "configs/bkai.yaml"
# Steps between host syncs of the running loss: one sync per step would stall the GPU queue.
LOSS_CHECK_EVERY = 20


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


# --------------------------------------------------------------------------- configuration


def parse_img_size(text: str) -> list[int]:
    """`352` -> [352, 352]; `352x416` -> [352, 416] (height x width)."""
    parts = text.lower().split("x")
    try:
        size = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--img-size {text!r}: expected N or HxW, e.g. 352 or 352x416") from None
    if len(size) == 1:
        size *= 2
    if len(size) != 2:
        raise ConfigError(f"--img-size {text!r}: expected N or HxW, e.g. 352 or 352x416")
    return size


def parse_folds(spec: str, n_folds: int) -> list[int]:
    """`all`, `3` or `0,2` -> fold indices, each checked against the config's n_folds."""
    if spec.strip().lower() == "all":
        return list(range(n_folds))
    folds: list[int] = []
    for part in spec.split(","):
        try:
            k = int(part)
        except ValueError:
            raise ConfigError(f"--fold {spec!r}: expected 'all', K or K1,K2,...") from None
        if not 0 <= k < n_folds:
            raise ConfigError(f"--fold {k} is out of range: data.n_folds is {n_folds}")
        if k not in folds:
            folds.append(k)
    return folds


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Config file, then `key=value` overrides, then the dedicated flags, then checks."""
    flags: dict[str, Any] = {
        "seed": args.seed,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        **runtime_flags(args),
        "data.img_size": parse_img_size(args.img_size) if args.img_size else None,
        "train.wandb": True if args.wandb else None,
        "train.compile": True if args.compile else None,
    }
    if args.pretrained is not None:
        flags[f"models.{args.model}.pretrained"] = args.pretrained
    cfg = resolve_cli_config(args, flags)
    model_entry(cfg, args.model)
    check_config(cfg)
    # A missing pretrained file is an error now, not after the data has been cached.
    parse_pretrained(model_entry(cfg, args.model).get("pretrained"))
    return cfg


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config key {dotted!r} is missing")
        node = node[part]
    return node


def check_config(cfg: dict[str, Any]) -> None:
    """Fail before any work on values that would only break hours later."""
    for key in ("experiment", "data_dir", "out_dir", "seed"):
        _get(cfg, key)
    size = _get(cfg, "data.img_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size)):
        raise ConfigError(f"data.img_size must be [height, width], got {size!r}")
    if any(s <= 0 or s % 32 for s in size):
        raise ConfigError(f"data.img_size {size} must be positive multiples of 32")
    if int(_get(cfg, "data.n_folds")) < 2:
        raise ConfigError("data.n_folds must be at least 2")
    for key in ("train.epochs", "train.batch_size"):
        if int(_get(cfg, key)) < 1:
            raise ConfigError(f"{key} must be at least 1")
    if float(_get(cfg, "train.lr")) <= 0:
        raise ConfigError("train.lr must be positive")
    tcfg = cfg["train"]
    check_recipe(tcfg)
    check_loss_args(tcfg.get("loss") or {})
    scales = tcfg.get("multiscale") or [1.0]
    if not all(isinstance(x, int | float) and 0.25 <= x <= 4 for x in scales):
        raise ConfigError(f"train.multiscale must list scales in [0.25, 4], got {scales!r}")
    if tcfg.get("best_metric", "competition") not in OBJECTIVES:
        raise ConfigError(
            f"train.best_metric {tcfg['best_metric']!r}: choose one of {', '.join(OBJECTIVES)}"
        )
    ema = tcfg.get("ema")
    if ema is not None and not 0 < float(ema) < 1:
        raise ConfigError(f"train.ema is the EMA decay, in (0, 1) or null; got {ema!r}")
    paste = cfg["data"].get("paste") or {}
    if not isinstance(paste, dict) or set(paste) - {"p", "classes"}:
        raise ConfigError(f"data.paste is {{p: 0..1, classes: [1, 2]}} or null; got {paste!r}")
    if not set(paste.get("classes", [2])) <= {1, 2} or not 0 <= paste.get("p", 0.5) <= 1:
        raise ConfigError(f"data.paste: p in [0, 1], classes from [1, 2]; got {paste!r}")
    sampling = cfg["data"].get("sampling") or {}
    strata = {"red", "green", "both", "none"}
    if not isinstance(sampling, dict) or set(sampling) - strata:
        raise ConfigError(
            f"data.sampling maps strata ({', '.join(sorted(strata))}) to weights; got {sampling!r}"
        )
    if any(not isinstance(w, int | float) or w < 0 for w in sampling.values()):
        raise ConfigError(f"data.sampling weights must be non-negative numbers: {sampling!r}")
    MaskThresholds.from_mapping(cfg["data"].get("mask"))


def check_loss_args(loss_cfg: dict[str, Any]) -> None:
    """`train.loss` keys against SegLoss's arguments, before any data is read."""
    accepted = set(inspect.signature(SegLoss).parameters)
    unknown = sorted(set(loss_cfg) - accepted)
    if unknown:
        raise ConfigError(
            f"train.loss takes no {unknown}; it accepts " + ", ".join(sorted(accepted))
        )


def fold_dir(cfg: dict[str, Any], model_name: str, fold: int) -> Path:
    return experiment_dir(cfg) / model_name / f"fold{fold}"


def check_recipes_early(cfg: dict[str, Any], model_name: str, folds: Sequence[int]) -> None:
    """Before any data is read: refuse folds made with another recipe or split.

    The split is compared when `folds.json` exists; otherwise it is compared once the
    new split is made (train_fold), so a changed recipe still fails before any work.
    """
    path = experiment_dir(cfg) / "folds.json"
    split_id = None
    if path.exists():
        try:
            split_id = json.loads(path.read_text())["split_id"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a readable folds file ({exc}); delete it") from exc
    recipe = fold_recipe(cfg, model_name, split_id or "")
    for k in folds:
        check_fold(fold_dir(cfg, model_name, k), recipe, str(cfg["experiment"]), bool(split_id))


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """The cached working-size items and the shared split."""

    items: list[CachedItem]
    folds: Folds

    def subset(self, ids: Sequence[str]) -> list[CachedItem]:
        by_id = {it.id: it for it in self.items}
        return [by_id[i] for i in ids]


def prepare_train_data(cfg: dict[str, Any], dist: Dist) -> TrainData:
    """List, cache and split the training set; under DDP rank 0 goes first.

    The cache (under `<out_dir>/cache`) is shared by all experiments: its keys include the
    working size and mask thresholds. The split is per experiment and seeded by
    `data.fold_seed`, not by the training seed, so a second seed of a model trains on the
    same folds as the first.
    """
    samples = list_train(Path(cfg["data_dir"]))
    data_cfg = cfg["data"]

    def run() -> TrainData:
        items = prepare_for_config(cfg, samples)
        check_masks(items, {s.id: s.mask for s in samples}, data_cfg)
        folds = load_or_make_folds(
            experiment_dir(cfg) / "folds.json",
            {it.id: it.classes for it in items},
            int(data_cfg["n_folds"]),
            int(data_cfg.get("fold_seed", 0)),
        )
        return TrainData(items, folds)

    if dist.is_main:
        data = run()
    dist.barrier()
    if not dist.is_main:
        data = run()
    return data


def eval_transform(cfg: dict[str, Any]) -> Any:
    data_cfg = cfg["data"]
    return build_transforms(
        tuple(data_cfg["img_size"]), train=False, **(data_cfg.get("augment") or {})
    )


# --------------------------------------------------------------------------- steps


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: Precision,
    grad_clip: float = 0.0,
) -> torch.Tensor:
    """One optimisation step; returns the detached loss without syncing the device."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = loss_fn(model(images), masks)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


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
) -> tuple[float, float]:
    """Mean training loss over the epoch and images/s (all ranks together).

    The schedule and the EMA step with every optimizer step. Raises TrainingError on a
    non-finite loss; the caller then saves nothing for this epoch, so `last.pt` stays the
    last good state.
    """
    learner.train_net.train()
    device = dist.device
    total = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(
        loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if dist.is_main else True
    )
    for step, batch in enumerate(bar, 1):
        images, masks = to_device(batch, device, learner.precision)
        images, masks = scaled_batch(images, masks, learner.multiscale, derive_seed(seed, step))
        loss = learner.step(images, masks)
        learner.scheduler.step()
        if learner.ema is not None:
            learner.ema.update_parameters(learner.raw)
        total += loss * images.shape[0]
        seen += images.shape[0]
        if step % LOSS_CHECK_EVERY == 0 or step == len(loader):
            mean = total.item() / seen
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
    stats = torch.tensor([total.item(), float(seen)], dtype=torch.float64, device=device)
    if dist.enabled:
        tdist.all_reduce(stats)
    return stats[0].item() / stats[1].item(), stats[1].item() / elapsed


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
    scores = scores_from_stats(stats.cpu().numpy())
    return {"val_loss": loss[0].item() / max(loss[1].item(), 1.0), **scores}


def read_log(path: Path) -> list[dict[str, Any]]:
    """The fold's log records; DataError naming the file when a line is not a record."""
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise DataError(f"{path}: damaged log ({exc})") from exc


def fold_complete(directory: Path, epochs: int) -> bool:
    """best.pt and oof/ exist and the log has reached the epoch count or stopped early."""
    if not ((directory / "best.pt").is_file() and (directory / "oof" / "meta.json").is_file()):
        return False
    try:
        history = read_log(directory / "log.jsonl")
    except DataError as exc:
        # The log is a copy of last.pt's history: the fold is redone from there (--resume
        # rewrites the log and the OOF maps), not reported complete from a broken file.
        log.warning("%s; treating the fold as unfinished", exc)
        return False
    return bool(history) and (
        history[-1]["epoch"] >= epochs or bool(history[-1].get("stopped_early"))
    )


def _flat_for(history: list[dict[str, Any]], patience: int) -> bool:
    """True when the best validation score is `patience` or more epochs old."""
    best = max(i for i, r in enumerate(history) if r["best"])
    return len(history) - 1 - best >= patience


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(rec) + "\n" for rec in history))


# --------------------------------------------------------------------------- one fold


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

    def step(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
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
    tcfg = cfg["train"]
    precision = choose_precision(
        dist.device, bool(tcfg.get("amp", True)), bool(tcfg.get("channels_last", True))
    )
    torch.manual_seed(derive_seed(int(cfg["seed"]), fold))
    raw = build_model(
        entry["arch"],
        num_classes=NUM_CLASSES,
        pretrained=entry.get("pretrained"),
        **entry["kwargs"],
    )
    if dist.enabled and dist.device.type == "cuda" and tcfg.get("sync_bn", True):
        # A few images per GPU give noisy BatchNorm statistics; SyncBatchNorm keeps the
        # same parameter names, so its checkpoints load into the plain model for inference.
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    fmt = torch.channels_last if precision.channels_last else torch.preserve_format
    raw = raw.to(dist.device, memory_format=fmt)
    optimizer = build_optimizer(raw.parameters(), tcfg)
    scheduler = build_scheduler(optimizer, tcfg, steps_per_epoch)
    ema = None
    if tcfg.get("ema"):
        # BatchNorm statistics are averaged too (use_buffers), so the EMA model is usable
        # as it is, without a pass over the data to recompute them.
        ema = AveragedModel(
            raw, multi_avg_fn=get_ema_multi_avg_fn(float(tcfg["ema"])), use_buffers=True
        )
    net = torch.compile(raw) if tcfg.get("compile") else raw
    return Learner(
        raw=raw,
        net=net,
        train_net=nn.parallel.DistributedDataParallel(net) if dist.enabled else net,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(precision.device_type, enabled=precision.needs_scaler),
        loss_fn=SegLoss(**(tcfg.get("loss") or {})).to(dist.device),
        precision=precision,
        ema=ema,
        grad_clip=float(tcfg.get("grad_clip") or 0.0),
        multiscale=tuple(float(x) for x in tcfg.get("multiscale") or [1.0]),
    )


@dataclass
class FoldLoaders:
    sampler: SeededSampler
    train: DataLoader
    val: DataLoader
    val_items: list[CachedItem]


def paste_for(cfg: dict[str, Any], items: list[CachedItem]) -> PolypPaste | None:
    """`data.paste: {p, classes}` as a PolypPaste over the fold's training items, or None."""
    paste = cfg["data"].get("paste")
    if not paste:
        return None
    return PolypPaste(items, float(paste.get("p", 0.5)), paste.get("classes", [2]))


def build_loaders(cfg: dict[str, Any], data: TrainData, fold: int, dist: Dist) -> FoldLoaders:
    """Train loader (seeded, sharded, drop_last) and validation loader (sharded, unpadded)."""
    train_items = data.subset(data.folds.train_ids(fold))
    val_items = data.subset(data.folds.val_ids(fold))
    batch_size = int(cfg["train"]["batch_size"])
    size = tuple(cfg["data"]["img_size"])
    train_tf = build_transforms(size, train=True, **(cfg["data"].get("augment") or {}))
    sampler = SeededSampler(
        len(train_items),
        int(cfg["seed"]),
        dist.rank,
        dist.world_size,
        stratum_weights([it.classes for it in train_items], cfg["data"].get("sampling")),
    )
    name = f"{cfg.get('experiment')} fold {fold}"
    train = config_loader(
        cfg,
        SeededDataset(SegDataset(train_items, train_tf, paste_for(cfg, train_items))),
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
        SegDataset(val_items, eval_transform(cfg)),
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
    lr = learner.optimizer.param_groups[0]["lr"]
    started = time.perf_counter()
    train_loss, rate = train_epoch(learner, loaders.train, dist, desc, seed)
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
        "train_loss": train_loss,
        **scores,
        "lr": lr,
        "images_per_s": rate,
        "epoch_time_s": time.perf_counter() - started,
    }


def _resume(
    learner: Learner, out: Path, split_id: str, resume: bool, name: str, tcfg: dict[str, Any]
) -> tuple[int, float, list[dict[str, Any]]]:
    """(epochs done, best score, history) from last.pt, or a fresh start."""
    last = out / "last.pt"
    if not last.exists():
        if resume:
            log.info("%s: nothing to resume in %s; starting from scratch", name, out)
        return 0, -math.inf, []
    if not resume:
        raise ConfigError(
            f"{out} holds an unfinished run; pass --resume to continue it or --force to start over"
        )
    ckpt = load_checkpoint(last, next(learner.raw.parameters()).device)
    if ckpt["split_id"] != split_id:
        raise ConfigError(
            f"{last} was trained on split {ckpt['split_id']}, but folds.json is split "
            f"{split_id}; retrain with --force"
        )
    _check_same_curve(ckpt, tcfg)
    learner.load_training_state(ckpt)
    log.info("%s: resuming after epoch %d (best %.4f)", name, ckpt["epoch"], ckpt["best_score"])
    return ckpt["epoch"], ckpt["best_score"], ckpt["history"]


def _check_same_curve(ckpt: dict[str, Any], tcfg: dict[str, Any]) -> None:
    """Refuse a changed epoch count when the schedule's curve depends on it.

    A step schedule continues the same way for any length; cosine, one-cycle, poly and
    warm-up were laid out over the old total and restore that total from the checkpoint.
    """
    before = int(ckpt["config"]["train"]["epochs"])
    sched = scheduler_cfg(tcfg)
    per_total = sched["name"] in ("cosine", "onecycle", "poly") or sched.get("warmup_epochs")
    if before != int(tcfg["epochs"]) and per_total:
        raise ConfigError(
            f"train.epochs: {before} -> {tcfg['epochs']}, but the {sched['name']} schedule "
            "was laid out over the old total; keep the epochs, or retrain with --force"
        )


def _log_epoch(name: str, epochs: int, record: dict[str, Any]) -> None:
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


def train_fold(
    cfg: dict[str, Any],
    model_name: str,
    fold: int,
    data: TrainData,
    dist: Dist,
    *,
    resume: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Train one fold to completion (or skip it if complete); returns a summary.

    Per epoch, rank 0 writes best.pt (if improved), then last.pt, then the log rewritten
    from the history inside last.pt: a kill between any two writes leaves a state that
    `--resume` continues correctly.
    """
    epochs = int(cfg["train"]["epochs"])
    out = fold_dir(cfg, model_name, fold)
    name = f"{model_name} fold {fold}"
    recipe = fold_recipe(cfg, model_name, data.folds.split_id)
    if force and dist.is_main and out.exists():
        shutil.rmtree(out)
    dist.barrier()
    check_fold(out, recipe, str(cfg["experiment"]))
    if fold_complete(out, epochs):
        log.info("%s already complete (%s); skipping (--force retrains)", name, out)
        return _summary(model_name, fold, read_log(out / "log.jsonl"), skipped=True)

    entry = model_entry(cfg, model_name)
    split_id = data.folds.split_id
    loaders = build_loaders(cfg, data, fold, dist)
    learner = build_learner(cfg, entry, fold, dist, steps_per_epoch=len(loaders.train))
    start_epoch, best_score, history = _resume(learner, out, split_id, resume, name, cfg["train"])
    patience = int(cfg["train"].get("early_stop_patience") or 0)
    best_metric = str(cfg["train"].get("best_metric", "competition"))
    meta = {
        "model_name": model_name,
        "arch": entry["arch"],
        "kwargs": entry["kwargs"],
        "split_id": split_id,
        "fold": fold,
        "config": cfg,
        "recipe_hash": recipe_hash(recipe),
    }
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_recipe(out, recipe)
        save_config(cfg, out / "config.yaml")
        write_log(out / "log.jsonl", history)
    wandb_run = tracking.start_fold(cfg, model_name, fold) if dist.is_main else None
    try:
        for epoch in range(start_epoch, epochs):
            if history and history[-1].get("stopped_early"):
                break
            seed = derive_seed(int(cfg["seed"]), fold, epoch)
            torch.manual_seed(seed)
            desc = f"{name} epoch {epoch + 1}/{epochs}"
            record = run_epoch(learner, loaders, epoch, dist, desc, seed)
            record["best"] = record[best_metric] > best_score
            best_score = max(best_score, record[best_metric])
            history = [*history, record]
            record["stopped_early"] = bool(patience) and _flat_for(history, patience)
            if dist.is_main:
                ckpt = {
                    **learner.training_state(),
                    "epoch": epoch + 1,
                    "best_score": best_score,
                    "history": history,
                    **meta,
                    "provenance": provenance(
                        cfg, model=model_name, fold=fold, split_id=split_id, epoch=epoch + 1
                    ),
                }
                if record["best"]:
                    # best.pt is for inference: the optimizer state would triple its size.
                    inference = {
                        "model": learner.inference_weights(),
                        "ema": None,
                        "optimizer": None,
                        "scheduler": None,
                        "scaler": None,
                        "rng": None,
                    }
                    save_torch({**ckpt, **inference}, out / "best.pt")
                save_torch(ckpt, out / "last.pt")
                kill_point("epoch-saved")
                write_log(out / "log.jsonl", history)
                if wandb_run is not None:
                    tracking.log_epoch(
                        wandb_run, record, epochs, learner.eval_net, loaders.val_items, dist.device
                    )
            _log_epoch(name, epochs, record)
            if record["stopped_early"]:
                log.info("%s: no better score for %d epochs; stopped early", name, patience)
                break
        if dist.is_main:
            write_fold_oof(cfg, out, loaders.val_items, split_id, model_name, fold, learner)
        dist.barrier()
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    return _summary(model_name, fold, history, skipped=False)


def write_fold_oof(
    cfg: dict[str, Any],
    out: Path,
    val_items: list[CachedItem],
    split_id: str,
    model_name: str,
    fold: int,
    learner: Learner,
) -> None:
    """Softmax of the fold's validation images from best.pt, at working resolution."""
    device = next(learner.raw.parameters()).device
    model = learner.raw
    best = load_checkpoint(out / "best.pt", device)
    model.load_state_dict(best["model"])
    loader = config_loader(
        cfg,
        SegDataset(val_items, eval_transform(cfg)),
        int(cfg["train"]["batch_size"]),
        device,
        None,
        name=f"{model_name} fold {fold} OOF",
    )
    probs = predict_probs(
        Probabilities(model),
        loader,
        device,
        learner.precision,
        desc=f"{model_name} fold {fold} oof",
    )
    save_probs(
        out / "oof",
        [it.id for it in val_items],
        probs,
        [list(it.orig_size) for it in val_items],
        kind="oof",
        split_id=split_id,
        model=model_name,
        folds=[fold] * len(val_items),
        tta="none",
        best_epoch=best["epoch"],
        provenance=provenance(
            cfg, model=model_name, fold=fold, split_id=split_id, stage="train-oof"
        ),
    )
    log.info("%s fold %d: wrote %d OOF maps to %s", model_name, fold, len(val_items), out / "oof")


def _summary(
    model_name: str, fold: int, history: list[dict[str, Any]], skipped: bool
) -> dict[str, Any]:
    best = max(history, key=lambda r: r["competition"]) if history else {}
    return {
        "model": model_name,
        "fold": fold,
        "epochs": len(history),
        "best_epoch": best.get("epoch"),
        "best_competition": best.get("competition"),
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a model of the config's zoo on one or more folds of the shared split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="name of an entry in the config's `models:`")
    p.add_argument(
        "--fold", required=True, help="fold index, comma-separated indices, or 'all' (in sequence)"
    )
    add_config_arguments(p, DEFAULT_CONFIG)
    p.add_argument("--epochs", type=int, help="overrides train.epochs")
    p.add_argument(
        "--batch-size", type=int, help="per-process batch size; overrides train.batch_size"
    )
    p.add_argument(
        "--img-size", help="working size N or HxW, e.g. 352 or 352x416; overrides data.img_size"
    )
    p.add_argument("--lr", type=float, help="overrides train.lr")
    p.add_argument(
        "--pretrained",
        help="'none', 'imagenet' or a weights file; overrides models.<model>.pretrained",
    )
    p.add_argument(
        "--seed", type=int, help="training seed (the split uses data.fold_seed); overrides seed"
    )
    p.add_argument("--resume", action="store_true", help="continue each fold from its last.pt")
    p.add_argument(
        "--force",
        action="store_true",
        help="delete the fold folders and retrain, even complete ones",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log to Weights & Biases (offline unless WANDB_MODE is set)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_runtime_arguments(p)
    return p


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dist = init_dist()
    setup_logging(logging.INFO if dist.is_main else logging.WARNING)
    try:
        cfg = resolve_config(args)
        folds = parse_folds(args.fold, int(cfg["data"]["n_folds"]))
        if not args.force:
            check_recipes_early(cfg, args.model, folds)
        configure_cpu_threads(cfg)
        if dist.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        data = prepare_train_data(cfg, dist)
        summaries = [
            train_fold(cfg, args.model, k, data, dist, resume=args.resume, force=args.force)
            for k in folds
        ]
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, LoaderStalled) as exc:
        print(f"error: {exc}; the last good checkpoint is kept", file=sys.stderr)
        return 1
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    if dist.is_main:
        for s in summaries:
            state = "skipped (complete)" if s["skipped"] else f"{s['epochs']} epochs"
            print(
                f"{s['model']} fold {s['fold']}: best competition Dice "
                f"{s['best_competition']:.4f} at epoch {s['best_epoch']} ({state})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
