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
records.input_store reads it. `refine.json` holds this stage's own choice (the
refined mask or the first stage's, under the refined classes) and, for information, the
refined maps against the blend after the `decide.lens`. The blend's OOF maps are
themselves out of sample (ensemble.py blends each fold with the weights fitted without it).
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("refine")

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from chain import lineage
from chain.decisions import (
    Candidate,
    Option,
    Rule,
    choose,
    decide,
    fold_rows,
    format_decision,
    map_stats,
    pick,
)
from chain.records import ChangedRegion, Decision, MaskChoice, RefineRecord
from chain.refinement import (
    RegionSet,
    collect_regions,
    paste,
    portable_numerics,
    predict_regions,
    refine_test,
    save_refiners,
    tensor,
)
from chain.regions import CROP_CHANNELS, FALSE_POSITIVE
from core.config import (
    ConfigError,
    provenance,
    reports_environment_errors,
    setup_logging,
)
from core.invocation import command_hint
from core.metrics import class_stats
from core.runtime import derive_seed
from core.settings import ExperimentSettings, RefineSettings, layout_of
from core.ticker import Ticker
from data.cache import load_item, prepare_for_config, train_items
from data.probstore import ProbMaps, check_compatible, load_probs, save_probs
from data.reader import DataError, list_test
from models.refiner import RegionRefiner

log = logging.getLogger("refine")

# Regions listed in refine.json (and drawn in the report) as the ones changed most.
N_MOST_CHANGED = 6


