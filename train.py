"""Stage 1: train one model on one or more folds of the shared split.

    python train.py --model deeplabv3plus_resnet50 --fold 0
    python train.py --model unet --fold all --epochs 3 --set train.lr=3e-4
    torchrun --nproc_per_node=4 train.py --model pranet --fold 2

Everything a fold produces lives in `<out_dir>/<experiment>/<model>/fold<k>/` (see
docs/contracts.md): `last.pt` after every epoch, `best.pt` by validation competition Dice,
`log.jsonl`, the resolved `config.yaml` and, at the end, the fold's out-of-fold
probabilities `oof/`.

The machinery (learner, steps, evaluation) is `engine.py`; this stage decides what runs,
what is kept and when. Easy to break here: the log is part of the checkpoint (`history`)
and rewritten from it, so `log.jsonl` never holds an epoch twice or an epoch the
checkpoint does not know about.
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("train")


import argparse
import logging
import math
import shutil
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch.distributed as tdist

from core import invocation, locks
from core.config import (
    ConfigError,
    build_entry,
    provenance,
    reports_environment_errors,
    setup_logging,
)
from core.paths import RunFiles
from core.runtime import (
    Dist,
    configure_cpu_threads,
    configure_determinism,
    end_with_parent,
    init_dist,
    kill_point,
)
from core.settings import DataSettings, ExperimentSettings, TrainSettings, layout_of
from data.atomic import save_torch, write_yaml
from data.augment import transforms_for
from data.cache import CachedItem
from data.dataset import SegDataset
from data.foldlog import failed_attempts, read_log, write_log
from data.loader import LoaderStalled, config_loader
from data.prepare import TrainData, prepare_train_data
from data.probstore import save_probs
from data.reader import DataError
from models.inference import Probabilities, load_checkpoint, predict_probs
from models.pretrained import from_scratch_hint, parse_pretrained
from models.registry import check_model
from training import tracking
from training.engine import (
    FitState,
    FoldFailed,
    FoldLoaders,
    Learner,
    TrainingError,
    Verdict,
    build_learner,
    build_loaders,
    fit,
    fold_complete,
    judge_fold,
    log_epoch,
    retire_attempt,
)
from training.recipe import (
    RetryPolicy,
    check_config,
    check_fold,
    check_recipes_early,
    fold_recipe,
    parse_folds,
    recipe_hash,
    stale_training_data,
    write_recipe,
)

log = logging.getLogger("train")


# --------------------------------------------------------------------------- configuration


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Config file, the model's own recipe, `--set`, then the dedicated flags; checked."""
    cfg = cli.train_config(args)
    check_config(cfg)
    # A missing pretrained file is an error now, not after the data has been cached.
    with from_scratch_hint([args.model]):
        parse_pretrained(build_entry(cfg, args.model).get("pretrained"))
    return cfg


# --------------------------------------------------------------------------- one fold


@dataclass(frozen=True)
class FoldRun:
    """One fold of one model to train: the config it trains with, the data, and the
    process group (rank 0 writes, every rank trains)."""

    cfg: dict[str, Any]
    model_name: str
    fold: int
    data: TrainData
    dist: Dist

    @property
    def name(self) -> str:
        return f"{self.model_name} fold {self.fold}"

    @property
    def out(self) -> RunFiles:
        return layout_of(self.cfg).fold(self.model_name, self.fold)


def _resume(
    run: FoldRun, learner: Learner, resume: bool, train: TrainSettings
) -> tuple[int, float, list[dict[str, Any]]]:
    """(epochs done, best score, history) from last.pt, or a fresh start; `train`: the
    settings the fold was asked to train with (before a retry's remedy)."""
    out, name, epochs = run.out, run.name, train.epochs
    last = out.last
    if not last.exists():
        if resume and out.best.is_file():
            log.warning(
                "%s: %s was removed when the fold completed (train.keep_last: false), so it "
                "cannot be extended to %d epochs: training it again from scratch",
                name,
                last,
                epochs,
            )
        elif resume:
            log.info("%s: nothing to resume in %s; starting from scratch", name, out.dir)
        return 0, -math.inf, []
    if not resume:
        raise ConfigError(
            f"{out.dir} holds an unfinished run; continue it: "
            f"{invocation.rerun_hint('--resume')}; or start it over: "
            f"{invocation.retrain_hint(out.dir)}"
        )
    ckpt = load_checkpoint(last, next(learner.raw.parameters()).device)
    split_id = run.data.folds.split_id
    if ckpt["split_id"] != split_id:
        raise ConfigError(
            f"{last} was trained on split {ckpt['split_id']}, but folds.json is split "
            f"{split_id}; retrain it: {invocation.retrain_hint(out.dir)}"
        )
    _check_same_curve(TrainSettings.from_config(ckpt["config"]).epochs, epochs, train.schedule, out)
    learner.load_training_state(ckpt)
    log.info("%s: resuming after epoch %d (best %.4f)", name, ckpt["epoch"], ckpt["best_score"])
    return ckpt["epoch"], ckpt["best_score"], ckpt["history"]


