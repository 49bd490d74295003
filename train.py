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
from core.paths import Layout, RunFiles
from core.runtime import (
    Dist,
    configure_cpu_threads,
    configure_determinism,
    end_with_parent,
    init_dist,
    kill_point,
)
from core.settings import DataSettings, TrainSettings
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


def _resume(
    learner: Learner,
    out: RunFiles,
    split_id: str,
    resume: bool,
    name: str,
    epochs: int,
    schedule: dict[str, Any],
) -> tuple[int, float, list[dict[str, Any]]]:
    """(epochs done, best score, history) from last.pt, or a fresh start."""
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
    if ckpt["split_id"] != split_id:
        raise ConfigError(
            f"{last} was trained on split {ckpt['split_id']}, but folds.json is split "
            f"{split_id}; retrain it: {invocation.retrain_hint(out.dir)}"
        )
    _check_same_curve(TrainSettings.from_config(ckpt["config"]).epochs, epochs, schedule, out)
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
    """Train one fold to completion (or skip it if complete); returns a summary. A fold
    whose training images or masks changed since it trained starts again from scratch.

    Per epoch, rank 0 writes best.pt (if improved), then last.pt, then the log rewritten
    from the history inside last.pt: a kill between any two writes leaves a state that
    `--resume` continues correctly.
    """
    train = TrainSettings.from_config(cfg)
    epochs, best_metric = train.epochs, train.best_metric
    layout = Layout.of(cfg)
    out = layout.fold(model_name, fold)
    name = f"{model_name} fold {fold}"
    recipe = fold_recipe(cfg, model_name, data.folds.split_id)
    trained_on = data.trained_on(fold)
    if not force:
        # before anything is removed: a changed recipe is refused, never retrained over
        check_fold(out, recipe)
    dist.barrier()
    if dist.is_main:
        # changed training files make the fold stale: retrained from scratch, not resumed
        stale = None if force else stale_training_data(out, data, model_name, fold)
        if stale:
            log.info("%s", stale)
        if (force or stale) and out.dir.exists():
            shutil.rmtree(out.dir)
    dist.barrier()
    if fold_complete(out, epochs):
        retrain = invocation.retrain_hint(out.dir)
        log.info("%s already complete (%s); skipping (to retrain it: %s)", name, out.dir, retrain)
        return _summary(model_name, fold, read_log(out.log), True, best_metric)
    # A retrained fold trains with its attempt's remedy; its recipe identity stays the
    # config's, so the pipeline still recognises it.
    attempt = len(failed_attempts(out))
    cfg = RetryPolicy.from_config(cfg).remedy(cfg, attempt)
    if attempt:
        log.info(
            "%s: attempt %d, seed %s, lr %g",
            name,
            attempt,
            cfg["seed"],
            TrainSettings.from_config(cfg).lr,
        )

    entry = build_entry(cfg, model_name)
    split_id = data.folds.split_id
    loaders = build_loaders(cfg, data, fold, dist)
    learner = build_learner(cfg, entry, fold, dist, steps_per_epoch=len(loaders.train))
    state = FitState(*_resume(learner, out, split_id, resume, name, train.epochs, train.schedule))
    if state.epoch and not out.best.is_file():
        # written at the first epoch: without it the best weights are lost, resuming or not
        raise ConfigError(
            f"{out.best} is missing, but {out.last} has {state.epoch} epochs: "
            f"retrain the fold: {invocation.retrain_hint(out.dir)}"
        )
    meta = {
        "model_name": model_name,
        "arch": entry["arch"],
        "kwargs": entry["kwargs"],
        "split_id": split_id,
        "fold": fold,
        "config": cfg,
        "recipe_hash": recipe_hash(recipe),
        "attempt": attempt,
    }
    if dist.is_main:
        out.dir.mkdir(parents=True, exist_ok=True)
        write_recipe(out, recipe, trained_on)
        write_yaml(out.config, cfg)
        write_log(out.log, state.history)
    wandb_run = tracking.start_fold(cfg, model_name, fold) if dist.is_main else None
    try:
        for record in fit(cfg, learner, loaders, fold, dist, name, state):
            if dist.is_main:
                ckpt = {
                    **learner.training_state(),
                    "epoch": state.epoch,
                    "best_score": state.best_score,
                    "history": state.history,
                    **meta,
                    "provenance": provenance(
                        cfg, model=model_name, fold=fold, split_id=split_id, epoch=state.epoch
                    ),
                }
                if record["best"]:
                    # best.pt is for inference: the optimizer state would triple its size.
                    weights = learner.inference_weights()
                    if train.half_best:
                        weights = {
                            k: v.half() if v.is_floating_point() else v for k, v in weights.items()
                        }
                    inference = {
                        "model": weights,
                        "ema": None,
                        "optimizer": None,
                        "scheduler": None,
                        "scaler": None,
                        "rng": None,
                    }
                    save_torch({**ckpt, **inference}, out.best)
                save_torch(ckpt, out.last)
                kill_point("epoch-saved")
                write_log(out.log, state.history)
                invocation.finished(f"{name} epoch {state.epoch} of {epochs} saved")
                if wandb_run is not None:
                    tracking.log_epoch(
                        wandb_run, record, epochs, learner.eval_net, loaders.val_items, dist.device
                    )
            log_epoch(name, epochs, record)
        if dist.is_main:
            write_fold_oof(cfg, out, loaders.val_items, split_id, model_name, fold, learner)
            if not train.keep_last:
                # complete now (best.pt, OOF maps, log): the optimizer state is dead weight
                out.last.unlink(missing_ok=True)
            invocation.finished(f"{name} complete")
        dist.barrier()
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    return _summary(model_name, fold, state.history, False, best_metric)


