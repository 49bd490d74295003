"""The one scoring module every stage uses (training validation, OOF, ensemble, tuning).

Everything is computed from per-image sufficient statistics, `class_stats`, an int64
array (N, 3, 3): rows [neoplastic, non-neoplastic, polyp-vs-background], columns
[|pred ∩ target|, |pred|, |target|]. Stats are additive, so folds, batches and DDP ranks
can be summed before scoring, and both forms of the score come from the same numbers:

- "competition": the probable leaderboard form, the mean over image × {neo, non} rows of
  2|X∩Y| / (|X|+|Y|), a row scoring 1 when prediction and truth are both empty. Under this
  form a few stray pixels of an absent class cost a whole row, so it is the objective that
  rewards post-processing.
- "dice_seg", "dice_neo", "dice_non": micro Dice over the whole set (the papers' form),
  1 when prediction and truth are empty over the whole set; "mean_micro" is the mean of
  dice_neo and dice_non (the two classes the task asks for).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
from joblib import Parallel, delayed

# Scores a stage may maximise (ensemble weights, post-processing).
OBJECTIVES = ("competition", "dice_seg", "dice_neo", "dice_non", "mean_micro")
# Images per step: bounds the temporary code array to ~64 working-size images.
_CHUNK = 64


def confusion(pred: Any, target: Any) -> np.ndarray:
    """(N, 3, 3) confusion counts [image, pred class, target class] of a stacked batch.

    Public because the report shows it summed over the OOF set: which class is taken for
    which. The histogram of `pred * 3 + target` per image; torch tensors are counted with one
    bincount over `image * 9 + code` where they live (GPU validation never copies full
    masks to the host).
    """
    n = pred.shape[0]
    if n == 0:
        return np.zeros((0, 3, 3), np.int64)
    if _is_torch(pred) or _is_torch(target):
        import torch

        p = torch.as_tensor(pred).reshape(n, -1).long()
        t = torch.as_tensor(target, device=p.device).reshape(n, -1).long()
        _check_range(int(p.min()), int(p.max()), "pred")
        _check_range(int(t.min()), int(t.max()), "target")
        offset = torch.arange(n, device=p.device).unsqueeze(1) * 9
        counts = torch.bincount((offset + p * 3 + t).reshape(-1), minlength=n * 9)
        return counts.cpu().numpy().astype(np.int64).reshape(n, 3, 3)
    p = np.asarray(pred).reshape(n, -1)
    t = np.asarray(target).reshape(n, -1)
    _check_range(int(p.min()), int(p.max()), "pred")
    _check_range(int(t.min()), int(t.max()), "target")
    out = np.empty((n, 3, 3), np.int64)
    for lo in range(0, n, _CHUNK):
        code = p[lo : lo + _CHUNK].astype(np.uint8) * np.uint8(3) + t[lo : lo + _CHUNK]
        # One calcHist per image on uint8 codes: ~20x faster than a bincount, which must
        # first widen every pixel to int64.
        for i, row in enumerate(code.astype(np.uint8, copy=False), start=lo):
            out[i] = cv2.calcHist([row], [0], None, [9], [0, 9]).reshape(3, 3)
    return out


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _check_range(lo: int, hi: int, name: str) -> None:
    if lo < 0 or hi > 2:
        raise ValueError(f"{name} class map has values outside 0..2 (min {lo}, max {hi})")


def _stats_from_confusion(conf: np.ndarray) -> np.ndarray:
    pred_count = conf.sum(axis=2)  # (N, 3) pixels predicted as each class
    target_count = conf.sum(axis=1)  # (N, 3) pixels of each class in the truth
    stats = np.empty((conf.shape[0], 3, 3), np.int64)
    for row, c in enumerate((1, 2)):
        stats[:, row] = np.stack([conf[:, c, c], pred_count[:, c], target_count[:, c]], 1)
    stats[:, 2, 0] = conf[:, 1:, 1:].sum(axis=(1, 2))
    stats[:, 2, 1] = pred_count[:, 1:].sum(axis=1)
    stats[:, 2, 2] = target_count[:, 1:].sum(axis=1)
    return stats


def class_stats(pred: Any, target: Any) -> np.ndarray:
    """Per-image [neo, non, seg] × [intersection, |pred|, |target|] counts, int64 (N, 3, 3).

    `pred` and `target` are class maps (values 0..2): stacked (N, H, W) numpy arrays or
    torch tensors, or sequences of (H, W) arrays whose sizes may differ per image (each
    image is then counted on its own, still vectorised within the image).
    """
    if isinstance(pred, Sequence) or isinstance(target, Sequence):
        if len(pred) != len(target):
            raise ValueError(f"{len(pred)} predictions but {len(target)} targets")
        conf = [_one_confusion(p, t, i) for i, (p, t) in enumerate(zip(pred, target, strict=True))]
        conf_all = np.concatenate(conf) if conf else np.zeros((0, 3, 3), np.int64)
        return _stats_from_confusion(conf_all)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if len(pred.shape) != 3:
        raise ValueError(f"expected class maps (N, H, W), got shape {tuple(pred.shape)}")
    return _stats_from_confusion(confusion(pred, target))


def predict_nothing(stats: np.ndarray) -> np.ndarray:
    """The stats an empty prediction would have on the images of `stats` (the same
    targets, nothing predicted): what a fold's validation scores are read against."""
    out = np.zeros_like(stats)
    out[..., 2] = stats[..., 2]
    return out


