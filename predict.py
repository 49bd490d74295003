"""Stage 2: out-of-fold and test probabilities of one model, with test-time augmentation.

    python predict.py --model deeplabv3plus_resnet50 --tta flip

Reads every fold's `best.pt` and writes two probability stores (docs/contracts.md) under
`<out_dir>/<experiment>/<model>/`:
- `oof/`: each train image predicted by the one fold model that did not see it, sorted by
  id. A fold's own `fold<k>/oof/` (written by train.py without TTA) is reused when it was
  made with the requested TTA; otherwise the fold's validation images are predicted again.
- `test/`: the mean over the fold models of the test images' probabilities.

TTA: models/inference.py (`probability_model`), shared with infer.py.
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("predict")


import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from chain import lineage
from core.config import (
    ConfigError,
    model_entry,
    provenance,
    reports_environment_errors,
    setup_logging,
)
from core.invocation import command_hint
from core.paths import RunFiles
from core.runtime import (
    Dist,
    Precision,
    choose_precision,
    configure_cpu_threads,
    configure_determinism,
    kill_point,
)
from core.settings import (
    DataSettings,
    ExperimentSettings,
    PredictSettings,
    TrainSettings,
    layout_of,
)
from core.ticker import Ticker
from data.augment import transforms_for
from data.cache import CachedItem, prepare_for_config
from data.dataset import SegDataset
from data.folds import Folds
from data.loader import LoaderStalled, config_loader
from data.prepare import TrainData, prepare_train_data
from data.probstore import META_FILE, ProbMaps, concat, load_probs, quantise, save_probs
from data.reader import DataError, list_test, list_train
from models.inference import (
    load_checkpoint,
    model_from_checkpoint,
    predict_probs,
    probability_model,
    tta_transforms,
)
from training.recipe import check_fold_checkpoint

log = logging.getLogger("predict")

T = TypeVar("T")


def trained_folds(cfg: dict[str, Any], model_name: str, n_folds: int) -> list[RunFiles]:
    runs = [layout_of(cfg).fold(model_name, k) for k in range(n_folds)]
    missing = [str(run.best) for run in runs if not run.best.is_file()]
    if missing:
        raise ConfigError(
            f"{model_name}: no trained model for {len(missing)} of {n_folds} folds "
            f"({', '.join(missing)}); train them first: "
            + command_hint("train", "--model", model_name, "--fold", "all")
        )
    return runs


def reusable_oof(
    path: Path,
    tta: str,
    split_id: str,
    items: list[CachedItem],
    size: list[int],
    best_epoch: int,
) -> ProbMaps | None:
    """train.py's fold OOF store, if it answers exactly the question asked now.

    `best_epoch` must match too: a fold resumed for more epochs rewrites best.pt before its
    OOF maps, and blending stale OOF maps with fresh test maps would tune on another model.
    So must the bytes of the validation images (`items`): one replaced since the fold
    trained leaves the fold as it is (it did not train on it), but not its map.
    """
    if not (path / META_FILE).is_file():
        return None
    store = load_probs(path)
    same = (
        store.meta.get("tta") == tta
        and store.meta.get("best_epoch") == best_epoch
        and store.split_id == split_id
        and store.ids == [it.id for it in items]
        and store.meta.get("image_sha256") == [it.image_sha256 for it in items]
        and list(store.size) == list(size)
    )
    return store if same else None


def prepare_test_items(cfg: dict[str, Any]) -> list[CachedItem]:
    """The test images at working size, through the same cache as the train images."""
    return prepare_for_config(cfg, list_test(ExperimentSettings.from_config(cfg).data()))


@dataclass
class Predictor:
    """What every fold's prediction of one model shares: its TTA, the device and its
    precision, the split and working size, and the share of the images this call
    predicts (`share` (i, K): every K-th image from the i-th, nnU-Net's --part-id /
    --num-parts)."""

    cfg: dict[str, Any]
    model_name: str
    tta: str
    batch_size: int
    device: torch.device
    split_id: str
    share: tuple[int, int] = (0, 1)
    settings: DataSettings = field(init=False)
    precision: Precision = field(init=False)
    transform: Any = field(init=False)

    def __post_init__(self) -> None:
        self.settings = DataSettings.from_config(self.cfg)
        train = TrainSettings.from_config(self.cfg)
        self.precision = choose_precision(self.device, train.precision, train.channels_last)
        self.transform = transforms_for(self.settings, train=False)

    @property
    def size(self) -> list[int]:
        return list(self.settings.img_size)

    def shared(self, items: Sequence[T]) -> list[T]:
        """This call's share of `items`."""
        part_id, parts = self.share
        return list(items[part_id::parts])

    def store(self, kind: str) -> Path:
        """The model's store, or this share's part store when the images are shared."""
        part_id, parts = self.share
        layout = layout_of(self.cfg)
        if parts == 1:
            return layout.store(self.model_name, kind)
        return layout.store_part(self.model_name, kind, part_id, parts)

    def fold_model(self, run: RunFiles, k: int, arch: str) -> tuple[nn.Module, int]:
        """Fold k's checkpoint (checked against this split and size) as a probability
        model under the TTA, and the epoch it was saved at."""
        ckpt = load_checkpoint(run.best, self.device)
        check_fold_checkpoint(ckpt, run, k, self.split_id, self.size, self.model_name, arch)
        model = model_from_checkpoint(ckpt, self.device)
        if self.precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return probability_model(model, self.tta), ckpt["epoch"]

    def probs(
        self, model: nn.Module, items: list[CachedItem], what: str, step: Callable[[int], None]
    ) -> np.ndarray:
        """float32 probabilities of `items` (`what`: "fold k OOF" or "fold k test")."""
        loader = config_loader(
            self.cfg,
            SegDataset(items, self.transform),
            self.batch_size,
            self.device,
            None,
            name=f"{self.model_name} {what}",
        )
        return predict_probs(model, loader, self.device, self.precision, what.lower(), step)


