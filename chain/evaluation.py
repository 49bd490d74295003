"""The score tables of a finished experiment: decisions, out of fold, and the test set.

Every table is read against predicting nothing (an empty row scores 1 under the
competition metric), out-of-sample scores stand beside in-sample ones, and on the test set
(only when the data has a `test_gt/`, as the synthetic demo does) the submission stands
beside the simple chains it had to beat: the equal-weight blend and the best single model,
each at plain argmax and with the region vote alone. No stage reads `test_gt/`; only
this final scoring does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chain.decisions import LENSES, Rule, bootstrap_gain
from chain.postprocessing import PostprocessParams, class_maps
from chain.records import BlendRecord, Decision, PostprocessRecord, RefineRecord, input_store
from core.invocation import command_hint
from core.metrics import class_stats, nothing_stats, scores_from_stats
from core.settings import DataSettings, ExperimentSettings, layout_of, refining
from data.probstore import ProbMaps, align_stores, blend, load_probs
from data.reader import DataError, MaskThresholds, list_test_gt, load_mask

SCORE_KEYS = ("competition", "dice_seg", "dice_neo", "dice_non")
OOF_TABLE = "Out-of-fold (working resolution)"
DECISIONS_TABLE = "Decisions (out of sample, each fold scored by what was fitted without it)"
TEST_TABLE = "Test set (original size, test_gt/)"
SUBMITTED = "submission"
SIMPLE = "simple alternative"
GAIN = "vs submission [interval]"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON artefact that is no decision document (scores.json, timings.json,
    folds.json, a fold's recipe.json; the decision documents are read by their records,
    records.py), or DataError naming it and the command that makes it: the pipeline,
    which runs whichever stage wrote it. Missing means that stage has not run (report.py
    before any run said 'unreadable ([Errno 2] ...); delete it')."""
    if not path.exists():
        raise DataError(
            f"{path} not found: the stage that writes it has not run yet; run it first: "
            + command_hint("pipeline")
        )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: unreadable ({exc}); delete it, then make it again: "
            + command_hint("pipeline")
        ) from exc


def pick_scores(scores: Mapping[str, float]) -> dict[str, float]:
    return {k: float(scores[k]) for k in SCORE_KEYS}


def nothing_row(targets: Sequence[np.ndarray], **labels: str) -> dict[str, Any]:
    """What an empty submission scores: every row whose class is absent counts as 1, so a
    model must be read against this, not against 0."""
    return {**labels, **pick_scores(scores_from_stats(nothing_stats(targets)))}


def decision_rows(records: Mapping[str, Decision | None]) -> list[dict[str, Any]]:
    """One row per candidate of every decision: its level (0: simple; each level adds a
    fitted component), out-of-sample and in-sample score on the decision's metric, its
    gain over the best simple candidate with the interval, and the choice."""
    rows = []
    for stage, rec in records.items():
        if not rec:
            continue
        metric = rec.metric
        for name, row in rec.candidates.items():
            gain = row.gain_over_simple
            rows.append(
                {
                    "decision": stage,
                    "candidate": name,
                    "level": row.level,
                    f"{metric} out of sample": row.out_of_sample[metric],
                    "in sample": (row.in_sample or {}).get(metric),
                    "gain [interval]": None if gain is None else _interval(gain),
                    "chosen": "chosen" if name == rec.chosen else "",
                }
            )
    return rows


def oof_rows(
    cfg: dict[str, Any],
    targets: Sequence[np.ndarray],
    blend: BlendRecord,
    refined: RefineRecord | None,
    tuned: PostprocessRecord,
) -> list[dict[str, Any]]:
    """Out-of-fold scores at working resolution, each row saying whether it is honest."""
    labels = {"equal": "blend, equal weights", "tuned": "blend, tuned weights (in-sample)"}
    rows = [nothing_row(targets, model="predict nothing", variant="baseline")]
    for name, by_fold in blend.scores.items():
        rows.append(
            {"model": labels.get(name, name), "variant": "argmax", **pick_scores(by_fold["all"])}
        )
    source = tuned.source
    if refined is not None:
        label = "refined" if source == "refined" else "refined (not used)"
        rows.append({"model": label, "variant": "argmax", **pick_scores(refined.oof_after)})
    rows.append(
        {
            "model": f"{source}, tuned post-processing",
            "variant": "in-sample (fitted on these images)",
            **pick_scores(tuned.scores["tuned"]),
        }
    )
    rows.append(
        {
            "model": f"submitted chain ({tuned.chosen})",
            "variant": "out of sample",
            **pick_scores(tuned.out_of_sample[tuned.chosen]),
        }
    )
    return rows


def _image_stats(
    store: ProbMaps,
    params: PostprocessParams,
    truth: Mapping[str, np.ndarray],
    ids: Sequence[str],
) -> np.ndarray:
    """Per-image class stats of a store's post-processed maps, in the order of `ids`, so
    two chains' stats pair image by image."""
    maps = dict(class_maps(store, params))
    return class_stats([maps[i] for i in ids], [truth[i] for i in ids])


def interval_cell(gain: float, low: float, high: float) -> str:
    """A "+g [lo, hi]" cell of the test table, the form parse_interval reads back."""
    return f"{gain:+.4f} [{low:+.4f}, {high:+.4f}]"


def _interval(gain: Mapping[str, float]) -> str:
    return interval_cell(gain["gain"], gain["low"], gain["high"])


