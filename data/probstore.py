"""The probability store: class probability maps at working resolution, on disk.

A store is a folder holding `probs.npy`, uint8 (N, 3, H, W) with probability = value/255,
and `meta.json` (ids, each image's original (h, w), scale, split id, kind, model, folds,
provenance, plus free fields). uint8 keeps 1,000 OOF maps at 352×352 to ~370 MB and lets
every later stage memory-map it instead of loading it; quantising with round(p·255) costs
at most 0.5/255 ≈ 0.002 per probability, far below what changes an argmax in practice.

The folder is written with `data.atomic.atomic_dir`, so a reader sees either a whole old
store or a whole new one; a store that is nevertheless incomplete or inconsistent (missing
file, array shape disagreeing with the metadata) raises DataError naming the folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.runtime import kill_point
from data.atomic import atomic_dir, write_json
from data.reader import DataError

PROBS_FILE = "probs.npy"
META_FILE = "meta.json"
SCALE = 1.0 / 255.0
KINDS = ("oof", "test")
# Images quantised per step while saving, so a float batch never needs a float64 twin.
_CHUNK = 32


def quantise(probs: np.ndarray) -> np.ndarray:
    """uint8 codes round(p·255) of probabilities in [0, 1]; uint8 input passes through."""
    probs = np.asarray(probs)
    if probs.dtype == np.uint8:
        return probs
    return np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass
class ProbMaps:
    """A loaded store: `raw` is the uint8 array (memory-mapped when read from disk)."""

    ids: list[str]
    orig_sizes: list[tuple[int, int]]
    meta: dict[str, Any]
    raw: np.ndarray
    path: Path | None = None
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {image_id: i for i, image_id in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise DataError(f"{self.where}: duplicate ids in the store")

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "probability maps"

    @property
    def split_id(self) -> str | None:
        return self.meta.get("split_id")

    @property
    def size(self) -> tuple[int, int]:
        """Working resolution (H, W)."""
        return int(self.raw.shape[2]), int(self.raw.shape[3])

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, i: int) -> np.ndarray:
        return self.raw[i].astype(np.float32) * np.float32(SCALE)

    def as_float(self) -> np.ndarray:
        return self.raw.astype(np.float32) * np.float32(SCALE)

    def subset(self, ids: Sequence[str]) -> ProbMaps:
        missing = [i for i in ids if i not in self._index]
        if missing:
            raise DataError(f"{self.where}: {len(missing)} ids not in the store, e.g. {missing[0]}")
        rows = [self._index[i] for i in ids]
        meta = dict(self.meta)
        folds = meta.get("folds")
        if isinstance(folds, list) and len(folds) == len(self.ids):
            meta["folds"] = [folds[r] for r in rows]
        sizes = [self.orig_sizes[r] for r in rows]
        meta["ids"], meta["orig_sizes"] = list(ids), [list(s) for s in sizes]
        return ProbMaps(list(ids), sizes, meta, self.raw[rows], self.path)


def save_probs(
    path: str | Path,
    ids: Sequence[str],
    probs: np.ndarray,
    orig_sizes: Sequence[tuple[int, int]],
    *,
    kind: str,
    model: str,
    split_id: str | None = None,
    folds: list[Any] | None = None,
    provenance: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    """Write a store atomically. `probs`: (N, 3, H, W) floats in [0, 1] or uint8 codes.

    `folds`: for OOF stores, each image's validation fold (aligned with `ids`); for test
    stores, the folds whose models were averaged.
    """
    path = Path(path)
    ids = [str(i) for i in ids]
    sizes = [(int(h), int(w)) for h, w in orig_sizes]
    if kind not in KINDS:
        raise ValueError(f"{path}: kind must be one of {KINDS}, got {kind!r}")
    if probs.ndim != 4 or probs.shape[1] != 3:
        raise ValueError(f"{path}: probs must be (N, 3, H, W), got {probs.shape}")
    if not (len(ids) == len(sizes) == probs.shape[0]):
        raise ValueError(
            f"{path}: {len(ids)} ids, {len(sizes)} sizes and {probs.shape[0]} maps disagree"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids")
    meta = {
        "ids": ids,
        "orig_sizes": [list(s) for s in sizes],
        "scale": SCALE,
        "split_id": split_id,
        "kind": kind,
        "model": model,
        "folds": folds,
        "provenance": provenance or {},
        **extra,
    }
    with atomic_dir(path) as tmp:
        out = np.lib.format.open_memmap(tmp / PROBS_FILE, "w+", np.uint8, probs.shape)
        for lo in range(0, probs.shape[0], _CHUNK):
            out[lo : lo + _CHUNK] = quantise(probs[lo : lo + _CHUNK])
        out.flush()
        del out
        write_json(tmp / META_FILE, meta)
        kill_point("store-written")


def load_probs(path: str | Path) -> ProbMaps:
    """Open a store; `raw` is memory-mapped. Any inconsistency raises DataError."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: probability store not found")
    meta_file, probs_file = path / META_FILE, path / PROBS_FILE
    if not meta_file.is_file():
        raise DataError(f"{path}: incomplete probability store (no {META_FILE})")
    if not probs_file.is_file():
        raise DataError(f"{path}: incomplete probability store (no {PROBS_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable {META_FILE} ({exc})") from exc
    missing = [k for k in ("ids", "orig_sizes", "scale", "kind") if k not in meta]
    if missing:
        raise DataError(f"{path}: {META_FILE} lacks {', '.join(missing)}")
    try:
        raw = np.load(probs_file, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable {PROBS_FILE} ({exc})") from exc
    ids, sizes = meta["ids"], meta["orig_sizes"]
    if raw.dtype != np.uint8 or raw.ndim != 4 or raw.shape[1] != 3:
        raise DataError(
            f"{path}: {PROBS_FILE} must be uint8 (N, 3, H, W), got {raw.dtype} {raw.shape}"
        )
    if not (len(ids) == len(sizes) == raw.shape[0]):
        raise DataError(
            f"{path}: {len(ids)} ids and {len(sizes)} sizes in {META_FILE} "
            f"but {raw.shape[0]} maps in {PROBS_FILE}"
        )
    if not np.isclose(meta["scale"], SCALE):
        raise DataError(f"{path}: unsupported scale {meta['scale']} (expected 1/255)")
    return ProbMaps(list(ids), [(int(h), int(w)) for h, w in sizes], meta, raw, path)


def check_compatible(stores: Sequence[ProbMaps], action: str) -> None:
    """Same fold split and working size, or DataError; `action` says what was attempted.

    Predictions made on different splits leak validation images into training when
    combined, so their combination is refused rather than silently meaningless.
    """
    first = stores[0]
    for s in stores[1:]:
        if s.split_id != first.split_id:
            raise DataError(
                f"{s.where} has split id {s.split_id!r} but {first.where} has "
                f"{first.split_id!r}: predictions from different fold splits cannot be {action}"
            )
        if s.size != first.size:
            raise DataError(f"{s.where} is at {s.size} but {first.where} at {first.size}")


def concat(stores: Sequence[ProbMaps]) -> ProbMaps:
    """Join stores (e.g. per-fold OOF stores); refuses different split ids or sizes."""
    if not stores:
        raise ValueError("concat needs at least one store")
    check_compatible(stores, "joined")
    first = stores[0]
    meta = dict(first.meta)
    fold_lists = [s.meta.get("folds") for s in stores]
    if all(
        isinstance(f, list) and len(f) == len(s) for f, s in zip(fold_lists, stores, strict=True)
    ):
        meta["folds"] = [f for fl in fold_lists for f in fl]
    else:
        meta["folds"] = None  # one store without per-image folds: no list lines up with ids
    ids = [i for s in stores for i in s.ids]
    meta["ids"] = ids
    sizes = [sz for s in stores for sz in s.orig_sizes]
    meta["orig_sizes"] = [list(sz) for sz in sizes]
    raw = np.concatenate([np.asarray(s.raw) for s in stores])
    return ProbMaps(ids, sizes, meta, raw)


def align_stores(stores: Sequence[ProbMaps]) -> list[ProbMaps]:
    """The stores in the first one's image order; DataError if they cannot be blended."""
    check_compatible(stores, "blended")
    first = stores[0]
    for s in stores[1:]:
        if set(s.ids) != set(first.ids):
            only = sorted(set(s.ids) ^ set(first.ids))
            raise DataError(
                f"{s.where} and {first.where} hold different images "
                f"({len(only)} in only one of them, e.g. {only[0]})"
            )
    return [first] + [s if s.ids == first.ids else s.subset(first.ids) for s in stores[1:]]


def normalised(weights: Sequence[float]) -> np.ndarray:
    """Blend weights scaled to sum 1; ValueError for negative ones or a zero sum."""
    w = np.asarray(weights, np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(w)}")
    return w / w.sum()


def blend_rows(arrays: Sequence[np.ndarray], w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """uint8 codes of the weighted mean (normalised `w`) of `rows` of uint8 maps.

    Every blend, stored or scored, is rounded here in the same way, so a score computed on
    a blend in memory is the score of the maps a later stage reads from disk.
    """
    out = np.zeros((len(rows), *arrays[0].shape[1:]), np.float32)
    for a, wi in zip(arrays, w, strict=True):
        if wi > 0:
            out += np.float32(wi) * a[rows]
    return np.rint(out).clip(0, 255).astype(np.uint8)


def blend(stores: Sequence[ProbMaps | np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of uint8 probability maps (stores or raw arrays), as uint8 codes."""
    arrays = [s.raw if isinstance(s, ProbMaps) else s for s in stores]
    w = normalised(weights)
    out = np.empty(arrays[0].shape, np.uint8)
    for lo in range(0, len(out), _CHUNK):
        out[lo : lo + _CHUNK] = blend_rows(arrays, w, np.arange(lo, min(lo + _CHUNK, len(out))))
    return out


def blend_by_fold(
    stores: Sequence[ProbMaps], fold_weights: dict[int, Sequence[float]], folds: Sequence[int]
) -> np.ndarray:
    """The out-of-sample blend: each fold's images blended with the weights fitted
    without them (`fold_weights[k]`), so the stages after the blend see honest maps."""
    arrays = [s.raw for s in stores]
    out = np.empty(arrays[0].shape, np.uint8)
    f = np.asarray(folds)
    for k in np.unique(f):
        w = normalised(fold_weights[int(k)])
        held = np.flatnonzero(f == k)
        for lo in range(0, len(held), _CHUNK):
            out[held[lo : lo + _CHUNK]] = blend_rows(arrays, w, held[lo : lo + _CHUNK])
    return out
