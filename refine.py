"""Region-aware refinement: a second-stage network on the blend's out-of-fold regions.

One connected polyp region given the wrong class costs two competition rows (the class it
should have had, and the class it got in an image that has none). A pixel network decides
that class from local evidence; this stage looks at each predicted region as a whole: its
image crop, the blended probabilities in it and its mask (regions.py), and a small
residual network (models/refiner.py) outputs the region's class (false positive,
neoplastic, non-neoplastic) and a refined polyp mask, which are pasted back into
probability maps in the store format of every other stage.

Leak-free by the shared split: the refiner of fold k trains on the regions of the images
outside fold k (their OOF blend and ground truth) and refines fold k's regions, so every
training image gets a refined OOF map from a refiner that never saw it; the test maps are
refined with the mean of the fold refiners' outputs. The stores and `refine.json` record
the split id, and inputs from another split are refused.

Whether the refined maps are used is decided by tune.py: the blend and the refined blend
are each judged out of sample after their own post-processing, and the refined maps win
only by more than the noise (decisions.py); `postprocess.json` records the source and
postprocessing.input_store reads it. `refine.json` holds this stage's own choice (the
refined mask or the first stage's, under the refined classes) and, for information, the
refined maps against the blend after the `decide.lens`. The blend's OOF maps are
themselves out of sample (ensemble.py blends each fold with the weights fitted without it).
"""

from __future__ import annotations

import stages

if __name__ == "__main__":
    stages.exit_if_help("refine")

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from config import (
    ConfigError,
    provenance,
    reports_environment_errors,
    resolve_cli_config,
    settings_from,
    setup_logging,
)
from data.atomic import write_json
from data.cache import load_item, prepare_for_config, train_items
from data.probstore import ProbMaps, check_compatible, load_probs, save_probs
from data.reader import DataError, list_test
from decisions import Candidate, Rule, choose, format_decision, map_stats, pick
from metrics import class_stats
from models.refiner import RegionRefiner
from paths import Layout
from regions import (
    CROP_CHANNELS,
    FALSE_POSITIVE,
    Region,
    crop_target,
    paste_region,
    predicted_regions,
    region_crop,
    true_labels,
)
from runtime import derive_seed

log = logging.getLogger("refine")

# Regions listed in refine.json (and drawn in the report) as the ones changed most.
N_MOST_CHANGED = 6


