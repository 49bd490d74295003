"""Weights & Biases tracking, as competitors use it: offline by default, never required.

- Fold runs are grouped by experiment and model (`<experiment>/<model>`), so W&B plots a
  model's folds together, and carry `job_type="train"`; the pipeline's closing run
  (`job_type="summary"`, group `<experiment>`) holds the OOF and test tables, the blend
  weights, the post-processing decision, and `report.html` + `submission.csv` as an
  artefact.
- Every few epochs a fold run logs validation images with the ground truth and the
  prediction as W&B segmentation masks (toggled per class in the UI).
- Runs are written under `<out_dir>/<experiment>/wandb/`, outside every fold folder, so
  `train.py --force` never deletes a run that has not been synced yet
  (`wandb sync <out_dir>/<experiment>/wandb/offline-run-*`). `WANDB_MODE=online` (after
  `wandb login`) logs live instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.settings import ExperimentSettings, TrainSettings, layout_of
from data.cache import CachedItem, load_item
from data.dataset import to_tensor

CLASS_LABELS = {0: "background", 1: "neoplastic", 2: "non-neoplastic"}
# Validation overlays: this many images, every this many epochs (and at the last epoch).
N_IMAGES, IMAGE_EVERY = 4, 5


def enabled(cfg: Mapping[str, Any]) -> bool:
    return TrainSettings.from_config(cfg).wandb


def start_run(cfg: dict[str, Any], job_type: str, group: str, name: str, **extra: Any) -> Any:
    """A W&B run, offline unless WANDB_MODE says otherwise: training must never need an
    account or a network."""
    import wandb

    directory = layout_of(cfg).wandb.parent  # wandb.init(dir=D) writes to D/wandb/
    directory.mkdir(parents=True, exist_ok=True)
    mode = {} if "WANDB_MODE" in os.environ else {"mode": "offline"}
    return wandb.init(
        project=TrainSettings.from_config(cfg).wandb_project,
        name=name,
        group=group,
        job_type=job_type,
        dir=str(directory),
        config={**cfg, **extra},
        tags=[ExperimentSettings.from_config(cfg).experiment, *(str(v) for v in extra.values())],
        **mode,
    )


def start_fold(cfg: dict[str, Any], model_name: str, fold: int) -> Any:
    """The run of one training fold, or None when tracking is off."""
    if not enabled(cfg):
        return None
    group = f"{ExperimentSettings.from_config(cfg).experiment}/{model_name}"
    return start_run(cfg, "train", group, f"{model_name}-fold{fold}", model=model_name, fold=fold)


@torch.no_grad()
def overlays(net: nn.Module, items: Sequence[CachedItem], device: torch.device) -> list[Any]:
    """Validation images with their ground truth and the prediction as W&B masks."""
    import wandb

    net.eval()
    images = []
    for item in items:
        image, target = load_item(item)
        pred = net(to_tensor(image)[None].to(device)).argmax(1)[0].cpu().numpy()
        masks = {"prediction": {"mask_data": pred.astype(np.uint8), "class_labels": CLASS_LABELS}}
        if target is not None:
            masks["ground_truth"] = {"mask_data": target, "class_labels": CLASS_LABELS}
        images.append(wandb.Image(image, masks=masks, caption=item.id))
    return images


def log_epoch(
    run: Any,
    record: Mapping[str, Any],
    epochs: int,
    net: nn.Module,
    items: Sequence[CachedItem],
    device: torch.device,
) -> None:
    """One epoch's log record, plus validation overlays every IMAGE_EVERY epochs."""
    epoch = int(record["epoch"])
    payload = dict(record)
    if epoch % IMAGE_EVERY == 0 or epoch == epochs:
        payload["val_overlays"] = overlays(net, items[:N_IMAGES], device)
    run.log(payload, step=epoch)


def _table(rows: Sequence[Mapping[str, Any]]) -> Any:
    import wandb

    columns = list(rows[0])
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])


def log_summary(
    cfg: dict[str, Any],
    tables: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    blend: Mapping[str, Any],
    tuned: Mapping[str, Any],
    files: Sequence[Path],
) -> None:
    """The pipeline's closing run: score tables, blend weights and the post-processing
    decision as tables and summary values, and `files` (report, submission) as one
    artefact. The files are also copied into the run folder: W&B stages an artefact's
    files in the user's data folder, which a Kaggle session does not keep, and an offline
    run must hold everything `wandb sync` will need."""
    import wandb

    run = start_run(cfg, "summary", ExperimentSettings.from_config(cfg).experiment, "summary")
    try:
        for title, rows in tables:
            if rows:
                run.log({title: _table(rows)})
        weights = dict(zip(blend["models"], blend["weights"], strict=True))
        run.log({"blend weights": _table([{"model": m, "weight": w} for m, w in weights.items()])})
        if tuned.get("ablation"):
            run.log({"post-processing ablation": _table(tuned["ablation"])})
        run.summary.update(
            {
                "blend_weights": weights,
                "postprocess": tuned["params"],
                "oof_scores": tuned["scores"],
            }
        )
        artifact = wandb.Artifact(
            f"{ExperimentSettings.from_config(cfg).experiment}-results", type="results"
        )
        for path in files:
            if path.exists():
                artifact.add_file(str(path))
                shutil.copy2(path, Path(run.dir) / path.name)
        run.log_artifact(artifact)
    finally:
        run.finish()
