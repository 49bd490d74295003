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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chain import lineage
from core.config import (
    ConfigError,
    model_entry,
    provenance,
    reports_environment_errors,
    setup_logging,
)
from core.invocation import command_hint
from core.paths import Layout, RunFiles
from core.runtime import (
    Dist,
    Precision,
    choose_precision,
    configure_cpu_threads,
    configure_determinism,
    kill_point,
)
from core.settings import DataSettings, TrainSettings
from core.ticker import Ticker
from data.augment import transforms_for
from data.cache import CachedItem, prepare_for_config
from data.dataset import SegDataset
from data.loader import LoaderStalled, config_loader
from data.prepare import prepare_train_data
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


def trained_folds(cfg: dict[str, Any], model_name: str, n_folds: int) -> list[RunFiles]:
    runs = [Layout.of(cfg).fold(model_name, k) for k in range(n_folds)]
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
    return prepare_for_config(cfg, list_test(Path(cfg["data_dir"])))


def predict_model(
    cfg: dict[str, Any],
    model_name: str,
    tta: str,
    batch_size: int,
    device: torch.device,
    part: tuple[int, int] = (0, 1),
) -> tuple[Path, Path]:
    """Write `<model>/oof/` and `<model>/test/`; returns their paths. `part` (i, K): only
    every K-th image from the i-th of each fold's validation images and of the test
    images, written as the model's part stores (nnU-Net's --num-parts / --part-id)."""
    part_id, parts = part
    entry = model_entry(cfg, model_name)
    tta_transforms(tta)
    dist = Dist(rank=0, world_size=1, device=device)
    data = prepare_train_data(cfg, dist)
    test_items = prepare_test_items(cfg)[part_id::parts]
    folds = data.folds
    split_id = folds.split_id
    settings = DataSettings.from_config(cfg)
    size = list(settings.img_size)
    runs = trained_folds(cfg, model_name, folds.n_folds)
    # digested before any is read: a fold retrained meanwhile shows as stale, not current
    checkpoints = lineage.made_from(Layout.of(cfg).root, [run.best for run in runs])
    train = TrainSettings.from_config(cfg)
    precision: Precision = choose_precision(device, train.precision, train.channels_last)
    transform = transforms_for(settings, train=False)

    def loader(items: list[CachedItem], name: str) -> Any:
        return config_loader(cfg, SegDataset(items, transform), batch_size, device, None, name=name)

    oof_parts: list[ProbMaps] = []
    test_sum = np.zeros((len(test_items), 3, *size), np.float32)
    n_oof = sum(len(folds.val_ids(k)[part_id::parts]) for k in range(len(runs)))
    ticker = Ticker(
        f"predict {model_name}", n_oof + len(runs) * len(test_items), "images", logger=log
    )
    with ticker:
        for k, run in enumerate(runs):
            ckpt = load_checkpoint(run.best, device)
            check_fold_checkpoint(ckpt, run, k, split_id, size, model_name, entry["arch"])
            model = model_from_checkpoint(ckpt, device)
            if precision.channels_last:
                model = model.to(memory_format=torch.channels_last)
            probs_model = probability_model(model, tta)
            val_ids = folds.val_ids(k)
            part = reusable_oof(run.oof, tta, split_id, data.subset(val_ids), size, ckpt["epoch"])
            val_ids = val_ids[part_id::parts]
            if part is not None:
                part = part.subset(val_ids)
            if part is None:
                val_items = data.subset(val_ids)
                raw = quantise(
                    predict_probs(
                        probs_model,
                        loader(val_items, f"{model_name} fold {k} OOF"),
                        device,
                        precision,
                        f"fold {k} oof",
                        ticker.step,
                    )
                )
                meta = {"split_id": split_id, "folds": [k] * len(val_ids)}
                part = ProbMaps(val_ids, [it.orig_size for it in val_items], meta, raw)
            else:
                log.info("fold %d: reusing %s (same TTA and split)", k, run.oof)
                ticker.skip(len(val_ids))
            oof_parts.append(part)
            test_probs = predict_probs(
                probs_model,
                loader(test_items, f"{model_name} fold {k} test"),
                device,
                precision,
                f"fold {k} test",
                ticker.step,
            )
            test_sum += test_probs
            kill_point("predict-fold")

    joined = concat(oof_parts)
    ids = sorted(joined.ids)
    expected = sorted(i for k in range(folds.n_folds) for i in folds.val_ids(k)[part_id::parts])
    if ids != expected:
        raise DataError(
            f"{model_name}: the fold OOF maps do not cover the {len(expected)} train images once"
        )
    joined = joined.subset(ids)
    layout = Layout.of(cfg)

    def store(kind: str) -> Path:
        if parts == 1:
            return layout.store(model_name, kind)
        return layout.store_part(model_name, kind, part_id, parts)

    common = {
        "model": model_name,
        "split_id": split_id,
        "tta": tta,
        "provenance": provenance(
            cfg, model=model_name, split_id=split_id, tta=tta, stage="predict"
        ),
        lineage.KEY: checkpoints,
    }
    save_probs(
        store("oof"),
        ids,
        joined.raw,
        joined.orig_sizes,
        kind="oof",
        folds=joined.meta["folds"],
        **common,
    )
    save_probs(
        store("test"),
        [it.id for it in test_items],
        test_sum / len(runs),
        [it.orig_size for it in test_items],
        kind="test",
        folds=list(range(folds.n_folds)),
        **common,
    )
    log.info(
        "%s: wrote %d OOF and %d test maps (TTA %s) to %s",
        model_name,
        len(ids),
        len(test_items),
        tta,
        store("oof").parent,
    )
    return store("oof"), store("test")


def merge_parts(cfg: dict[str, Any], model_name: str, parts: int) -> tuple[Path, Path]:
    """Join the `parts` shares of a model's stores into its stores: every share present,
    all of one split and TTA, every train and test image exactly once, in the order an
    unsharded run writes them."""
    layout = Layout.of(cfg)
    data_dir = Path(cfg["data_dir"])
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
        pcfg = cfg.get("predict") or {}
        if share is None:
            oof, test = merge_parts(cfg, args.model, args.merge_parts)
        else:
            oof, test = predict_model(
                cfg,
                args.model,
                str(pcfg.get("tta", "none")),
                int(pcfg.get("batch_size", 16)),
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