def train_fold_retrying(
    cfg: dict[str, Any],
    model_name: str,
    fold: int,
    data: TrainData,
    dist: Dist,
    *,
    resume: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """`train_fold`, then the `retry:` policy: a fold that failed (engine.judge_fold) is
    retrained with the policy's remedy until it passes, or FoldFailed once the attempts
    are spent. A failed fold must not be blended: it drags the ensemble below its models.
    One that retraining cannot help (Verdict.retrain false) is kept, with a warning."""
    policy = RetryPolicy.from_config(cfg)
    layout = Layout.of(cfg)
    run = layout.fold(model_name, fold)
    name = f"{model_name} fold {fold}"
    # rank 0 holds it for the whole DDP group: the other ranks follow its barriers
    with locks.hold(layout.fold_lock(model_name, fold), name) if dist.is_main else nullcontext():
        while True:
            summary = train_fold(cfg, model_name, fold, data, dist, resume=resume, force=force)
            force = False
            verdict = judge_fold(cfg, model_name, fold)
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
            attempt = len(failed_attempts(run))
            if attempt >= policy.attempts:
                raise FoldFailed(
                    f"{name} failed after {attempt} retrain(s): {verdict.reason}; its attempts "
                    f"are in {run.retries}. {_spent(cfg, model_name, verdict)}"
                )
            if dist.is_main:
                retire_attempt(cfg, model_name, fold, verdict.reason)
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


def write_fold_oof(
    cfg: dict[str, Any],
    out: RunFiles,
    val_items: list[CachedItem],
    split_id: str,
    model_name: str,
    fold: int,
    learner: Learner,
) -> None:
    """Softmax of the fold's validation images from best.pt, at working resolution."""
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
    model_name: str, fold: int, history: list[dict[str, Any]], skipped: bool, metric: str
) -> dict[str, Any]:
    """The epoch best.pt holds (the last one flagged best by `train.best_metric`)."""
    best = next((r for r in reversed(history) if r.get("best")), {})
    return {
        "model": model_name,
        "fold": fold,
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
        summaries = [
            train_fold_retrying(
                cfg, args.model, k, data, dist, resume=args.resume, force=args.force
            )
            for k in folds
        ]
        if len(folds) > 1 and RetryPolicy.from_config(cfg).attempts:
            # The first folds were judged before the later ones existed: judge them again.
            for i, k in enumerate(folds):
                verdict = judge_fold(cfg, args.model, k)
                if verdict is not None and verdict.retrain:
                    summaries[i] = train_fold_retrying(cfg, args.model, k, data, dist)
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