def parse_interval(text: str | None) -> tuple[float, float, float]:
    """(gain, low, high) of a "+g [lo, hi]" cell of the test table, for readers of
    scores.json."""
    values = re.findall(r"[-+]\d+\.\d+", text or "")
    if len(values) != 3:
        raise ValueError(f"not an interval cell: {text!r}")
    gain, low, high = (float(v) for v in values)
    return gain, low, high


def submission_gain(row: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """(gain, low, high) of the submission over a test-table row's chain: its cell turned
    around (None for a row without one). `0.0 - x` keeps a zero from printing as -0."""
    if row.get(GAIN) is None:
        return None
    gain, low, high = parse_interval(row[GAIN])
    return 0.0 - gain, 0.0 - high, 0.0 - low


def test_truth(cfg: dict[str, Any], ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The test masks at original size, by id; DataError when one is missing."""
    data_dir = ExperimentSettings.from_config(cfg).data()
    samples = {s.id: s for s in list_test_gt(data_dir) or []}
    missing = [i for i in ids if i not in samples]
    if missing:
        raise DataError(f"test_gt has no mask for {len(missing)} test images, e.g. {missing[0]}")
    thresholds = MaskThresholds.from_mapping(DataSettings.from_config(cfg).mask)
    return {i: load_mask(samples[i].mask, thresholds) for i in ids}


def test_rows(
    cfg: dict[str, Any],
    names: Sequence[str],
    blend_record: BlendRecord,
    tuned: PostprocessRecord,
) -> tuple[list[dict[str, Any]], str]:
    """The test table and a one-line verdict: the submission against its simple chains.

    Rows: each model, each blend candidate and the refined maps at argmax, with the region
    vote, and with the submitted post-processing; the simple chains are marked; the last
    row is exactly what `submission.csv` holds. Each chain's paired per-image gain over
    the submission, with its bootstrap interval, says whether a gap on a few dozen test
    images is more than one image's luck (on the seed-0 demo one small polyp given the
    wrong class was the whole of a 0.019 gap).
    """
    layout = layout_of(cfg)
    submitted = tuned.params
    variants = {
        "argmax": PostprocessParams(),
        "region vote": LENSES["region"],
        "submitted post-processing": submitted,
    }
    models = align_stores([load_probs(layout.store(n, "test")) for n in names])
    first = models[0]
    truth = test_truth(cfg, first.ids)
    maps: dict[str, ProbMaps] = dict(zip(names, models, strict=True))
    best = names[0]
    if len(names) > 1:
        blend_record.need("candidates")
        for cand in ("equal", "tuned"):
            weights = blend_record.candidates[cand].weights
            maps[f"blend, {cand} weights"] = ProbMaps(
                first.ids, first.orig_sizes, {}, blend(models, weights)
            )
        best = str(blend_record.candidates["best single"].model)
    refined_store = layout.refined("test")
    if refining(cfg) and refined_store.is_dir():
        maps["refined"] = load_probs(refined_store)
    simple = {(best, "argmax"), (best, "region vote")}
    if len(names) > 1:
        simple |= {("blend, equal weights", "argmax"), ("blend, equal weights", "region vote")}
    ids = list(first.ids)
    chains: list[tuple[dict[str, Any], np.ndarray]] = []
    for label, store in maps.items():
        for variant, params in variants.items():
            role = SIMPLE if (label, variant) in simple else ""
            chains.append(
                (
                    {"model": label, "variant": variant, "role": role},
                    _image_stats(store, params, truth, ids),
                )
            )
    source = load_probs(input_store(cfg, "test")[0])
    chains.append(
        (
            {
                "model": f"{SUBMITTED} ({tuned.source} maps)",
                "variant": tuned.chosen,
                "role": SUBMITTED,
            },
            _image_stats(source, submitted, truth, ids),
        )
    )
    submission = chains[-1][1]
    # the table's scores are the competition's, so its intervals are too, whatever
    # decide.metric the decisions were made on
    rule = dataclasses.replace(Rule.from_config(cfg), metric="competition")
    rows = [
        {
            **nothing_row(list(truth.values()), model="predict nothing", variant="baseline"),
            GAIN: None,
            "role": "",
        }
    ]
    for labels, stats in chains:
        own = labels["role"] != SUBMITTED
        rows.append(
            {
                "model": labels["model"],
                "variant": labels["variant"],
                **pick_scores(scores_from_stats(stats)),
                GAIN: _interval(bootstrap_gain(submission, stats, rule)) if own else None,
                "role": labels["role"],
            }
        )
    simple_chains = [
        (r, st) for r, (_, st) in zip(rows[1:], chains, strict=True) if r["role"] == SIMPLE
    ]
    best_simple, best_stats = max(simple_chains, key=lambda c: c[0]["competition"])
    against = bootstrap_gain(best_stats, submission, rule, picked_from=len(simple_chains))
    level = 100.0 - 2.0 * rule.tail(len(simple_chains)) * 100.0
    noise = "within the noise" if against["low"] <= 0.0 <= against["high"] else "beyond the noise"
    verdict = (
        f"On the test set the submission scores rows-Dice {rows[-1]['competition']:.4f}, "
        f"{_interval(against)} against the best simple chain ({best_simple['model']}, "
        f"{best_simple['variant']}: {best_simple['competition']:.4f}): {noise} "
        f"({level:.1f}% paired bootstrap over the {len(ids)} test images, widened for picking "
        f"the best of {len(simple_chains)} simple chains on them)."
    )
    return rows, verdict


def format_rows(title: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """A console table: right-aligned columns, floats to 4 places."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    line = "  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))
    body = ["  ".join(_fmt(r[k]).rjust(w) for k, w in zip(keys, widths, strict=True)) for r in rows]
    return "\n".join([title, line, *body])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