def _check_same_curve(before: int, epochs: int, sched: dict[str, Any], out: RunFiles) -> None:
    """Refuse a changed epoch count when the schedule's curve depends on it.

    A step schedule continues the same way for any length; cosine, one-cycle, poly and
    warm-up were laid out over the old total and restore that total from the checkpoint.
    """
    per_total = sched["name"] in ("cosine", "onecycle", "poly") or sched.get("warmup_epochs")
    if before != epochs and per_total:
        raise ConfigError(
            f"train.epochs: {before} -> {epochs}, but the {sched['name']} schedule "
            f"was laid out over the old total; keep the epochs (train.epochs={before}), or "
            f"retrain the fold: {invocation.retrain_hint(out.dir)}"
        )


def clear_changed(run: FoldRun, recipe: dict[str, Any], force: bool) -> None:
    """Refuse a fold folder of another recipe (never retrained over), then remove the
    folder when forced, or when its training images or masks changed since it trained
    (retrained from scratch, not resumed)."""
    out = run.out
    if not force:
        check_fold(out, recipe)
    run.dist.barrier()
    if run.dist.is_main:
        stale = None if force else stale_training_data(out, run.data, run.model_name, run.fold)
        if stale:
            log.info("%s", stale)
        if (force or stale) and out.dir.exists():
            shutil.rmtree(out.dir)
    run.dist.barrier()


def retry_attempt(run: FoldRun) -> tuple[FoldRun, int]:
    """The fold as this attempt trains it, and the attempt's number: a retrained fold
    trains with its attempt's remedy; its recipe identity stays the config's, so the
    pipeline still recognises it."""
    attempt = len(failed_attempts(run.out))
    cfg = RetryPolicy.from_config(run.cfg).remedy(run.cfg, attempt)
    if attempt:
        lr = TrainSettings.from_config(cfg).lr
        log.info(
            "%s: attempt %d, seed %s, lr %g",
            run.name,
            attempt,
            ExperimentSettings.from_config(cfg).seed,
            lr,
        )
    return replace(run, cfg=cfg), attempt


def inference_state(learner: Learner, half: bool) -> dict[str, Any]:
    """best.pt's training state: the weights only (the optimizer state would triple its
    size), in half precision when `train.half_best`."""
    weights = learner.inference_weights()
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    return {
        "model": weights,
        "ema": None,
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "rng": None,
    }


def save_epoch(
    run: FoldRun, learner: Learner, state: FitState, meta: dict[str, Any], half_best: bool
) -> None:
    """best.pt (when this epoch is the best so far), then last.pt, then the log rewritten
    from the history inside last.pt: a kill between any two writes leaves a state that
    `--resume` continues correctly."""
    record = state.history[-1]
    ckpt = {
        **learner.training_state(),
        "epoch": state.epoch,
        "best_score": state.best_score,
        "history": state.history,
        **meta,
        "provenance": provenance(
            run.cfg,
            model=run.model_name,
            fold=run.fold,
            split_id=meta["split_id"],
            epoch=state.epoch,
        ),
    }
    if record["best"]:
        save_torch({**ckpt, **inference_state(learner, half_best)}, run.out.best)
    save_torch(ckpt, run.out.last)
    kill_point("epoch-saved")
    write_log(run.out.log, state.history)


def start_fold(
    run: FoldRun, recipe: dict[str, Any], attempt: int, resume: bool, train: TrainSettings
) -> tuple[Learner, FoldLoaders, FitState, dict[str, Any]]:
    """The fold's learner and loaders, its state (from last.pt, or fresh) and what every
    checkpoint records of it; rank 0 writes the recipe, config and log it starts from."""
    cfg, dist, out = run.cfg, run.dist, run.out
    entry = build_entry(cfg, run.model_name)
    loaders = build_loaders(cfg, run.data, run.fold, dist)
    learner = build_learner(cfg, entry, run.fold, dist, steps_per_epoch=len(loaders.train))
    state = FitState(*_resume(run, learner, resume, train))
    if state.epoch and not out.best.is_file():
        # written at the first epoch: without it the best weights are lost, resuming or not
        raise ConfigError(
            f"{out.best} is missing, but {out.last} has {state.epoch} epochs: "
            f"retrain the fold: {invocation.retrain_hint(out.dir)}"
        )
    meta = {
        "model_name": run.model_name,
        "arch": entry["arch"],
        "kwargs": entry["kwargs"],
        "split_id": run.data.folds.split_id,
        "fold": run.fold,
        "config": cfg,
        "recipe_hash": recipe_hash(recipe),
        "attempt": attempt,
    }
    if dist.is_main:
        out.dir.mkdir(parents=True, exist_ok=True)
        write_recipe(out, recipe, run.data.trained_on(run.fold))
        write_yaml(out.config, cfg)
        write_log(out.log, state.history)
    return learner, loaders, state, meta


