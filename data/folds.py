"""One cross-validation split per dataset, made once and shared by every model.

Out-of-fold predictions of different models can only be blended if they come from the same
split, so the split is stored (JSON, written atomically) with a `split_id` hashed from its
content, and every later call reuses it. If the data no longer matches the stored split
(ids or strata changed), that is an error: silently re-splitting would invalidate every
existing OOF file, so the user must delete the file (or name a new experiment) on purpose.

Folds are stratified on which classes an image contains ("red", "green", "both",
"none"). A stratum with fewer images than folds cannot be spread over every fold, which
`StratifiedKFold` refuses; such a stratum is merged into the largest stratum it shares a
class with ("both" into the larger of "red"/"green"), or the largest overall ("none"),
and the merge is recorded in the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from core.invocation import rerun_hint
from data.atomic import write_json
from data.reader import DataError

log = logging.getLogger(__name__)

_RELATED = {"both": ("red", "green"), "red": ("both",), "green": ("both",)}


@dataclass(frozen=True)
class Folds:
    split_id: str
    n_folds: int
    seed: int
    fold_of: dict[str, int]

    def train_ids(self, k: int) -> list[str]:
        self._check(k)
        return sorted(i for i, f in self.fold_of.items() if f != k)

    def val_ids(self, k: int) -> list[str]:
        self._check(k)
        return sorted(i for i, f in self.fold_of.items() if f == k)

    def _check(self, k: int) -> None:
        if not 0 <= k < self.n_folds:
            raise ValueError(f"fold {k} out of range 0..{self.n_folds - 1}")


def merge_rare_strata(labels: dict[str, str], n_folds: int) -> dict[str, str]:
    """Map each stratum to the one it is split with (itself unless it is too rare)."""
    counts = Counter(labels.values())
    target = {s: s for s in counts}
    for rare in sorted((s for s in counts if counts[s] < n_folds), key=lambda s: counts[s]):
        if counts[rare] == 0 or counts[rare] >= n_folds:  # emptied, or grown by a merge
            continue
        candidates = [s for s in _RELATED.get(rare, ()) if counts[s] >= n_folds]
        candidates = candidates or [s for s in counts if s != rare and counts[s] > 0]
        if not candidates:
            break
        into = max(candidates, key=lambda s: (counts[s], s))
        counts[into] += counts[rare]
        counts[rare] = 0
        for s, t in target.items():
            if t == rare:
                target[s] = into
    return target


def _split_id(fold_of: dict[str, int], labels: dict[str, str], seed: int) -> str:
    blob = json.dumps({"folds": fold_of, "labels": labels, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_folds(labels: dict[str, str], n_folds: int, seed: int) -> tuple[Folds, dict[str, str]]:
    """A fresh stratified split, and the strata merges that were needed."""
    if n_folds < 2:
        raise DataError(f"need at least 2 folds, got {n_folds}")
    if len(labels) < n_folds:
        raise DataError(f"cannot make {n_folds} folds from {len(labels)} images")
    ids = sorted(labels)
    target = merge_rare_strata(labels, n_folds)
    y = np.array([target[labels[i]] for i in ids])
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of = {}
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(ids)), y)):
        fold_of.update({ids[i]: k for i in val})
    fold_of = {i: fold_of[i] for i in ids}
    folds = Folds(_split_id(fold_of, {i: labels[i] for i in ids}, seed), n_folds, seed, fold_of)
    return folds, {s: t for s, t in target.items() if s != t}


def _load(path: Path, labels: dict[str, str], n_folds: int, requested_seed: int) -> Folds:
    try:
        stored = json.loads(path.read_text())
        fold_of = {str(k): int(v) for k, v in stored["folds"].items()}
        stored_labels, seed, stored_n = (
            stored["labels"],
            int(stored["seed"]),
            int(stored["n_folds"]),
        )
        split_id = stored["split_id"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a readable folds file ({exc}); {resplit(path)}") from exc
    if _split_id(fold_of, stored_labels, seed) != split_id:
        raise DataError(f"{path}: split_id does not match its content (edited?); {resplit(path)}")
    fix = resplit(path)
    if stored_labels != labels:
        added = sorted(labels.keys() - stored_labels.keys())
        removed = sorted(stored_labels.keys() - labels.keys())
        changed = sorted(
            i for i in labels.keys() & stored_labels.keys() if labels[i] != stored_labels[i]
        )
        detail = f"{len(added)} new ids, {len(removed)} missing ids, {len(changed)} changed strata"
        examples = (added + removed + changed)[:5]
        raise DataError(
            f"{path}: the data no longer matches the stored split "
            f"({detail}, e.g. {examples}); {fix}"
        )
    if seed != requested_seed:
        log.warning(
            "%s: reusing the stored split made with seed %d (seed %d requested)",
            path,
            seed,
            requested_seed,
        )
    if stored_n != n_folds:
        raise DataError(f"{path}: stored split has {stored_n} folds, {n_folds} requested; {fix}")
    return Folds(split_id, stored_n, seed, fold_of)


def resplit(path: Path) -> str:
    """The two ways on from a stored split that cannot be used: a new split (which the
    folds trained on the old one then refuse), or a new experiment beside this one."""
    return (
        f"delete {path} to make a new split (this invalidates existing OOF predictions; its "
        "trained folds must be retrained), or keep it and run under a new experiment name: "
        f"{rerun_hint('--set', f'experiment={path.parent.name}_v2')}"
    )


def load_or_make_folds(path: str | Path, labels: dict[str, str], n_folds: int, seed: int) -> Folds:
    """The stored split at `path` if it matches `labels`; a new one (saved there) if none."""
    path = Path(path)
    labels = {str(k): str(v) for k, v in labels.items()}
    if path.exists():
        return _load(path, labels, n_folds, seed)
    folds, merged = make_folds(labels, n_folds, seed)
    write_json(
        path,
        {
            "split_id": folds.split_id,
            "n_folds": n_folds,
            "seed": seed,
            "merged_strata": merged,
            "labels": {i: labels[i] for i in sorted(labels)},
            "folds": folds.fold_of,
        },
    )
    return folds