@dataclass(frozen=True)
class RefineSettings:
    """The `refine:` section of a config (besides `enabled`)."""

    crop: int = 64  # side of the square crop, a multiple of 8
    margin: float = 0.25  # context around the region's box, per side, as a fraction of it
    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 16  # channels of the refiner's first level
    # Tiny convolutions: more threads only add synchronisation (on 2 busy cores, one
    # thread trained a fold 15x faster than two).
    cpu_threads: int = 1

    def __post_init__(self) -> None:
        if self.crop < 16 or self.crop % 8:
            raise ConfigError(f"refine.crop must be a multiple of 8, at least 16, got {self.crop}")
        for name in ("epochs", "batch_size", "width", "cpu_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"refine.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.margin <= 2.0 or self.lr <= 0:
            raise ConfigError(f"refine.margin must be in [0, 2] and refine.lr positive: {self}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> RefineSettings:
        section = dict(cfg.get("refine") or {})
        section.pop("enabled", None)
        return settings_from(cls, section, "refine")


@dataclass
class RegionSet:
    """The regions of some images, as crops, with their truth when the images have one."""

    image_ids: list[str]  # per region
    image_index: np.ndarray  # per region: the image's row in the store
    regions: list[Region]
    crops: np.ndarray  # float16 (M, CROP_CHANNELS, side, side)
    labels: np.ndarray | None  # (M,) true label: FALSE_POSITIVE, 1 or 2
    masks: np.ndarray | None  # float16 (M, side, side) mask targets

    def __len__(self) -> int:
        return len(self.regions)

    def take(self, rows: np.ndarray) -> RegionSet:
        return RegionSet(
            [self.image_ids[r] for r in rows],
            self.image_index[rows],
            [self.regions[r] for r in rows],
            self.crops[rows],
            None if self.labels is None else self.labels[rows],
            None if self.masks is None else self.masks[rows],
        )


def collect_regions(
    ids: Sequence[str],
    images: Sequence[np.ndarray],
    probs: np.ndarray,
    targets: np.ndarray | None,
    settings: RefineSettings,
) -> RegionSet:
    """Every predicted region of every image as a crop (and its truth when `targets`)."""
    image_ids, index, regions, crops, labels, masks = [], [], [], [], [], []
    for i, image_id in enumerate(ids):
        p = probs[i].astype(np.float32) / 255.0 if probs.dtype == np.uint8 else probs[i]
        region_labels, found, _ = predicted_regions(probs[i], settings.margin)
        truth = None if targets is None else true_labels(region_labels, len(found), targets[i])
        for region in found:
            mask = region_labels == region.label
            image_ids.append(image_id)
            index.append(i)
            regions.append(region)
            crops.append(region_crop(images[i], p, mask, region.box, settings.crop))
            if truth is not None:
                labels.append(truth[region.label])
                masks.append(crop_target(targets[i], region_labels, region, settings.crop))
    side = settings.crop
    return RegionSet(
        image_ids,
        np.asarray(index, np.int64),
        regions,
        np.asarray(crops, np.float16).reshape(-1, CROP_CHANNELS, side, side),
        None if targets is None else np.asarray(labels, np.int64),
        None if targets is None else np.asarray(masks, np.float16).reshape(-1, side, side),
    )


def _dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the square crops (dims -2, -1)."""
    if code & 4:
        x = x.flip(-1)
    return torch.rot90(x, code & 3, dims=(-2, -1))


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32)).to(device)


def train_refiner(data: RegionSet, settings: RefineSettings, seed: int) -> RegionRefiner:
    """Train one refiner on `data` (with labels): class cross-entropy + mask BCE.

    Each batch is turned by a random flip/rotation: polyps have no orientation. On the
    GPU when there is one (1,000 images give a few thousand regions per fold).
    """
    if data.labels is None or data.masks is None:
        raise ValueError("train_refiner needs regions with their ground truth")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = RegionRefiner(CROP_CHANNELS, settings.width).to(device)
    if len(data) == 0:
        return model.eval()  # no region to learn from: the refiner stays the identity
    steps = settings.epochs * max(1, -(-len(data) // settings.batch_size))
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, settings.lr, total_steps=steps)
    model.train()
    for _ in range(settings.epochs):
        order = rng.permutation(len(data))
        for lo in range(0, len(order), settings.batch_size):
            rows = np.sort(order[lo : lo + settings.batch_size])
            if len(rows) < 2:
                continue  # BatchNorm needs two samples
            code = int(rng.integers(8))
            x = _dihedral(_tensor(data.crops[rows], device), code)
            y_mask = _dihedral(_tensor(data.masks[rows], device), code)
            y_class = torch.from_numpy(data.labels[rows]).to(device)
            class_logits, mask_logits = model(x)
            loss = F.cross_entropy(class_logits, y_class) + F.binary_cross_entropy_with_logits(
                mask_logits, y_mask
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predict_regions(
    models: Sequence[RegionRefiner], data: RegionSet, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (M, 3), polyp probabilities (M, side, side)), mean over models."""
    side = data.crops.shape[-1]
    classes = np.zeros((len(data), 3), np.float32)
    polyp = np.zeros((len(data), side, side), np.float32)
    for lo in range(0, len(data), batch_size):
        for model in models:
            x = _tensor(data.crops[lo : lo + batch_size], next(model.parameters()).device)
            class_logits, mask_logits = model(x)
            classes[lo : lo + len(x)] += class_logits.softmax(1).cpu().numpy() / len(models)
            polyp[lo : lo + len(x)] += torch.sigmoid(mask_logits).cpu().numpy() / len(models)
    return classes, polyp


def paste(
    probs: np.ndarray, data: RegionSet, classes: np.ndarray, polyp: np.ndarray | None
) -> np.ndarray:
    """Refined uint8 maps: `probs` (uint8 codes) with every region of `data` rewritten;
    `polyp` None keeps the first stage's masks and refines only the regions' classes."""
    out = probs.copy()
    by_image: dict[int, list[int]] = {}
    for row, i in enumerate(data.image_index.tolist()):
        by_image.setdefault(i, []).append(row)
    for i, rows in by_image.items():
        labels, _, _ = predicted_regions(probs[i])
        refined = probs[i].astype(np.float32) / 255.0
        for row in rows:
            mask = None if polyp is None else polyp[row]
            paste_region(refined, labels, data.regions[row], classes[row], mask)
        out[i] = np.rint(np.clip(refined, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def cross_refine(
    ids: Sequence[str],
    images: Sequence[np.ndarray],
    probs: np.ndarray,
    targets: np.ndarray,
    folds: Sequence[int],
    settings: RefineSettings,
    seed: int = 0,
) -> tuple[list[RegionRefiner], list[dict[str, Any]], RegionSet, np.ndarray, np.ndarray]:
    """The fold refiners, per-fold records, the regions, and each region's out-of-fold
    class probabilities (M, 3) and refined polyp probabilities (M, side, side).

    The refiner of fold k sees only regions of images outside fold k and refines only
    fold k's images; a region that would break this raises, it is never silently used.
    """
    data = collect_regions(ids, images, probs, targets, settings)
    fold_of_region = np.asarray([folds[i] for i in data.image_index.tolist()], np.int64)
    classes = np.zeros((len(data), 3), np.float32)
    polyp = np.zeros((len(data), settings.crop, settings.crop), np.float32)
    models, records = [], []
    for k in sorted(set(folds)):
        train_rows = np.flatnonzero(fold_of_region != k)
        val_rows = np.flatnonzero(fold_of_region == k)
        seen = {data.image_ids[r] for r in train_rows}
        if seen & {data.image_ids[r] for r in val_rows}:
            raise RuntimeError(f"fold {k}: an image is both trained on and refined")
        start = time.perf_counter()
        model = train_refiner(data.take(train_rows), settings, derive_seed(seed, k))
        classes[val_rows], polyp[val_rows] = predict_regions([model], data.take(val_rows))
        models.append(model)
        log.info("fold %d: trained on %d regions, refined %d", k, len(train_rows), len(val_rows))
        records.append(
            {
                "fold": int(k),
                "train_images": len(seen),
                "train_regions": len(train_rows),
                "val_images": sum(int(f == k) for f in folds),
                "val_regions": len(val_rows),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    return models, records, data, classes, polyp


def argmax_stats(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-image class stats (N, 3, 3) of the argmax of uint8 maps."""
    return class_stats(probs.argmax(axis=1).astype(np.uint8), targets)


def region_summary(data: RegionSet, classes: np.ndarray) -> dict[str, Any]:
    """How many regions of each true label there were, and how the refiner relabelled them."""
    before = blend_classes(data)
    after = classes.argmax(axis=1)
    truth = data.labels if data.labels is not None else np.full(len(data), -1)
    return {
        "n": len(data),
        "true_false_positive": int((truth == FALSE_POSITIVE).sum()),
        "true_neoplastic": int((truth == 1).sum()),
        "true_non_neoplastic": int((truth == 2).sum()),
        "right_before": int((before == truth).sum()),
        "right_after": int((after == truth).sum()),
        "relabelled": int((after != before).sum()),
        "removed": int((after == FALSE_POSITIVE).sum()),
    }


def blend_classes(data: RegionSet) -> np.ndarray:
    """The blend's class of each region: the class with more probability under its mask
    in the crop (neoplastic wins ties), what the refiner's class prior starts from."""
    crops = data.crops.astype(np.float32)
    mass = (crops[:, 4:6] * crops[:, 6:7]).sum(axis=(2, 3))
    return np.where(mass[:, 1] > mass[:, 0], 2, 1)


def most_changed(
    ids: Sequence[str], data: RegionSet, before: np.ndarray, after: np.ndarray, n: int
) -> list[dict[str, Any]]:
    """The n regions whose window changed most (argmax pixels), for the report."""
    rows = []
    for row, (i, region) in enumerate(zip(data.image_index.tolist(), data.regions, strict=True)):
        y0, y1, x0, x1 = region.box
        a = before[i, :, y0:y1, x0:x1].argmax(axis=0)
        b = after[i, :, y0:y1, x0:x1].argmax(axis=0)
        rows.append((int((a != b).sum()), row))
    rows.sort(reverse=True)
    return [
        {
            "id": ids[int(data.image_index[row])],
            "box": list(data.regions[row].box),
            "changed_pixels": changed,
            "true_label": None if data.labels is None else int(data.labels[row]),
        }
        for changed, row in rows[:n]
        if changed > 0
    ]


def refine_oof(
    ids: Sequence[str],
    images: Sequence[np.ndarray],
    probs: np.ndarray,
    targets: np.ndarray,
    folds: Sequence[int],
    settings: RefineSettings,
    seed: int = 0,
    rule: Rule | None = None,
) -> tuple[np.ndarray, list[RegionRefiner], dict[str, Any]]:
    """Cross-validated refinement and its decision: (refined maps, fold refiners, record).

    The refiners are fitted per fold (`cross_refine`), so the refined maps are out of
    sample; the decisions compare them with the blend (and the refined mask with the
    first stage's) after the rule's lens, by `decisions.choose`.
    """
    rule = rule or Rule()
    start = time.perf_counter()
    models, per_fold, data, classes, polyp = cross_refine(
        ids, images, probs, targets, folds, settings, seed
    )
    # The refined mask is a choice like any other: used only if it beats the first
    # stage's mask under the refined classes by more than the noise.
    class_only = paste(probs, data, classes, None)
    with_mask = paste(probs, data, classes, polyp)
    lens = rule.params
    class_only_stats = map_stats(class_only, targets, lens)
    with_mask_stats = map_stats(with_mask, targets, lens)
    mask_decision = choose(
        [
            Candidate("class only", class_only_stats),
            Candidate("refined mask", with_mask_stats, level=1),
        ],
        rule,
    )
    use_mask = mask_decision["chosen"] == "refined mask"
    refined = with_mask if use_mask else class_only
    after_stats = with_mask_stats if use_mask else class_only_stats
    before_stats = map_stats(probs, targets, lens)
    folds_arr = np.asarray(folds)
    for record in per_fold:
        on = folds_arr == record["fold"]
        record["before"] = pick(before_stats[on])
        record["after"] = pick(after_stats[on])
    # Diagnostic only: whether the refined maps are used is decided by tune.py, after the
    # post-processing each would get.
    comparison = choose(
        [
            Candidate("blend", before_stats),
            Candidate("refined", after_stats, level=1),
        ],
        rule,
    )
    doc = {
        "vs_blend": comparison,
        "decide": rule.to_dict(),
        "oof_before": pick(argmax_stats(probs, targets)),
        "oof_after": pick(argmax_stats(refined, targets)),
        "per_fold": per_fold,
        "refined_mask": {
            "kept": use_mask,
            "reason": mask_decision["reason"],
            "decision": mask_decision,
        },
        "regions": region_summary(data, classes),
        "most_changed": most_changed(ids, data, probs, refined, N_MOST_CHANGED),
        "settings": dataclasses.asdict(settings),
        "seconds_oof": round(time.perf_counter() - start, 1),
    }
    return refined, models, doc


def refine_test(
    models: Sequence[RegionRefiner],
    ids: Sequence[str],
    images: Sequence[np.ndarray],
    probs: np.ndarray,
    settings: RefineSettings,
    use_mask: bool,
) -> np.ndarray:
    """Test maps refined with the mean of the fold refiners' outputs (their masks too
    only when `use_mask`, the OOF decision in refine.json's `refined_mask`)."""
    data = collect_regions(ids, images, probs, None, settings)
    classes, polyp = predict_regions(models, data)
    return paste(probs, data, classes, polyp if use_mask else None)


def check_split(split_file: Path, oof: ProbMaps, test: ProbMaps) -> list[int]:
    """The OOF store's per-image folds, after checking every split id agrees."""
    check_compatible([oof, test], "refined together")
    if oof.split_id is None:
        raise DataError(f"{oof.where}: no split id recorded; rerun ensemble.py")
    folds = oof.meta.get("folds")
    if not isinstance(folds, list) or len(folds) != len(oof):
        raise DataError(f"{oof.where}: no per-image folds recorded; rerun ensemble.py")
    if split_file.is_file():
        try:
            recorded = json.loads(split_file.read_text()).get("split_id")
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(f"{split_file}: unreadable ({exc})") from exc
        if recorded != oof.split_id:
            raise DataError(
                f"{oof.where} has split id {oof.split_id!r} but {split_file} has {recorded!r}: "
                "predictions from another fold split cannot be refined"
            )
    return [int(f) for f in folds]


def _images(items: Sequence[Any]) -> list[np.ndarray]:
    return [load_item(item)[0] for item in items]


def load_test_images(cfg: dict[str, Any], store: ProbMaps) -> list[np.ndarray]:
    """The test images of a store, in its order, at its working size (from the cache)."""
    samples = {s.id: s for s in list_test(Path(cfg["data_dir"]))}
    missing = [i for i in store.ids if i not in samples]
    if missing:
        raise DataError(f"{store.where}: {len(missing)} ids are no test image, e.g. {missing[0]}")
    return _images(prepare_for_config(cfg, [samples[i] for i in store.ids], store.size))


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """The stage: refine the blend's OOF and test maps, decide, write stores and refine.json."""
    settings = RefineSettings.from_config(cfg)
    layout = Layout.of(cfg)
    oof = load_probs(layout.blend("oof"))
    test = load_probs(layout.blend("test"))
    folds = check_split(layout.folds, oof, test)
    items = train_items(cfg, oof.ids, oof.size)
    targets = np.stack([load_item(it)[1] for it in items])
    probs = np.asarray(oof.raw)
    start = time.perf_counter()
    threads, optimized = torch.get_num_threads(), cv2.useOptimized()
    torch.set_num_threads(settings.cpu_threads)
    # The crops are resized in float, where OpenCV's AVX2 and AVX-512 code paths round
    # differently (1e-5, enough to move a trained refiner): the portable path everywhere.
    cv2.setUseOptimized(False)
    try:  # the pipeline calls this stage in-process: its settings are given back
        refined, models, doc = refine_oof(
            oof.ids,
            _images(items),
            probs,
            targets,
            folds,
            settings,
            int(cfg.get("seed", 0)),
            Rule.from_config(cfg),
        )
        refined_test = refine_test(
            models,
            test.ids,
            load_test_images(cfg, test),
            np.asarray(test.raw),
            settings,
            doc["refined_mask"]["kept"],
        )
    finally:
        torch.set_num_threads(threads)
        cv2.setUseOptimized(optimized)
    record = provenance(cfg, stage="refine", split_id=oof.split_id)
    common = {"model": "refine", "split_id": oof.split_id, "provenance": record}
    save_probs(
        layout.refined("oof"),
        oof.ids,
        refined,
        oof.orig_sizes,
        kind="oof",
        folds=folds,
        **common,
    )
    save_probs(
        layout.refined("test"),
        test.ids,
        refined_test,
        test.orig_sizes,
        kind="test",
        folds=test.meta.get("folds"),
        **common,
    )
    doc.update(
        split_id=oof.split_id,
        seconds=round(time.perf_counter() - start, 1),
        provenance=record,
    )
    write_json(layout.refine_record, doc)
    return doc


def format_summary(doc: dict[str, Any]) -> str:
    keys = ("competition", "competition_neo", "competition_non", "dice_seg")
    rows = {"blend": doc["oof_before"], "refined": doc["oof_after"]}
    lines = [f"{'OOF argmax':22s}" + "".join(f"{k:>18s}" for k in keys)]
    for name, row in rows.items():
        lines.append(f"{name:22s}" + "".join(f"{row[k]:18.5f}" for k in keys))
    lines.append(format_decision("refined mask", doc["refined_mask"]["decision"]))
    lines.append(format_decision("refined vs blend (tune.py decides)", doc["vs_blend"]))
    return "\n".join(lines)


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("refine").parse_args(argv)
    setup_logging()
    try:
        cfg = resolve_cli_config(args)
        if not cfg.get("data_dir"):
            raise ConfigError("no data dir: give --data-dir or set data_dir in the config")
        doc = run(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(doc))
    print(f"wrote {Layout.of(cfg).refine_record.parent} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
