"""Data preparation shared by training and prediction: the cached items and the split.

Both stages must see the same working-size items and the same folds; predict.py needs the
split to know which fold's model predicts which training image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.cache import CachedItem, check_masks, prepare_for_config
from data.folds import Folds, load_or_make_folds
from data.reader import list_train
from paths import Layout
from runtime import Dist
from settings import DataSettings


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
    settings = DataSettings.from_config(cfg)

    def run() -> TrainData:
        items = prepare_for_config(cfg, samples)
        check_masks(items, {s.id: s.mask for s in samples}, settings)
        folds = load_or_make_folds(
            Layout.of(cfg).folds,
            {it.id: it.classes for it in items},
            settings.n_folds,
            settings.fold_seed,
        )
        return TrainData(items, folds)

    if dist.is_main:
        data = run()
    dist.barrier()
    if not dist.is_main:
        data = run()
    return data