def train_epochs(
    run: FoldRun,
    learner: Learner,
    loaders: FoldLoaders,
    state: FitState,
    meta: dict[str, Any],
    train: TrainSettings,
) -> None:
    """The epochs after `state.epoch`, each saved by rank 0 (`save_epoch`; and sent to
    W&B when it is on), then the fold's OOF maps."""
    dist = run.dist
    wandb_run = tracking.start_fold(run.cfg, run.model_name, run.fold) if dist.is_main else None
    try:
        for record in fit(run.cfg, learner, loaders, run.fold, dist, run.name, state):
            if dist.is_main:
                save_epoch(run, learner, state, meta, train.half_best)
                invocation.finished(f"{run.name} epoch {state.epoch} of {train.epochs} saved")
                if wandb_run is not None:
                    tracking.log_epoch(
                        wandb_run,
                        record,
                        train.epochs,
                        learner.eval_net,
                        loaders.val_items,
                        dist.device,
                    )
            log_epoch(run.name, train.epochs, record)
        if dist.is_main:
            write_fold_oof(run, loaders.val_items, learner)
            if not train.keep_last:
                # complete now (best.pt, OOF maps, log): the optimizer state is dead weight
                run.out.last.unlink(missing_ok=True)
            invocation.finished(f"{run.name} complete")
        dist.barrier()
    finally:
        if wandb_run is not None:
            wandb_run.finish()


