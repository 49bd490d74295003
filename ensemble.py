"""Blend the models' probability maps: equal weights, the best model, or tuned weights.

OOF stores are only comparable when they come from the same fold split and cover the same
images; anything else is refused, because a blend of predictions made on different splits
leaks validation images into training and its OOF score means nothing.

Three candidates, judged out of sample (decisions.py): equal weights, the best single
model, and weights (one per model, normalised to sum 1) searched with seeded optuna TPE
to maximise the chosen OOF score of the blend's maps. The best model and the tuned
weights are fitted per fold on the other folds' images and scored on the fold's own
(nested cross-validation); the tuned weights are kept only when they beat the better
simple candidate by more than the paired bootstrap noise. The OOF blend written for the
later stages holds each fold blended with the weights fitted without it; the test blend
uses the weights fitted on all folds.

Scores are computed at the working resolution against the cached working-size masks
(data.cache), after the decision's lens (plain argmax or the region vote). The studies
live in an optuna storage (studies.py: one SQLite file per experiment by default), named
after their inputs and their fit ("all", "fold 0", ...), so a killed or extended search
continues where it stopped; the all-folds study's trials are exported to
`ensemble/trials.csv`.
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("ensemble")


import dataclasses
import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import optuna

from chain import lineage, studies
from chain.decisions import (
    LENSES,
    Option,
    Outcome,
    Rule,
    decide,
    fold_rows,
    format_decision,
)
from chain.postprocessing import PostprocessParams, postprocess
from chain.records import BlendCandidate, BlendRecord, Decision
from chain.studies import Search, StudyPlace, fit_label, search_settings
from core.config import (
    ConfigError,
    provenance,
    reports_environment_errors,
    setup_logging,
)
from core.invocation import command_hint
from core.metrics import scores_from_stats, stats_in_chunks
from core.paths import Layout
from core.settings import ExperimentSettings, layout_of
from data.cache import load_targets
from data.probstore import (
    META_FILE,
    ProbMaps,
    align_stores,
    blend,
    blend_by_fold,
    blend_rows,
    load_probs,
    normalised,
    save_probs,
)
from data.reader import DataError

log = logging.getLogger("ensemble")

# Images blended and scored per step: bounds the float32 temporaries.
_CHUNK = 32

# Part of the study's name: change it with `_trial_score`'s space, so old trials are not mixed in.
SPACE_VERSION = "weights-v2"


def blend_stats(
    arrays: Sequence[np.ndarray],
    targets: np.ndarray,
    weights: Sequence[float],
    n_jobs: int = 1,
    rows: np.ndarray | None = None,
    params: PostprocessParams | None = None,
) -> np.ndarray:
    """Per-image class stats (len(rows), 3, 3) of the blend's maps, plain argmax or after
    `params` (at working size), for `rows` (default all); threads over chunks."""
    w = normalised(weights)
    rows = np.arange(len(targets)) if rows is None else np.asarray(rows)
    size = targets.shape[1:]

    def maps(lo: int, hi: int) -> np.ndarray:
        codes = blend_rows(arrays, w, rows[lo:hi])
        if params is None or not params.active_steps():
            return codes.argmax(axis=1).astype(np.uint8)
        return np.stack([postprocess(p, size, params) for p in codes])

    return stats_in_chunks(maps, targets[rows], _CHUNK, n_jobs)


def _trial_score(
    arrays: Sequence[np.ndarray],
    targets: np.ndarray,
    objective: str,
    n_jobs: int,
    rows: np.ndarray | None,
    params: PostprocessParams | None,
    trial: optuna.Trial,
) -> float:
    """One trial: sampled weights -> score of the blend's maps on `rows` (module level, so
    it pickles by reference into worker processes)."""
    raw = [trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(len(arrays))]
    if sum(raw) <= 0:
        return float("-inf")
    weights = normalised(raw).tolist()
    trial.set_user_attr("weights", weights)
    stats = blend_stats(arrays, targets, weights, n_jobs, rows, params)
    return scores_from_stats(stats)[objective]


class Tuned(NamedTuple):
    """Blend weights found by a search, and the study that found them."""

    weights: list[float]
    study: optuna.Study


def search_weights(
    arrays: Sequence[np.ndarray],
    targets: np.ndarray,
    trials: int,
    objective: str = "competition",
    seed: int = 0,
    n_jobs: int = 1,
    place: StudyPlace | None = None,
    rows: np.ndarray | None = None,
    lens: str = "argmax",
    fit: str = "all",
) -> Tuned:
    """Seeded TPE over blend weights on `rows` (default all); the equal blend is the first
    trial. Maps are scored after the `lens` (decisions.LENSES).

    `place` None: in memory; else the study of these inputs in `place.storage` (one per
    `fit`: "all", "fold 0", ...), continued until it has `trials` complete trials. The
    weights are those of the best of its first `trials` complete trials.
    """
    return _search(arrays, targets, Search(trials, objective, seed, n_jobs), place, rows, lens, fit)


def _search(
    arrays: Sequence[np.ndarray],
    targets: np.ndarray,
    search: Search,
    place: StudyPlace | None,
    rows: np.ndarray | None,
    lens: str,
    fit: str,
) -> Tuned:
    """`search_weights` with the search's settings in one value (`Blending.tuned`)."""
    threads = search.threads(place)
    score = functools.partial(
        _trial_score, arrays, targets, search.objective, threads, rows, LENSES[lens]
    )
    best, study = search.run(
        "ensemble",
        score,
        place,
        inputs=[*arrays, targets],
        settings={"space": SPACE_VERSION, "lens": lens, "fit": fit},
        start=[{f"w{i}": 1.0 for i in range(len(arrays))}],
    )
    return Tuned(best.user_attrs["weights"], study)


