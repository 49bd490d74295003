"""Choose post-processing on out-of-fold predictions, judged out of sample.

The search runs on the blended OOF probabilities (`ensemble/oof/`, and `refine/oof/` when
refinement is on: this stage decides which the submission starts from) against the
ground truth at the *working* resolution (each map post-processed with orig_size =
working size). At the original 1280×~1000 each trial would process ~10× the pixels (a trial at
352×352 takes a few seconds per 1,000 images, see BENCHMARKS.md); all size-dependent
parameters are fractions of the image (area, shorter side), so they carry over to the
original size where postprocess.py applies them.

Fitting the parameters is a seeded TPE search, then an in-sample pruning as nnU-Net does it
(part of the fit, not the keep rule): starting from the best trial, each active step is
switched off in turn, and it stays only if it improves the objective AND no class
(neoplastic, non-neoplastic) ends up worse than with plain argmax. That fit is done per
fold on the other folds' images and scored on the fold's own (decisions.py), so the
score that decides is never the score that was tuned; the tuned parameters (fitted again
on all folds) are used only if they beat plain argmax and the region vote alone by more
than the noise out of sample.

The studies live in an optuna storage (studies.py: one SQLite file per experiment by
default), named after their inputs and fit, so a killed or extended search continues
where it stopped; the all-folds study's trials are exported to `tune_trials.csv`.
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("tune")


import dataclasses
import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from chain import lineage, studies
from chain.decisions import LENSES, Option, Rule, decide, format_decision, map_stats
from chain.postprocessing import REGION_MODES, PostprocessParams
from chain.records import Decision, PostprocessRecord
from chain.studies import Search, StudyPlace, fit_label, search_settings
from core.config import (
    ConfigError,
    provenance,
    reports_environment_errors,
    setup_logging,
)
from core.invocation import command_hint
from core.metrics import scores_from_stats
from core.paths import Layout
from core.settings import ExperimentSettings, layout_of, refining
from data.cache import load_targets
from data.probstore import META_FILE, ProbMaps, load_probs
from data.reader import DataError

log = logging.getLogger("tune")

# Part of the study's name: change it with `suggest_params`, so old trials are not mixed in.
SPACE_VERSION = "postprocess-v2"

# Enqueued first so the search always measures plain argmax and the usual winner.
START_TRIALS = (
    {
        "use_fg_threshold": False,
        "use_min_area": False,
        "region_mode": "none",
        "use_open": False,
        "use_close": False,
        "fill_holes": False,
        "adaptive": False,
    },
    {
        "use_fg_threshold": False,
        "use_min_area": True,
        "min_area_frac": 0.002,
        "region_mode": "prob",
        "use_open": False,
        "use_close": False,
        "fill_holes": True,
        "adaptive": False,
    },
)


def class_keys(objective: str) -> tuple[str, str]:
    """The per-class scores that must not get worse, in the objective's own form."""
    if objective == "competition":
        return "competition_neo", "competition_non"
    return "dice_neo", "dice_non"


def evaluate(
    probs: np.ndarray,
    targets: np.ndarray,
    params: PostprocessParams,
    n_jobs: int = 1,
    rows: np.ndarray | None = None,
) -> dict[str, float]:
    """Scores of post-processed maps (`decisions.map_stats`) over `rows` (default all)."""
    return scores_from_stats(map_stats(probs, targets, params, n_jobs, rows))


def suggest_params(trial: optuna.Trial) -> PostprocessParams:
    """The search space; each step has an on/off switch so TPE can learn to drop it."""

    def maybe(switch: str, name: str, low: float, high: float, off: Any, log: bool) -> Any:
        if trial.suggest_categorical(switch, [False, True]):
            return trial.suggest_float(name, low, high, log=log)
        return off

    return PostprocessParams(
        fg_threshold=maybe("use_fg_threshold", "fg_threshold", 0.2, 0.8, None, False),
        min_area_frac=maybe("use_min_area", "min_area_frac", 1e-4, 0.02, 0.0, True),
        region_mode=trial.suggest_categorical("region_mode", list(REGION_MODES)),
        open_frac=maybe("use_open", "open_frac", 0.003, 0.05, 0.0, True),
        close_frac=maybe("use_close", "close_frac", 0.003, 0.05, 0.0, True),
        fill_holes=trial.suggest_categorical("fill_holes", [False, True]),
        adaptive=trial.suggest_categorical("adaptive", [False, True]),
    )