def fold_oof(
    predictor: Predictor,
    data: TrainData,
    k: int,
    run: RunFiles,
    model: nn.Module,
    epoch: int,
    ticker: Ticker,
) -> ProbMaps:
    """Fold k's share of its validation images' maps: train.py's own store when it
    answers the same question (`reusable_oof`), else predicted again."""
    val_ids = data.folds.val_ids(k)
    p = predictor
    saved = reusable_oof(run.oof, p.tta, p.split_id, data.subset(val_ids), p.size, epoch)
    val_ids = p.shared(val_ids)
    if saved is not None:
        log.info("fold %d: reusing %s (same TTA and split)", k, run.oof)
        ticker.skip(len(val_ids))
        return saved.subset(val_ids)
    items = data.subset(val_ids)
    raw = quantise(p.probs(model, items, f"fold {k} OOF", ticker.step))
    meta = {"split_id": p.split_id, "folds": [k] * len(val_ids)}
    return ProbMaps(val_ids, [it.orig_size for it in items], meta, raw)


def joined_oof(predictor: Predictor, parts: Sequence[ProbMaps], folds: Folds) -> ProbMaps:
    """The folds' OOF maps as one store sorted by id, once every train image of this
    share is in it exactly once."""
    joined = concat(parts)
    ids = sorted(joined.ids)
    expected = sorted(i for k in range(folds.n_folds) for i in predictor.shared(folds.val_ids(k)))
    if ids != expected:
        raise DataError(
            f"{predictor.model_name}: the fold OOF maps do not cover the {len(expected)} "
            "train images once"
        )
    return joined.subset(ids)


def write_stores(
    predictor: Predictor,
    oof: ProbMaps,
    test_items: list[CachedItem],
    test_probs: np.ndarray,
    n_folds: int,
    checkpoints: dict[str, Any],
) -> tuple[Path, Path]:
    """The model's OOF and test stores (or this share's), each recording the checkpoints
    it was made from."""
    name, split_id, tta = predictor.model_name, predictor.split_id, predictor.tta
    common = {
        "model": name,
        "split_id": split_id,
        "tta": tta,
        "provenance": provenance(
            predictor.cfg, model=name, split_id=split_id, tta=tta, stage="predict"
        ),
        lineage.KEY: checkpoints,
    }
    oof_path, test_path = predictor.store("oof"), predictor.store("test")
    folds = oof.meta["folds"]
    save_probs(oof_path, oof.ids, oof.raw, oof.orig_sizes, kind="oof", folds=folds, **common)
    save_probs(
        test_path,
        [it.id for it in test_items],
        test_probs,
        [it.orig_size for it in test_items],
        kind="test",
        folds=list(range(n_folds)),
        **common,
    )
    log.info(
        "%s: wrote %d OOF and %d test maps (TTA %s) to %s",
        name,
        len(oof.ids),
        len(test_items),
        tta,
        oof_path.parent,
    )
    return oof_path, test_path