def fold_scores(stats: np.ndarray, folds: Sequence[int] | None) -> dict[str, dict[str, float]]:
    """Scores over all images ("all") and per fold ("0", "1", ...)."""
    out = {"all": scores_from_stats(stats)}
    if folds is not None:
        f = np.asarray(folds)
        for k in sorted(set(f.tolist())):
            out[str(k)] = scores_from_stats(stats[f == k])
    return out


def _one_hot(i: int, n: int) -> list[float]:
    return [float(i == j) for j in range(n)]


@dataclass(frozen=True)
class Blending:
    """What the blend decision works on: the models' OOF maps (in `names`' order), their
    targets and shared folds, the search for tuned weights, where its studies live."""

    names: Sequence[str]
    arrays: Sequence[np.ndarray]
    targets: np.ndarray
    folds: Sequence[int]
    search: Search
    place: StudyPlace | None
    rule: Rule

    def stats(self, weights: Sequence[float], rows: np.ndarray | None = None) -> np.ndarray:
        """Per-image stats of the blend's maps on `rows`, after the rule's lens."""
        return blend_stats(
            self.arrays, self.targets, weights, self.search.n_jobs, rows, self.rule.params
        )

    def argmax_scores(self, weights: Sequence[float]) -> dict[str, dict[str, float]]:
        """The blend's plain-argmax scores, over all images and by fold (the `scores`
        table: in sample for fitted weights)."""
        stats = blend_stats(self.arrays, self.targets, weights, self.search.n_jobs)
        return fold_scores(stats, self.folds)

    def tuned(self, k: int | None, rows: np.ndarray) -> Tuned:
        """Weights searched on `rows`: the images outside fold k, or all (k None)."""
        lens = self.rule.lens
        return _search(self.arrays, self.targets, self.search, self.place, rows, lens, fit_label(k))


def blend_options(blending: Blending) -> list[Option[Any]]:
    """Equal weights and the best single model (the simple choices: the model is picked
    per fold on the other folds' images), and tuned weights (one fitted level above)."""
    n = len(blending.names)
    per_model = [blending.stats(_one_hot(i, n)) for i in range(n)]

    def best_model(k: int | None, rows: np.ndarray) -> int:
        values = [scores_from_stats(s[rows])[blending.rule.metric] for s in per_model]
        return int(np.argmax(values))  # ties to the model listed first

    return [
        Option("equal", blending.stats, params=[1.0 / n] * n),
        Option("best single", lambda i, rows: per_model[i][rows], fit=best_model),
        Option(
            "tuned", lambda t, rows: blending.stats(t.weights, rows), fit=blending.tuned, level=1
        ),
    ]