def _trial_score(
    probs: np.ndarray,
    targets: np.ndarray,
    objective: str,
    n_jobs: int,
    rows: np.ndarray | None,
    trial: optuna.Trial,
) -> float:
    """One trial: sampled parameters -> OOF score on `rows` (module level, so it pickles
    by reference into worker processes)."""
    params = suggest_params(trial)
    scores = evaluate(probs, targets, params, n_jobs, rows)
    trial.set_user_attr("params", params.to_dict())
    trial.set_user_attr("scores", scores)
    return scores[objective]


def search(
    probs: np.ndarray,
    targets: np.ndarray,
    how: Search,
    place: StudyPlace | None = None,
    rows: np.ndarray | None = None,
    fit: str = "all",
) -> tuple[PostprocessParams, optuna.Study]:
    """Seeded TPE over `PostprocessParams`, maximising `how.objective` on `rows` (default
    all).

    `place` None: in memory; else the study of these inputs in `place.storage` (one per
    `fit`: "all", "fold 0", ...), continued until it has `how.trials` complete trials; the
    best of its first `how.trials` is returned.
    """
    threads = how.threads(place)
    score = functools.partial(_trial_score, probs, targets, how.objective, threads, rows)
    best, study = how.run(
        "tune",
        score,
        place,
        inputs=[probs, targets],
        settings={"space": SPACE_VERSION, "fit": fit},
        start=START_TRIALS,
    )
    return PostprocessParams.from_dict(best.user_attrs["params"]), study


def ablate(
    probs: np.ndarray,
    targets: np.ndarray,
    params: PostprocessParams,
    objective: str,
    baseline: dict[str, float],
    n_jobs: int = 1,
    rows: np.ndarray | None = None,
) -> tuple[PostprocessParams, list[dict[str, Any]]]:
    """nnU-Net's rule: keep a step only if it helps the objective and hurts no class
    (judged on `rows`, default all)."""
    current, scores = params, evaluate(probs, targets, params, n_jobs, rows)
    record = []
    for step in params.active_steps():
        without = current.without(step)
        scores_without = evaluate(probs, targets, without, n_jobs, rows)
        helps = scores[objective] > scores_without[objective]
        harmless = all(scores[k] >= baseline[k] for k in class_keys(objective))
        keep = helps and harmless
        record.append(
            {
                "step": step,
                "with": scores[objective],
                "without": scores_without[objective],
                "no_class_worse_than_argmax": harmless,
                "kept": keep,
            }
        )
        log.debug(
            "step %-12s with %.5f without %.5f -> %s",
            step,
            scores[objective],
            scores_without[objective],
            "keep" if keep else "drop",
        )
        if not keep:
            current, scores = without, scores_without
    # Dropping a later step can leave an earlier kept one harming a class on its own.
    if not all(scores[k] >= baseline[k] for k in class_keys(objective)):
        log.debug("kept steps %s make a class worse than argmax: none kept", current.active_steps())
        record.append({"step": "all", "kept": False, "no_class_worse_than_argmax": False})
        current = PostprocessParams()
    return current, record


@dataclass
class Fit:
    """One fit of the post-processing on some images: search, then nnU-Net's ablation."""

    params: PostprocessParams
    searched: PostprocessParams
    ablation: list[dict[str, Any]]
    baseline: dict[str, float]
    best_trial: dict[str, float]
    study: optuna.Study