def nothing_stats(targets: Sequence[Any]) -> np.ndarray:
    """`class_stats` of an empty prediction for each target: the "predict nothing" baseline
    every score is read against (a row whose class is absent scores 1, not 0)."""
    return class_stats([np.zeros_like(t) for t in targets], targets)


# A score this close to predicting nothing's is predicting (next to) nothing: a model that
# collapsed to background scores the baseline give or take a few pixels, which shows
# nothing learnt. One margin for the retry policy, the report's warnings and its curves.
NOTHING_TOL = 0.005


def beats_nothing(score: float, nothing: float) -> bool:
    """Whether `score` is above predicting nothing's by more than NOTHING_TOL."""
    return score - nothing > NOTHING_TOL


def _one_confusion(pred: Any, target: Any, index: int) -> np.ndarray:
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"image {index}: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
        )
    return confusion(pred[None], target[None])


def _dice(inter: np.ndarray, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2|X∩Y| / (|X|+|Y|), defined as 1 where both are empty (nothing to find, nothing found)."""
    denom = pred + target
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), 1.0)


def scores_from_stats(stats: np.ndarray) -> dict[str, float]:
    """All scores from summed-or-stacked stats (N, 3, 3); see the module docstring."""
    stats = np.asarray(stats)
    if stats.ndim != 3 or stats.shape[1:] != (3, 3) or stats.shape[0] == 0:
        raise ValueError(f"stats must be a non-empty (N, 3, 3) array, got shape {stats.shape}")
    per_row = _dice(stats[:, :2, 0], stats[:, :2, 1], stats[:, :2, 2])  # (N, 2)
    total = stats.sum(axis=0)
    micro = _dice(total[:, 0], total[:, 1], total[:, 2])
    return {
        "competition": float(per_row.mean()),
        "competition_neo": float(per_row[:, 0].mean()),
        "competition_non": float(per_row[:, 1].mean()),
        "dice_seg": float(micro[2]),
        "dice_neo": float(micro[0]),
        "dice_non": float(micro[1]),
        "mean_micro": float(micro[:2].mean()),
    }


def dice_scores(pred: Any, target: Any) -> dict[str, float]:
    return scores_from_stats(class_stats(pred, target))


def stats_in_chunks(
    predict: Callable[[int, int], np.ndarray], targets: np.ndarray, chunk: int, n_jobs: int = 1
) -> np.ndarray:
    """`class_stats` of `predict(lo, hi)` against `targets[lo:hi]`, chunk by chunk in threads.

    The optuna stages score thousands of maps per trial; OpenCV and numpy release the GIL,
    so threads scale without copying the maps, and chunks bound the temporaries.
    """
    n = len(targets)
    bounds = list(itertools.pairwise([*range(0, n, max(1, chunk)), n]))
    parts = Parallel(n_jobs=n_jobs, prefer="threads")(
        delayed(lambda lo, hi: class_stats(predict(lo, hi), targets[lo:hi]))(lo, hi)
        for lo, hi in bounds
    )
    return np.concatenate(parts)