def blend_candidates(outcome: Outcome[Any], names: Sequence[str]) -> dict[str, BlendCandidate]:
    """Each option's all-folds weights and each fold's, as `weights.json` lists them."""
    n = len(names)
    equal, best, tuned = (outcome.judged[k] for k in ("equal", "best single", "tuned"))
    return {
        "equal": BlendCandidate(
            weights=equal.params,
            fold_weights={str(k): w for k, w in equal.fold_params.items()},
        ),
        "best single": BlendCandidate(
            weights=_one_hot(best.params, n),
            fold_weights={str(k): _one_hot(i, n) for k, i in best.fold_params.items()},
            model=names[best.params],
        ),
        "tuned": BlendCandidate(
            weights=list(tuned.params.weights),
            fold_weights={str(k): list(t.weights) for k, t in tuned.fold_params.items()},
        ),
    }


def run_ensemble(
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    targets: np.ndarray,
    folds: Sequence[int],
    trials: int,
    objective: str = "competition",
    *,
    seed: int = 0,
    n_jobs: int = 1,
    place: StudyPlace | None = None,
    trials_csv: Path | None = None,
    rule: Rule | None = None,
) -> BlendRecord:
    """The blend decision: equal weights, the best single model, or tuned weights, made
    by `decisions.decide` (each fitted per fold, then on all folds; the tuned weights kept
    only when they beat the better simple candidate by more than the noise). The record
    holds the chosen weights, every candidate's per-fold weights (the OOF blend uses the
    chosen one's), and the scores; the caller adds the split and provenance. `place`:
    where the studies are kept (None: in memory); `trials_csv`: where the all-folds
    study's trials are exported.
    """
    search = Search(trials, objective, seed, n_jobs)
    blending = Blending(names, arrays, targets, folds, search, place, rule or Rule.default())
    n = len(names)
    # plain argmax by fold, of each model and of the all-folds blends (in-sample)
    scores = {name: blending.argmax_scores(_one_hot(i, n)) for i, name in enumerate(names)}
    if n == 1:
        return BlendRecord(
            models=list(names),
            objective=objective,
            decide=blending.rule.to_dict(),
            weights=[1.0],
            fold_weights={str(k): [1.0] for k, _, _ in fold_rows(folds)},
            chosen="single model",
            trials=0,
            scores=scores,
        )
    outcome = decide(blend_options(blending), folds, blending.rule)
    study = outcome.judged["tuned"].params.study
    if trials_csv is not None:
        studies.export_trials(study, trials_csv)
    candidates = blend_candidates(outcome, names)
    chosen = outcome.record["chosen"]
    scores["equal"] = blending.argmax_scores(candidates["equal"].weights)
    scores["tuned"] = blending.argmax_scores(candidates["tuned"].weights)
    return BlendRecord(
        models=list(names),
        objective=objective,
        decide=blending.rule.to_dict(),
        weights=candidates[chosen].weights,
        fold_weights=candidates[chosen].fold_weights,
        chosen=chosen,
        candidates=candidates,
        decision=Decision.from_dict(outcome.record),
        out_of_sample={
            name: fold_scores(j.candidate.oos, folds) for name, j in outcome.judged.items()
        },
        trials=len(studies.complete_trials(study, trials)),
        study=studies.study_record(study, place, trials_csv),
        scores=scores,
    )


def format_table(record: BlendRecord) -> str:
    metric = record.metric
    rows = record.scores
    cols = list(next(iter(rows.values())))
    head = f"{metric + ', argmax':>24s}"
    lines = [head + "".join(f"{'fold ' + c if c != 'all' else 'all':>10s}" for c in cols)]
    for name, by in rows.items():
        lines.append(f"{name:>24s}" + "".join(f"{by[c][metric]:10.4f}" for c in cols))
    if record.decision:
        lines.append(format_decision("blend", record.decision.to_dict()))
    weights = ", ".join(f"{m}={w:.3f}" for m, w in zip(record.models, record.weights, strict=True))
    lines.append(f"weights ({record.chosen}): {weights}")
    return "\n".join(lines)