def _dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the square crops (dims -2, -1)."""
    if code & 4:
        x = x.flip(-1)
    return torch.rot90(x, code & 3, dims=(-2, -1))


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
            x = _dihedral(tensor(data.crops[rows], device), code)
            y_mask = _dihedral(tensor(data.masks[rows], device), code)
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
    classes = np.zeros((len(data), 3), np.float32)
    polyp = np.zeros((len(data), settings.crop, settings.crop), np.float32)
    models, records = [], []
    splits = fold_rows(folds)
    with Ticker("refine", len(splits), "folds", logger=log) as ticker:
        for k, train_images, val_images in splits:
            train_rows = np.flatnonzero(np.isin(data.image_index, train_images))
            val_rows = np.flatnonzero(np.isin(data.image_index, val_images))
            seen = {data.image_ids[r] for r in train_rows}
            if seen & {data.image_ids[r] for r in val_rows}:
                raise RuntimeError(f"fold {k}: an image is both trained on and refined")
            start = time.perf_counter()
            model = train_refiner(data.take(train_rows), settings, derive_seed(seed, k))
            classes[val_rows], polyp[val_rows] = predict_regions([model], data.take(val_rows))
            models.append(model)
            log.info(
                "fold %d: trained on %d regions, refined %d", k, len(train_rows), len(val_rows)
            )
            ticker.step()
            records.append(
                {
                    "fold": int(k),
                    "train_images": len(seen),
                    "train_regions": len(train_rows),
                    "val_images": len(val_images),
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
) -> tuple[np.ndarray, list[RegionRefiner], RefineRecord]:
    """Cross-validated refinement and its decision: (refined maps, fold refiners, record;
    the caller adds the split, the time it took, provenance and the inputs).

    The refiners are fitted per fold (`cross_refine`), so the refined maps are out of
    sample; the decisions compare them with the blend (and the refined mask with the
    first stage's) after the rule's lens, by `decisions.choose`.
    """
    rule = rule or Rule.default()
    start = time.perf_counter()
    models, per_fold, data, classes, polyp = cross_refine(
        ids, images, probs, targets, folds, settings, seed
    )
    lens = rule.params

    def judged(maps: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return map_stats(maps, targets, lens, rows=rows)

    # The refined mask is a choice like any other: used only if it beats the first
    # stage's mask under the refined classes by more than the noise.
    mask = decide(
        [
            Option("class only", judged, paste(probs, data, classes, None)),
            Option("refined mask", judged, paste(probs, data, classes, polyp), level=1),
        ],
        folds,
        rule,
    )
    mask_decision = mask.record
    use_mask = mask_decision["chosen"] == "refined mask"
    refined = mask.chosen.params
    after_stats = mask.chosen.candidate.oos
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
    record = RefineRecord(
        vs_blend=Decision.from_dict(comparison),
        decide=rule.to_dict(),
        oof_before=pick(argmax_stats(probs, targets)),
        oof_after=pick(argmax_stats(refined, targets)),
        per_fold=per_fold,
        refined_mask=MaskChoice(
            kept=use_mask,
            reason=mask_decision["reason"],
            decision=Decision.from_dict(mask_decision),
        ),
        regions=region_summary(data, classes),
        most_changed=[
            ChangedRegion(**r) for r in most_changed(ids, data, probs, refined, N_MOST_CHANGED)
        ],
        settings=dataclasses.asdict(settings),
        seconds_oof=round(time.perf_counter() - start, 1),
    )
    return refined, models, record


def check_split(split_file: Path, oof: ProbMaps, test: ProbMaps) -> list[int]:
    """The OOF store's per-image folds, after checking every split id agrees."""
    check_compatible([oof, test], "refined together")
    if oof.split_id is None:
        raise DataError(
            f"{oof.where}: no split id recorded; blend again: {command_hint('ensemble')}"
        )
    folds = oof.meta.get("folds")
    if not isinstance(folds, list) or len(folds) != len(oof):
        raise DataError(
            f"{oof.where}: no per-image folds recorded; blend again: {command_hint('ensemble')}"
        )
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
    samples = {s.id: s for s in list_test(ExperimentSettings.from_config(cfg).data())}
    missing = [i for i in store.ids if i not in samples]
    if missing:
        raise DataError(f"{store.where}: {len(missing)} ids are no test image, e.g. {missing[0]}")
    return _images(prepare_for_config(cfg, [samples[i] for i in store.ids], store.size))


def run(cfg: dict[str, Any]) -> RefineRecord:
    """The stage: refine the blend's OOF and test maps, decide, write stores and refine.json."""
    settings = RefineSettings.from_config(cfg)
    layout = layout_of(cfg)
    inputs = lineage.made_from(layout.root, [layout.blend("oof"), layout.blend("test")])
    oof = load_probs(layout.blend("oof"))
    test = load_probs(layout.blend("test"))
    folds = check_split(layout.folds, oof, test)
    items = train_items(cfg, oof.ids, oof.size)
    targets = np.stack([load_item(it)[1] for it in items])
    probs = np.asarray(oof.raw)
    start = time.perf_counter()
    with portable_numerics(settings.cpu_threads):
        refined, models, doc = refine_oof(
            oof.ids,
            _images(items),
            probs,
            targets,
            folds,
            settings,
            ExperimentSettings.from_config(cfg).seed,
            Rule.from_config(cfg),
        )
        refined_test = refine_test(
            models,
            test.ids,
            load_test_images(cfg, test),
            np.asarray(test.raw),
            settings,
            doc.refined_mask.kept,
        )
    save_refiners(layout.refiners, models, settings.width)
    record = provenance(cfg, stage="refine", split_id=oof.split_id)
    common = {
        "model": "refine",
        "split_id": oof.split_id,
        "provenance": record,
        lineage.KEY: inputs,
    }
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
    doc = dataclasses.replace(
        doc,
        split_id=oof.split_id,
        seconds=round(time.perf_counter() - start, 1),
        provenance=record,
        made_from=inputs,
    )
    doc.write(layout.refine_record)
    return doc


def format_summary(doc: RefineRecord) -> str:
    keys = ("competition", "competition_neo", "competition_non", "dice_seg")
    rows = {"blend": doc.oof_before, "refined": doc.oof_after}
    lines = [f"{'OOF argmax':22s}" + "".join(f"{k:>18s}" for k in keys)]
    for name, row in rows.items():
        lines.append(f"{name:22s}" + "".join(f"{row[k]:18.5f}" for k in keys))
    lines.append(format_decision("refined mask", doc.refined_mask.decision.to_dict()))
    # refined against blend is tune.py's decision, printed by it (vs_blend is in refine.json)
    lines.append("whether the refined maps are used: tune.py decides")
    return "\n".join(lines)


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("refine").parse_args(argv)
    setup_logging()
    try:
        cfg = cli.stage_config(args)
        ExperimentSettings.from_config(cfg).data()  # refused before the maps are read
        doc = run(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(doc))
    print(f"wrote {layout_of(cfg).refine_record.parent} in {doc.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
