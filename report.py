"""Stage: the experiment's score tables and `report.html`, from its artefacts alone.

    python report.py --config configs/bkai.yaml

The pipeline runs it last; run by itself it rebuilds the report and `scores.json` of a
finished experiment (after a hand edit, a new version of the report, or on a copy), with
no training data needed beyond the cached working-size images. Scores: out-of-fold (all
training images, at working resolution) always, and on the test set only when the data
folder has a `test_gt/` (the synthetic demo data does; the real competition data does not).
No other stage reads `test_gt/`. The drawing itself is `reporting.py`.
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("report")


import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from chain import postprocessing
from chain.evaluation import (
    DECISIONS_TABLE,
    OOF_TABLE,
    SUBMITTED,
    TEST_TABLE,
    decision_rows,
    format_rows,
    oof_rows,
    read_json,
    test_rows,
)
from chain.postprocessing import PostprocessParams
from chain.records import BlendRecord, Decision, PostprocessRecord, RefineRecord, input_store
from chain.reporting import Case, ReportInputs, write_report
from core.config import (
    ConfigError,
    model_config,
    reports_environment_errors,
    setup_logging,
)
from core.invocation import command_line
from core.metrics import beats_nothing, class_stats, nothing_stats, scores_from_stats
from core.settings import DataSettings, ExperimentSettings, layout_of, refining
from data.atomic import write_json
from data.cache import load_item, train_items
from data.foldlog import failed_attempts
from data.probstore import ProbMaps, load_probs
from data.reader import DataError, list_test, list_test_gt
from training import tracking
from training.engine import judge_fold
from training.recipe import RetryPolicy
from workflow.stages import model_names


def oof_cases(store: ProbMaps, cfg: dict[str, Any], params: PostprocessParams) -> list[Case]:
    """Every OOF image of the blend, at argmax and post-processed, with both scores."""
    size = tuple(store.size)
    items = train_items(cfg, store.ids, size)
    cases = []
    for i, item in enumerate(items):
        image, target = load_item(item)
        raw = postprocessing.postprocess(store.raw[i], size, PostprocessParams())
        post = postprocessing.postprocess(store.raw[i], size, params)
        stats = class_stats(np.stack([raw, post]), np.stack([target, target]))
        score, score_post = (scores_from_stats(stats[j : j + 1])["competition"] for j in (0, 1))
        cases.append(Case(item.id, image, target, raw, post, score, score_post))
    return cases


def refine_record(cfg: dict[str, Any]) -> RefineRecord | None:
    """refine.py's `refine.json` when the config enables refinement, else None."""
    if not refining(cfg):
        return None
    return RefineRecord.read(layout_of(cfg).refine_record)


def refine_cases(cfg: dict[str, Any], record: RefineRecord) -> list[Case]:
    """The regions the refiner changed most, in their windows: blend and refined argmax,
    with each whole image's competition score before and after."""
    layout = layout_of(cfg)
    rows = record.most_changed
    if not rows:
        return []
    blend, refined = (load_probs(path) for path in (layout.blend("oof"), layout.refined("oof")))
    ids = sorted({r.id for r in rows})
    items = dict(zip(ids, train_items(cfg, ids, blend.size), strict=True))
    row_of = {image_id: i for i, image_id in enumerate(blend.ids)}
    cases = []
    for r in rows:
        image, target = load_item(items[r.id])
        i = row_of[r.id]
        before, after = (s.raw[i].argmax(axis=0).astype(np.uint8) for s in (blend, refined))
        stats = class_stats(np.stack([before, after]), np.stack([target, target]))
        score, score_after = (scores_from_stats(stats[j : j + 1])["competition"] for j in (0, 1))
        y0, y1, x0, x1 = r.box
        w = np.s_[y0:y1, x0:x1]
        cases.append(Case(r.id, image[w], target[w], before[w], after[w], score, score_after))
    return cases