def fit_postprocessing(
    probs: np.ndarray,
    targets: np.ndarray,
    how: Search,
    place: StudyPlace | None,
    rows: np.ndarray | None = None,
    fit: str = "all",
) -> Fit:
    """Search and ablation on `rows` (default all): the tuned parameters of those images."""
    baseline = evaluate(probs, targets, PostprocessParams(), how.n_jobs, rows)
    searched, study = search(probs, targets, how, place, rows, fit)
    params, ablation = ablate(probs, targets, searched, how.objective, baseline, how.n_jobs, rows)
    best = studies.best_trial(study, how.trials).user_attrs["scores"]
    return Fit(params, searched, ablation, baseline, best, study)


@dataclass
class Source:
    """Maps the post-processing may start from: the blend, or the refined blend."""

    name: str  # "blend" or "refined"
    probs: np.ndarray  # uint8 (N, 3, H, W), the OOF store's maps
    place: StudyPlace | None = None  # where its studies are kept (None: in memory)


def source_options(src: Source, level: int, targets: np.ndarray, how: Search) -> list[Option]:
    """The maps of `src` at argmax, with the region vote alone (at `level`: the refined
    maps are one fitted component above the blend), and with tuned post-processing (one
    level more; each fold's searched and ablated on the other folds' images)."""

    def stats(params: PostprocessParams, rows: np.ndarray) -> np.ndarray:
        return map_stats(src.probs, targets, params, how.n_jobs, rows)

    def fit(k: int | None, rows: np.ndarray) -> Fit:
        return fit_postprocessing(src.probs, targets, how, src.place, rows, fit_label(k))

    return [
        Option(f"{src.name}, argmax", stats, PostprocessParams(), level=level),
        Option(f"{src.name}, region vote", stats, LENSES["region"], level=level),
        Option(
            f"{src.name}, tuned", lambda f, rows: stats(f.params, rows), fit=fit, level=level + 1
        ),
    ]


def tune(
    sources: Sequence[Source],
    targets: np.ndarray,
    folds: Sequence[int],
    trials: int,
    objective: str = "competition",
    *,
    seed: int = 0,
    n_jobs: int = 1,
    trials_csv: Path | None = None,
    rule: Rule | None = None,
) -> PostprocessRecord:
    """The chain's last decision: the `postprocess.json` record (the caller adds the
    image ids, provenance and the stores it was made from).

    For each source (the blend first, then the refined blend when refine.py made one):
    plain argmax, the region vote alone, and tuned parameters (`source_options`), judged
    by `decisions.decide`. The blend at argmax or with the region vote is the simple
    chain; any other candidate (tuned parameters, the refined maps) is used only when it
    beats the better simple one out of sample by more than the noise. So refinement is
    judged after the post-processing it would get, not at argmax, where the region vote
    already does part of its work. `trials_csv`: where the chosen source's all-folds
    study's trials are exported.
    """
    rule = rule or Rule.default()
    how = Search(trials, objective, seed, n_jobs)
    options, source_of = [], {}
    for level, src in enumerate(sources):
        for option in source_options(src, level, targets, how):
            options.append(option)
            source_of[option.name] = src
    outcome = decide(options, folds, rule)
    source = source_of[outcome.record["chosen"]]
    tuned = outcome.judged[f"{source.name}, tuned"]
    final: Fit = tuned.params
    params = final.params if outcome.chosen is tuned else outcome.chosen.params
    if trials_csv is not None:
        studies.export_trials(final.study, trials_csv)
    oos = outcome.chosen.candidate.oos
    return PostprocessRecord(
        params=params,
        source=source.name,
        sources=[s.name for s in sources],
        chosen=outcome.record["chosen"],
        decision=Decision.from_dict(outcome.record),
        objective=objective,
        decide=rule.to_dict(),
        scores={
            "argmax": final.baseline,
            "best_trial": final.best_trial,
            "tuned": scores_from_stats(tuned.candidate.insample),
        },
        out_of_sample={
            name: scores_from_stats(j.candidate.oos) for name, j in outcome.judged.items()
        },
        oos_image_stats=oos.reshape(len(oos), -1).tolist(),
        tuned_params=final.params,
        fold_params={str(k): f.params for k, f in tuned.fold_params.items()},
        tuned_params_by_source={
            s.name: outcome.judged[f"{s.name}, tuned"].params.params for s in sources
        },
        searched_params=final.searched,
        ablation=final.ablation,
        trials=len(studies.complete_trials(final.study, trials)),
        study=studies.study_record(final.study, source.place, trials_csv),
        n_images=len(targets),
        resolution=list(targets.shape[1:]),
        seed=seed,
    )