def train_fold(run: FoldRun, *, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Train one fold to completion (or skip it if complete); returns a summary. A fold
    whose training images or masks changed since it trained starts again from scratch.
    """
    train = TrainSettings.from_config(run.cfg)
    out = run.out
    recipe = fold_recipe(run.cfg, run.model_name, run.data.folds.split_id)
    clear_changed(run, recipe, force)
    if fold_complete(out, train.epochs):
        retrain = invocation.retrain_hint(out.dir)
        log.info(
            "%s already complete (%s); skipping (to retrain it: %s)", run.name, out.dir, retrain
        )
        return _summary(run, read_log(out.log), True, train.best_metric)
    run, attempt = retry_attempt(run)
    learner, loaders, state, meta = start_fold(run, recipe, attempt, resume, train)
    train_epochs(run, learner, loaders, state, meta, train)
    return _summary(run, state.history, False, train.best_metric)


def train_fold_retrying(
    run: FoldRun, *, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """`train_fold`, then the `retry:` policy: a fold that failed (engine.judge_fold) is
    retrained with the policy's remedy until it passes, or FoldFailed once the attempts
    are spent. A failed fold must not be blended: it drags the ensemble below its models.
    One that retraining cannot help (Verdict.retrain false) is kept, with a warning."""
    policy = RetryPolicy.from_config(run.cfg)
    cfg, name, dist = run.cfg, run.name, run.dist
    lock = layout_of(cfg).fold_lock(run.model_name, run.fold)
    # rank 0 holds it for the whole DDP group: the other ranks follow its barriers
    with locks.hold(lock, name) if dist.is_main else nullcontext():
        while True:
            summary = train_fold(run, resume=resume, force=force)
            force = False
            verdict = judge_fold(cfg, run.model_name, run.fold)
            if verdict is None:
                return summary
            if not verdict.retrain:
                # said when the fold trains; a reused one's verdict is the report's warning
                level = logging.INFO if summary["skipped"] else logging.WARNING
                log.log(level, "%s: %s", name, verdict.reason)
                return summary
            if policy.attempts == 0:
                log.warning("%s failed: %s (kept: retry.attempts is 0)", name, verdict.reason)
                return summary
            attempt = len(failed_attempts(run.out))
            if attempt >= policy.attempts:
                raise FoldFailed(
                    f"{name} failed after {attempt} retrain(s): {verdict.reason}; its attempts "
                    f"are in {run.out.retries}. {_spent(cfg, run.model_name, verdict)}"
                )
            if dist.is_main:
                retire_attempt(cfg, run.model_name, run.fold, verdict.reason)
            dist.barrier()
            log.warning(
                "%s failed (%s); retraining it, attempt %d", name, verdict.reason, attempt + 1
            )


def _spent(cfg: dict[str, Any], model_name: str, verdict: Verdict) -> str:
    """What helps a fold that other seeds did not: the settings that change the outcome.
    More attempts rarely do (the seeds already tried failed alike); the user's command
    again with `retry.attempts=0` always goes on, keeping the fold, which the report flags."""
    keep = "keep it as it is (the report then flags it): " + invocation.rerun_with(
        {"retry.attempts": "0"}
    )
    if verdict.kind == "nothing":
        epochs = TrainSettings.from_config(cfg).epochs
        return (
            f"Another fold of {model_name} beat predicting nothing, so the recipe can: train "
            f"every fold longer (train.epochs, now {epochs}), or {keep}"
        )
    if verdict.kind == "trails":
        margin = RetryPolicy.from_config(cfg).margin
        return f"Accept a wider gap with a larger retry.margin (now {margin}), or {keep}"
    return f"To go on, {keep}"


def write_fold_oof(run: FoldRun, val_items: list[CachedItem], learner: Learner) -> None:
    """Softmax of the fold's validation images from best.pt, at working resolution."""
    cfg, model_name, fold, out = run.cfg, run.model_name, run.fold, run.out
    device = next(learner.raw.parameters()).device
    model = learner.raw
    best = load_checkpoint(out.best, device)
    model.load_state_dict(best["model"])
    loader = config_loader(
        cfg,
        SegDataset(val_items, transforms_for(DataSettings.from_config(cfg), train=False)),
        TrainSettings.from_config(cfg).batch_size,
        device,
        None,
        name=f"{run.name} OOF",
    )
    probs = predict_probs(
        Probabilities(model),
        loader,
        device,
        learner.precision,
        desc=f"{run.name} oof",
    )
    split_id = run.data.folds.split_id
    save_probs(
        out.oof,
        [it.id for it in val_items],
        probs,
        [list(it.orig_size) for it in val_items],
        kind="oof",
        split_id=split_id,
        model=model_name,
        folds=[fold] * len(val_items),
        tta="none",
        best_epoch=best["epoch"],
        image_sha256=[it.image_sha256 for it in val_items],  # predict.reusable_oof checks
        provenance=provenance(
            cfg, model=model_name, fold=fold, split_id=split_id, stage="train-oof"
        ),
    )
    log.info("%s fold %d: wrote %d OOF maps to %s", model_name, fold, len(val_items), out.oof)


def _summary(
    run: FoldRun, history: list[dict[str, Any]], skipped: bool, metric: str
) -> dict[str, Any]:
    """The epoch best.pt holds (the last one flagged best by `train.best_metric`)."""
    best = next((r for r in reversed(history) if r.get("best")), {})
    return {
        "model": run.model_name,
        "fold": run.fold,
        "epochs": len(history),
        "best_epoch": best.get("epoch"),
        "metric": metric,
        "best_score": best.get(metric, math.nan),
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- CLI


def resume_argv(argv: list[str]) -> list[str]:
    """The arguments that continue an interrupted train.py: with --resume, and never
    --force, which would delete the epochs saved so far."""
    kept = [a for a in argv if a != "--force"]
    return kept if "--resume" in kept else [*kept, "--resume"]


@reports_environment_errors(resume=resume_argv)
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("train").parse_args(argv)
    end_with_parent()
    dist = init_dist()
    setup_logging(logging.INFO if dist.is_main else logging.WARNING)
    try:
        cfg = resolve_config(args)
        check_model(cfg, args.model)
        folds = parse_folds(args.fold, DataSettings.from_config(cfg).n_folds)
        if not args.force:
            check_recipes_early(cfg, args.model, folds)
        train = TrainSettings.from_config(cfg)
        configure_cpu_threads(train.cpu_threads)
        configure_determinism(train.deterministic, dist.device)
        data = prepare_train_data(cfg, dist)
        runs = [FoldRun(cfg, args.model, k, data, dist) for k in folds]
        summaries = [train_fold_retrying(run, resume=args.resume, force=args.force) for run in runs]
        if len(folds) > 1 and RetryPolicy.from_config(cfg).attempts:
            # The first folds were judged before the later ones existed: judge them again.
            for i, run in enumerate(runs):
                verdict = judge_fold(cfg, args.model, run.fold)
                if verdict is not None and verdict.retrain:
                    summaries[i] = train_fold_retrying(run)
    except (ConfigError, DataError, locks.InUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FoldFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
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
                f"{s['model']} fold {s['fold']}: best {s['metric']} {s['best_score']:.4f} "
                f"at epoch {s['best_epoch']} ({state})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
