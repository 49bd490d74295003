"""Data preparation shared by training and prediction: the cached items and the split.

Both stages must see the same working-size items and the same folds; predict.py needs the
split to know which fold's model predicts which training image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.runtime import Dist
from core.settings import DataSettings, ExperimentSettings, layout_of
from data.cache import CachedItem, check_masks, prepare_for_config
from data.folds import Folds, load_or_make_folds
from data.reader import Sample, list_train

_NAMED = 5  # changed files a message names; the rest are counted


@dataclass
class TrainData:
    """The cached working-size items, the shared split, and the source files by id
    (`data_dir`: the folder they were listed from, for naming them)."""

    items: list[CachedItem]
    folds: Folds
    samples: dict[str, Sample]
    data_dir: Path

    def subset(self, ids: Sequence[str]) -> list[CachedItem]:
        by_id = {it.id: it for it in self.items}
        return [by_id[i] for i in ids]

    def trained_on(self, fold: int) -> dict[str, dict[str, str | None]]:
        """The sha256 of every image and mask fold `fold` trains on, by kind and id: what
        its weights were learnt from besides the recipe. Its validation images are left
        out: they are predict's inputs (stages.py), and do not shape the weights."""
        items = self.subset(self.folds.train_ids(fold))
        return {
            "images": {it.id: it.image_sha256 for it in items},
            "masks": {it.id: it.mask_sha256 for it in items},
        }

    def changes(self, before: dict[str, dict[str, str | None]], fold: int) -> str | None:
        """What differs between the files `before` records and fold `fold`'s now, as
        "1 mask (train_gt/ab12.jpeg)" (paths below the data dir); None when nothing does."""
        now = self.trained_on(fold)
        parts = []
        for kind, noun in (("images", "image"), ("masks", "mask")):
            old, new = before.get(kind) or {}, now[kind]
            ids = sorted(i for i in old.keys() | new.keys() if old.get(i) != new.get(i))
            if not ids:
                continue
            names = [self._name(i, kind) for i in ids[:_NAMED]]
            more = f", and {len(ids) - _NAMED} more" if len(ids) > _NAMED else ""
            plural = "" if len(ids) == 1 else "s"
            parts.append(f"{len(ids)} {noun}{plural} ({', '.join(names)}{more})")
        return " and ".join(parts) or None

    def _name(self, image_id: str, kind: str) -> str:
        sample = self.samples.get(image_id)
        if sample is None:
            return f"{image_id} (no longer in the data)"
        path = sample.image if kind == "images" else sample.mask
        return Path(path).relative_to(self.data_dir).as_posix()


def prepare_train_data(cfg: dict[str, Any], dist: Dist) -> TrainData:
    """List, cache and split the training set; under DDP rank 0 goes first.

    The cache (under `<out_dir>/cache`) is shared by all experiments: its keys include the
    working size and mask thresholds. The split is per experiment and seeded by
    `data.fold_seed`, not by the training seed, so a second seed of a model trains on the
    same folds as the first.
    """
    data_dir = ExperimentSettings.from_config(cfg).data()
    samples = list_train(data_dir)
    settings = DataSettings.from_config(cfg)

    def run() -> TrainData:
        items = prepare_for_config(cfg, samples)
        check_masks(items, {s.id: s.mask for s in samples}, settings)
        folds = load_or_make_folds(
            layout_of(cfg).folds,
            {it.id: it.classes for it in items},
            settings.n_folds,
            settings.fold_seed,
        )
        return TrainData(items, folds, {s.id: s for s in samples}, data_dir)

    if dist.is_main:
        data = run()
    dist.barrier()
    if not dist.is_main:
        data = run()
    return data