def load_sources(
    cfg: dict[str, Any], args: Any, layout: Layout
) -> tuple[list[Source], list[str], Sequence[int], ProbMaps]:
    """The blend's OOF maps, and the refined ones when refinement is on and up to date;
    with the image ids, their folds and the blend's store."""
    blend = load_probs(layout.blend("oof"))
    folds = blend.meta.get("folds")
    if not isinstance(folds, list) or len(folds) != len(blend):
        raise DataError(
            f"{blend.where}: no per-image folds recorded; blend again: {command_hint('ensemble')}"
        )
    stores = {"blend": blend}
    refined_path = layout.refined("oof")
    if refining(cfg):
        if not refined_path.is_dir():
            log.warning(
                "refinement is enabled but %s is missing (make it: %s)",
                refined_path,
                command_hint("refine"),
            )
        elif _meta_time(refined_path) < _meta_time(layout.blend("oof")):
            log.warning(
                "%s is older than the blend: not used (make it again: %s)",
                refined_path,
                command_hint("refine"),
            )
        else:
            refined = load_probs(refined_path)
            if refined.ids != blend.ids or refined.split_id != blend.split_id:
                raise DataError(f"{refined.where}: other images or split than {blend.where}")
            stores["refined"] = refined
    sources = []
    for name, store in stores.items():
        identity = {"source": name, "split_id": store.split_id, "meta": studies.digest(store.meta)}
        place = studies.place_from_args(args, layout, identity)
        sources.append(Source(name, np.asarray(store.raw), place))
    return sources, list(blend.ids), folds, blend


def _meta_time(store: Path) -> float:
    return (store / META_FILE).stat().st_mtime


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("tune").parse_args(argv)
    setup_logging()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        cfg = cli.stage_config(args)
        trials, objective = search_settings(cfg, "tune", args.trials, args.objective)
        cli.check_jobs(args.jobs)
        layout = layout_of(cfg)
        sources, ids, folds, blend = load_sources(cfg, args, layout)
        stores = {"blend": layout.blend("oof"), "refined": layout.refined("oof")}
        inputs = lineage.made_from(layout.root, [stores[s.name] for s in sources])
        log.info("tuning on %s", ", ".join(s.name for s in sources))
        targets = load_targets(cfg, ids, blend.size)
        record = tune(
            sources,
            targets,
            folds,
            trials,
            objective,
            seed=ExperimentSettings.from_config(cfg).seed,
            n_jobs=args.jobs,
            trials_csv=layout.postprocess_trials,
            rule=Rule.from_config(cfg),
        )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except studies.StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    record = dataclasses.replace(
        record,
        image_ids=ids,
        provenance=provenance(cfg, stage="tune", split_id=blend.split_id),
        made_from=inputs,
    )
    out = layout.postprocess
    record.write(out)
    print(format_decision("post-processing and refinement", record.decision.to_dict()))
    kept = ", ".join(record.params.active_steps()) or "none"
    print(f"submitted chain: {record.chosen} (steps: {kept}); wrote {out}")
    if record.study:
        print(f"optuna study {record.study['name']} in {record.study['storage']}")
    return 0


if __name__ == "__main__":
    # Run as the importable module, so worker processes pickle its functions by reference.
    import tune

    sys.exit(tune.main())