def write_blends(
    layout: Layout,
    record: BlendRecord,
    oof: Sequence[ProbMaps],
    folds: Sequence[int],
    cfg: dict[str, Any],
) -> None:
    """ensemble/oof (each fold blended with the weights fitted without it) and
    ensemble/test (the all-folds weights); the test blend needs every model's test store."""
    names, weights = record.models, record.weights
    common = {"model": "ensemble", "models": list(names), "weights": list(weights)}

    def made_from(kind: str) -> dict[str, Any]:
        return {lineage.KEY: lineage.made_from(layout.root, [layout.store(m, kind) for m in names])}

    first = oof[0]
    fold_weights = {int(k): w for k, w in record.fold_weights.items()}
    save_probs(
        layout.blend("oof"),
        first.ids,
        blend_by_fold(oof, fold_weights, folds),
        first.orig_sizes,
        kind="oof",
        split_id=first.split_id,
        folds=list(folds),
        fold_weights=record.fold_weights,
        provenance=provenance(cfg, stage="ensemble", split_id=first.split_id),
        **common,
        **made_from("oof"),
    )
    missing = [m for m in names if not layout.store(m, "test").is_dir()]
    if missing:
        log.warning(
            "no test blend: missing %s (make them with %s)",
            ", ".join(str(layout.store(m, "test")) for m in missing),
            "; ".join(command_hint("predict", "--model", m) for m in missing),
        )
        return
    tests = align_stores([load_probs(layout.store(m, "test")) for m in names])
    save_probs(
        layout.blend("test"),
        tests[0].ids,
        blend(tests, weights),
        tests[0].orig_sizes,
        kind="test",
        split_id=first.split_id,
        folds=tests[0].meta.get("folds"),
        provenance=provenance(cfg, stage="ensemble", split_id=first.split_id),
        **common,
        **made_from("test"),
    )


def check_predicted(names: Sequence[str], layout: Layout) -> None:
    """Every blended model has its OOF maps, or a DataError saying which models lack them
    and the commands that make them (the stage-by-stage path trains one model at a time)."""
    missing = [m for m in names if not (layout.store(m, "oof") / META_FILE).is_file()]
    if not missing:
        return
    present = [m for m in names if m not in missing]
    make = [
        f"{command_hint('train', '--model', m, '--fold', 'all', '--resume')}, then "
        + command_hint("predict", "--model", m)
        for m in missing
    ]
    blend = f"; or blend the predicted ones: {command_hint('ensemble', '--models', *present)}"
    raise DataError(
        f"no out-of-fold maps for {', '.join(missing)} (e.g. {layout.store(missing[0], 'oof')}): "
        f"make them with {'; '.join(make)}" + (blend if present else "")
    )


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("ensemble").parse_args(argv)
    setup_logging()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        cfg = cli.stage_config(args)
        names = args.models or stages.model_names(cfg)
        trials, objective = search_settings(cfg, "ensemble", args.trials, args.objective)
        cli.check_jobs(args.jobs)
        layout = layout_of(cfg)
        check_predicted(names, layout)
        oof = align_stores([load_probs(layout.store(m, "oof")) for m in names])
        rule = Rule.from_config(cfg)
        folds = oof[0].meta.get("folds")
        if not isinstance(folds, list) or len(folds) != len(oof[0]):
            raise DataError(
                f"{oof[0].where}: no per-image folds recorded; predict it again: "
                + command_hint("predict", "--model", names[0])
            )
        targets = load_targets(cfg, oof[0].ids, oof[0].size)
        arrays = [np.asarray(s.raw) for s in oof]
        place = studies.place_from_args(args, layout, store_identity(names, oof))
        csv_path = layout.weights_trials
        record = run_ensemble(
            names,
            arrays,
            targets,
            folds,
            trials,
            objective,
            seed=ExperimentSettings.from_config(cfg).seed,
            n_jobs=args.jobs,
            place=place,
            trials_csv=csv_path,
            rule=rule,
        )
        if record.study is None:  # one model, no search: an old search's trials do not apply
            csv_path.unlink(missing_ok=True)
        split_id = oof[0].split_id
        record = dataclasses.replace(
            record,
            split_id=split_id,
            provenance=provenance(cfg, stage="ensemble", split_id=split_id),
        )
        write_blends(layout, record, oof, folds, cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except studies.StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    record.write(layout.weights)
    print(format_table(record))
    if record.study:
        print(f"optuna study {record.study['name']} in {record.study['storage']}")
    print(f"wrote {layout.weights.parent}")
    return 0


def store_identity(names: Sequence[str], stores: Sequence[ProbMaps]) -> dict[str, Any]:
    """What names the stores' study besides their content: models, split, and meta.json
    (its provenance: a re-predicted store is a new version even with equal maps)."""
    return {
        "models": list(names),
        "split_id": stores[0].split_id,
        "meta": [studies.digest(s.meta) for s in stores],
    }


if __name__ == "__main__":
    # Run as the importable module, so worker processes pickle its functions by reference.
    import ensemble

    sys.exit(ensemble.main())
