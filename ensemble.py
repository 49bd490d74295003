"""Blend the models' probability maps with weights tuned on their out-of-fold predictions.

OOF stores are only comparable when they come from the same fold split and cover the same
images; anything else is refused, because a blend of predictions made on different splits
leaks validation images into training and its OOF score means nothing.

Weights (one per model, normalised to sum 1) are searched with seeded optuna TPE,
maximising the chosen OOF score of the argmax of the blend. The score is computed at the
working resolution against the cached working-size masks (data.cache), which ranks blends
the same way as the original size does at a fraction of the cost. The study lives in an
optuna storage (studies.py: one SQLite file per experiment by default), named after its
inputs, so a killed or extended search continues where it stopped; every trial is
exported to `ensemble/trials.csv`. Tuned weights are
reported against equal weights per fold: when they win on only one fold, the gain is
probably noise, and the table says so.
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.exit_if_help("ensemble")


import functools
import itertools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna

import studies
from config import (
    ConfigError,
    provenance,
    reports_environment_errors,
    resolve_cli_config,
    setup_logging,
)
from data.atomic import write_json
from data.cache import load_targets
from data.probstore import ProbMaps, check_compatible, load_probs, save_probs
from data.reader import DataError
from metrics import OBJECTIVES, scores_from_stats, stats_in_chunks
from paths import Layout
from studies import StudyPlace, search_settings

log = logging.getLogger("ensemble")

# Images blended per step: bounds the float32 temporaries.
_CHUNK = 32

# Part of the study's name: change it with `_trial_score`'s space, so old trials are not mixed in.
SPACE_VERSION = "weights-v1"


def align_stores(stores: Sequence[ProbMaps]) -> list[ProbMaps]:
    """The stores in the first one's image order; DataError if they cannot be blended."""
    check_compatible(stores, "blended")
    first = stores[0]
    for s in stores[1:]:
        if set(s.ids) != set(first.ids):
            only = sorted(set(s.ids) ^ set(first.ids))
            raise DataError(
                f"{s.where} and {first.where} hold different images "
                f"({len(only)} in only one of them, e.g. {only[0]})"
            )
    return [first] + [s if s.ids == first.ids else s.subset(first.ids) for s in stores[1:]]


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(w)}")
    return w / w.sum()


def _blend_chunk(arrays: Sequence[np.ndarray], w: np.ndarray, lo: int, hi: int) -> np.ndarray:
    out = np.zeros((hi - lo, *arrays[0].shape[1:]), np.float32)
    for a, wi in zip(arrays, w, strict=True):
        if wi > 0:
            out += np.float32(wi) * a[lo:hi]
    return out


def _chunks(n: int) -> list[tuple[int, int]]:
    return list(itertools.pairwise([*range(0, n, _CHUNK), n]))