def predict_model(
    cfg: dict[str, Any],
    model_name: str,
    tta: str,
    batch_size: int,
    device: torch.device,
    share: tuple[int, int] = (0, 1),
) -> tuple[Path, Path]:
    """Write `<model>/oof/` and `<model>/test/`; returns their paths. `share` (i, K): only
    every K-th image from the i-th of each fold's validation images and of the test
    images, written as the model's part stores (nnU-Net's --num-parts / --part-id)."""
    arch = model_entry(cfg, model_name)["arch"]
    tta_transforms(tta)
    data = prepare_train_data(cfg, Dist(rank=0, world_size=1, device=device))
    folds = data.folds
    runs = trained_folds(cfg, model_name, folds.n_folds)
    # digested before any is read: a fold retrained meanwhile shows as stale, not current
    checkpoints = lineage.made_from(layout_of(cfg).root, [run.best for run in runs])
    predictor = Predictor(cfg, model_name, tta, batch_size, device, folds.split_id, share)
    test_items = predictor.shared(prepare_test_items(cfg))
    oof_parts: list[ProbMaps] = []
    test_sum = np.zeros((len(test_items), 3, *predictor.size), np.float32)
    n_oof = sum(len(predictor.shared(folds.val_ids(k))) for k in range(len(runs)))
    n_images = n_oof + len(runs) * len(test_items)
    with Ticker(f"predict {model_name}", n_images, "images", logger=log) as ticker:
        for k, run in enumerate(runs):
            model, epoch = predictor.fold_model(run, k, arch)
            oof_parts.append(fold_oof(predictor, data, k, run, model, epoch, ticker))
            test_sum += predictor.probs(model, test_items, f"fold {k} test", ticker.step)
            kill_point("predict-fold")
    oof = joined_oof(predictor, oof_parts, folds)
    return write_stores(
        predictor, oof, test_items, test_sum / len(runs), folds.n_folds, checkpoints
    )


def merge_parts(cfg: dict[str, Any], model_name: str, parts: int) -> tuple[Path, Path]:
    """Join the `parts` shares of a model's stores into its stores: every share present,
    all of one split and TTA, every train and test image exactly once, in the order an
    unsharded run writes them."""
    layout = layout_of(cfg)
    data_dir = ExperimentSettings.from_config(cfg).data()
    expected = {
        "oof": sorted(s.id for s in list_train(data_dir)),
        "test": [s.id for s in list_test(data_dir)],
    }
    shares = {
        kind: [layout.store_part(model_name, kind, i, parts) for i in range(parts)]
        for kind in expected
    }
    missing = [str(p) for paths in shares.values() for p in paths if not p.is_dir()]
    if missing:
        raise DataError(f"{model_name}: {len(missing)} share(s) not predicted yet: {missing}")
    for kind, paths in shares.items():
        stores = [load_probs(p) for p in paths]
        tta = {s.meta.get("tta") for s in stores}
        if len(tta) != 1:
            raise DataError(f"{model_name}: the {kind} shares were predicted with TTA {tta}")
        joined = concat(stores)
        if sorted(joined.ids) != sorted(expected[kind]):
            raise DataError(
                f"{model_name}: the {kind} shares hold {len(joined.ids)} images, not the "
                f"{len(expected[kind])} {kind} images once each"
            )
        joined = joined.subset(expected[kind])
        first = stores[0].meta
        if any(s.meta.get(lineage.KEY) != first.get(lineage.KEY) for s in stores):
            raise DataError(
                f"{model_name}: the {kind} shares were predicted from different checkpoints "
                "(a fold was retrained between them): predict every share again"
            )
        save_probs(
            layout.store(model_name, kind),
            joined.ids,
            joined.raw,
            joined.orig_sizes,
            kind=kind,
            model=model_name,
            split_id=first.get("split_id"),
            folds=joined.meta["folds"] if kind == "oof" else first.get("folds"),
            tta=first.get("tta"),
            provenance={**first.get("provenance", {}), "merged_parts": parts},
            **{lineage.KEY: first.get(lineage.KEY)},
        )
    return layout.store(model_name, "oof"), layout.store(model_name, "test")


def checked_share(args: argparse.Namespace) -> tuple[int, int] | None:
    """(--part-id, --num-parts) of a call that predicts, or None for --merge-parts, which
    joins shares already written and so takes neither flag (once ignored silently)."""
    if args.merge_parts is not None:
        flags = {"--num-parts": args.num_parts, "--part-id": args.part_id}
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ConfigError(
                f"--merge-parts joins the shares already predicted and takes no "
                f"{' or '.join(given)}: "
                "predict each share with --num-parts K --part-id I first, then merge alone"
            )
        if args.merge_parts < 2:
            raise ConfigError(
                f"--merge-parts {args.merge_parts}: must be at least 2, the K of the "
                "--num-parts K the shares were predicted with"
            )
        return None
    parts = 1 if args.num_parts is None else args.num_parts
    part_id = 0 if args.part_id is None else args.part_id
    if parts < 1:
        raise ConfigError(f"--num-parts {parts}: must be at least 1")
    if not 0 <= part_id < parts:
        raise ConfigError(f"--part-id {part_id} is not in 0..{parts - 1} (--num-parts {parts})")
    return part_id, parts


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("predict").parse_args(argv)
    setup_logging()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        share = checked_share(args)
        cfg = cli.predict_config(args)
        train = TrainSettings.from_config(cfg)
        configure_cpu_threads(train.cpu_threads)
        configure_determinism(train.deterministic, device)
        predict = PredictSettings.from_config(cfg)
        if share is None:
            oof, test = merge_parts(cfg, args.model, args.merge_parts)
        else:
            oof, test = predict_model(
                cfg,
                args.model,
                predict.tta,
                predict.batch_size,
                device,
                share,
            )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LoaderStalled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.model}: OOF -> {oof}, test -> {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