def build(cfg: dict[str, Any]) -> dict[str, Any]:
    """Score tables (decisions and OOF always, test when test_gt exists), the report and
    scores.json, from the experiment's artefacts alone."""
    layout = layout_of(cfg)
    names = model_names(cfg)
    blend = BlendRecord.read(layout.weights)
    tuned = PostprocessRecord.read(layout.postprocess)
    blend.need("models", "weights", "scores")
    tuned.need("chosen", "decision", "scores", "out_of_sample")
    params = tuned.params
    # the maps tune.py and the submission used: the refined ones when refinement was kept
    source, why = input_store(cfg, "oof")
    source_name = "refined" if source == layout.refined("oof") else "blend"
    cases = oof_cases(load_probs(source), cfg, params)
    refined = refine_record(cfg)
    records = {
        "blend": blend.decision,
        "refined mask": refined.refined_mask.decision if refined else None,
        "refinement and post-processing": tuned.decision,
    }
    tables = [
        (DECISIONS_TABLE, decision_rows(records)),
        (OOF_TABLE, oof_rows(cfg, [c.target for c in cases], blend, refined, tuned)),
    ]
    notes = [f"Submitted chain: {decision_note(records)}."]
    oof_nothing = scores_from_stats(nothing_stats([c.target for c in cases]))["competition"]
    warnings = chain_warnings(tuned, oof_nothing)
    data_dir = ExperimentSettings.from_config(cfg).data()
    if list_test_gt(data_dir):
        rows, verdict = test_rows(cfg, names, blend, tuned)
        tables.append((TEST_TABLE, rows))
        notes.append(verdict)
        warnings += test_warnings(rows)
    warnings += fold_warnings(cfg, names)
    steps = ", ".join(params.active_steps()) or "none"
    notes += [
        f"Post-processing used: {steps} ({tuned.decision.reason}).",
        "Is a change real? Both side by side, with the paired per-image difference and its "
        f"interval: {command_line('compare', str(layout.root), 'OTHER_EXPERIMENT')}",
        *study_notes({"ensemble": blend.study, "tune": tuned.study}),
    ]
    if refined is not None:
        notes.append(f"Region refinement: {why}; submitted from the {source_name} maps.")
    n_folds = DataSettings.from_config(cfg).n_folds
    inputs = ReportInputs(
        cfg=cfg,
        tables=tables,
        cases=cases,
        folds=read_json(layout.folds)["folds"],
        blend=blend,
        tuned=tuned,
        logs={n: {k: layout.fold(n, k).log for k in range(n_folds)} for n in names},
        timings=read_json(layout.timings) if layout.timings.is_file() else {},
        submission=layout.submission,
        test_images={s.id: s.image for s in list_test(data_dir)},
        notes=notes,
        warnings=warnings,
        refined=refine_cases(cfg, refined) if refined is not None else [],
        source=source_name,
    )
    report = write_report(
        layout.report, f"neopolyp: {ExperimentSettings.from_config(cfg).experiment}", inputs
    )
    write_json(
        layout.scores,
        {"tables": {t: rows for t, rows in tables}, "warnings": warnings, "notes": notes},
    )
    if tracking.enabled(cfg):
        tracking.log_summary(
            cfg, tables, blend.to_dict(), tuned.to_dict(), [report, layout.submission]
        )
    return {"tables": tables, "report": report, "notes": notes, "warnings": warnings}


def fold_warnings(cfg: dict[str, Any], names: Sequence[str]) -> list[str]:
    """One line per fold that was retrained after failing (its `retries.json`), and one per
    fold that stands failed now (engine.judge_fold, as train.py judged it), with why and,
    for a fold kept because retraining could not help, what to change."""
    layout = layout_of(cfg)
    lines = []
    for name in names:
        model_cfg = model_config(cfg, name)
        keeps = RetryPolicy.from_config(model_cfg).attempts == 0
        for k in range(DataSettings.from_config(cfg).n_folds):
            failed = failed_attempts(layout.fold(name, k))
            if failed:
                why = "; ".join(f"attempt {f['attempt']}: {f['reason']}" for f in failed)
                lines.append(
                    f"{name} fold {k} was retrained {len(failed)} time(s) after failing ({why}); "
                    f"its failed logs are kept in {layout.fold(name, k).dir}."
                )
            verdict = judge_fold(model_cfg, name, k)
            if verdict is not None:
                kept = " (kept: retry.attempts is 0)" if verdict.retrain and keeps else ""
                lines.append(f"{name} fold {k}: {verdict.reason}{kept}.")
    return lines


def chain_warnings(tuned: PostprocessRecord, nothing: float) -> list[str]:
    """A line when the submitted chain, scored out of fold and out of sample, does not beat
    `nothing` (predicting nothing on the same images): the one check real data allows."""
    score = tuned.out_of_sample[tuned.chosen]["competition"]
    if beats_nothing(score, nothing):
        return []
    return [
        f"The submitted chain ({tuned.chosen}) does not beat predicting nothing out of fold: "
        f"rows-Dice {score:.4f} out of sample, predicting nothing {nothing:.4f}."
    ]


def test_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A line when the submission does not beat predicting nothing on the test set (rows:
    evaluation.test_rows, predicting nothing first)."""
    nothing = rows[0]["competition"]
    score = next(r for r in rows if r["role"] == SUBMITTED)["competition"]
    if beats_nothing(score, nothing):
        return []
    return [
        f"The submission does not beat predicting nothing on the test set: rows-Dice "
        f"{score:.4f}, an empty submission {nothing:.4f}."
    ]


def decision_note(records: dict[str, Decision | None]) -> str:
    """The decisions in a line: what each stage chose."""
    return "; ".join(f"{stage}: {rec.chosen}" for stage, rec in records.items() if rec)


def study_notes(records: dict[str, dict[str, Any] | None]) -> list[str]:
    """One report line per optuna study: its name, storage, trials CSV and dashboard command."""
    notes = []
    for stage, rec in records.items():
        if rec:
            notes.append(
                f"Optuna study of {stage}: {rec['name']} in {rec['storage']} "
                f"(every trial: {rec['trials_csv']}; browse: optuna-dashboard {rec['storage']})."
            )
    return notes


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("report").parse_args(argv)
    setup_logging()
    try:
        summary = build(cli.stage_config(args))
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    for title, rows in summary["tables"]:
        if title != DECISIONS_TABLE:  # printed once, by the stages that decided (report.html)
            print(format_rows(title, rows), end="\n\n")
    print("\n".join(summary["notes"]), end="\n\n")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    print(f"report: {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