def blend(stores: Sequence[ProbMaps | np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of uint8 probability maps (stores or raw arrays), as uint8 codes."""
    arrays = [s.raw if isinstance(s, ProbMaps) else s for s in stores]
    w = _normalised(weights)
    out = np.empty(arrays[0].shape, np.uint8)
    for lo, hi in _chunks(len(out)):
        out[lo:hi] = np.rint(_blend_chunk(arrays, w, lo, hi)).clip(0, 255).astype(np.uint8)
    return out


def blend_stats(
    arrays: Sequence[np.ndarray], targets: np.ndarray, weights: Sequence[float], n_jobs: int = 1
) -> np.ndarray:
    """Per-image class stats (N, 3, 3) of the argmax of the blend, threads over chunks."""
    w = _normalised(weights)
    return stats_in_chunks(
        lambda lo, hi: _blend_chunk(arrays, w, lo, hi).argmax(axis=1), targets, _CHUNK, n_jobs
    )


def _trial_score(
    arrays: Sequence[np.ndarray],
    targets: np.ndarray,
    objective: str,
    n_jobs: int,
    trial: optuna.Trial,
) -> float:
    """One trial: sampled weights -> OOF score of the blend's argmax (module level, so it
    pickles by reference into worker processes)."""
    raw = [trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(len(arrays))]
    if sum(raw) <= 0:
        return float("-inf")
    weights = _normalised(raw).tolist()
    trial.set_user_attr("weights", weights)
    return scores_from_stats(blend_stats(arrays, targets, weights, n_jobs))[objective]


def search_weights(
    arrays: Sequence[np.ndarray],
    targets: np.ndarray,
    trials: int,
    objective: str = "competition",
    seed: int = 0,
    n_jobs: int = 1,
    place: StudyPlace | None = None,
) -> tuple[list[float], optuna.Study]:
    """Seeded TPE over blend weights; the equal-weight blend is the first trial.

    `place` None: in memory; else the study of these inputs in `place.storage`, continued
    until it has `trials` complete trials. The weights are those of the best of its first
    `trials` complete trials.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    n_workers = place.n_workers if place else 1
    score = functools.partial(
        _trial_score, arrays, targets, objective, studies.threads_per_worker(n_jobs, n_workers)
    )
    study = studies.run_study(
        "ensemble",
        score,
        trials,
        seed,
        place,
        inputs=[*arrays, targets],
        settings={"objective": objective, "space": SPACE_VERSION},
        start=[{f"w{i}": 1.0 for i in range(len(arrays))}],
    )
    return studies.best_trial(study, trials).user_attrs["weights"], study


def fold_scores(stats: np.ndarray, folds: Sequence[int] | None) -> dict[str, dict[str, float]]:
    """Scores over all images ("all") and per fold ("0", "1", ...)."""
    out = {"all": scores_from_stats(stats)}
    if folds is not None:
        f = np.asarray(folds)
        for k in sorted(set(f.tolist())):
            out[str(k)] = scores_from_stats(stats[f == k])
    return out


def run_ensemble(
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    targets: np.ndarray,
    folds: Sequence[int] | None,
    trials: int,
    objective: str = "competition",
    seed: int = 0,
    n_jobs: int = 1,
    place: StudyPlace | None = None,
    trials_csv: Path | None = None,
) -> dict[str, Any]:
    """Scores of each model, the equal blend and the tuned blend; the weights to use.

    `place`: where the study is kept (None: in memory); `trials_csv`: where its trials
    are exported.
    """
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for i, name in enumerate(names):
        one_hot = [float(i == j) for j in range(len(names))]
        rows[name] = fold_scores(blend_stats(arrays, targets, one_hot, n_jobs), folds)
    doc: dict[str, Any] = {"models": list(names), "objective": objective}
    if len(names) == 1:
        doc.update(weights=[1.0], trials=0, scores=rows, study=None)
        return doc
    equal = [1.0 / len(names)] * len(names)
    rows["equal"] = fold_scores(blend_stats(arrays, targets, equal, n_jobs), folds)
    weights, study = search_weights(arrays, targets, trials, objective, seed, n_jobs, place)
    if trials_csv is not None:
        studies.export_trials(study, trials_csv)
    rows["tuned"] = fold_scores(blend_stats(arrays, targets, weights, n_jobs), folds)
    fold_keys = [k for k in rows["tuned"] if k != "all"]
    wins = sum(rows["tuned"][k][objective] > rows["equal"][k][objective] for k in fold_keys)
    doc.update(
        weights=weights,
        trials=len(studies.complete_trials(study, trials)),
        study=studies.study_record(study, place, trials_csv),
        scores=rows,
        tuned_beats_equal_on_folds=wins,
        n_folds=len(fold_keys),
        # a gain overall that only one fold supports is most likely fitted noise
        unstable=rows["tuned"]["all"][objective] > rows["equal"]["all"][objective]
        and wins <= 1 < len(fold_keys),
    )
    return doc


def format_table(doc: dict[str, Any]) -> str:
    objective = doc["objective"]
    rows = doc["scores"]
    cols = list(next(iter(rows.values())))
    lines = [
        f"{objective:>16s}" + "".join(f"{'fold ' + c if c != 'all' else 'all':>10s}" for c in cols)
    ]
    for name, by in rows.items():
        lines.append(f"{name:>16s}" + "".join(f"{by[c][objective]:10.4f}" for c in cols))
    weights = ", ".join(f"{m}={w:.3f}" for m, w in zip(doc["models"], doc["weights"], strict=True))
    lines.append(f"weights: {weights}")
    if doc.get("unstable"):
        lines.append(
            f"WARNING: tuned weights beat equal weights on only {doc['tuned_beats_equal_on_folds']}"
            f" of {doc['n_folds']} folds; the gain is probably noise (consider equal weights)"
        )
    return "\n".join(lines)


def write_blends(
    layout: Layout,
    names: Sequence[str],
    weights: Sequence[float],
    oof: Sequence[ProbMaps],
    cfg: dict,
) -> None:
    """ensemble/oof and ensemble/test stores; the test blend needs every model's test store."""
    common = {"model": "ensemble", "models": list(names), "weights": list(weights)}
    first = oof[0]
    save_probs(
        layout.blend("oof"),
        first.ids,
        blend(oof, weights),
        first.orig_sizes,
        kind="oof",
        split_id=first.split_id,
        folds=first.meta.get("folds"),
        provenance=provenance(cfg, stage="ensemble", split_id=first.split_id),
        **common,
    )
    missing = [layout.store(m, "test") for m in names if not layout.store(m, "test").is_dir()]
    if missing:
        log.warning("no test blend: missing %s (run predict.py)", ", ".join(map(str, missing)))
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
    )


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = cli.ensemble_parser().parse_args(argv)
    setup_logging()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        cfg = resolve_cli_config(args)
        ecfg = cfg.get("ensemble") or {}
        names = args.models or ecfg.get("models") or sorted(cfg.get("models") or {})
        if not names:
            raise ConfigError("no models to blend: give --models or set ensemble.models")
        trials, objective = search_settings(cfg, "ensemble", args.trials, args.objective)
        layout = Layout.of(cfg)
        oof = align_stores([load_probs(layout.store(m, "oof")) for m in names])
        targets = load_targets(cfg, oof[0].ids, oof[0].size)
        arrays = [np.asarray(s.raw) for s in oof]
        place = studies.place_from_args(args, layout, store_identity(names, oof))
        csv_path = layout.weights_trials
        doc = run_ensemble(
            names,
            arrays,
            targets,
            oof[0].meta.get("folds"),
            trials,
            objective,
            int(cfg.get("seed", 0)),
            args.jobs,
            place,
            csv_path,
        )
        if doc["study"] is None:  # one model, no search: an old search's trials do not apply
            csv_path.unlink(missing_ok=True)
        doc["split_id"] = oof[0].split_id
        doc["provenance"] = provenance(cfg, stage="ensemble", split_id=oof[0].split_id)
        write_blends(layout, names, doc["weights"], oof, cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except studies.StudyIncomplete as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_json(layout.weights, doc)
    print(format_table(doc))
    if doc["study"]:
        print(f"optuna study {doc['study']['name']} in {doc['study']['storage']}")
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
