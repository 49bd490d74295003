"""Choose post-processing on out-of-fold predictions: optuna search, then ablation.

The search runs on the blended OOF probabilities (`ensemble/oof/`, or `refine/oof/` when
refine.py's refinement was kept: `postprocessing.input_store`) against the ground
truth at the *working* resolution (each map post-processed with orig_size = working
size). At the original 1280×~1000 each trial would process ~10× the pixels (a trial at
352×352 takes a few seconds per 1,000 images, see BENCHMARKS.md); all size-dependent
parameters are fractions of the image (area, shorter side), so they carry over to the
original size where postprocess.py applies them.

The search's study lives in an optuna storage (studies.py: one SQLite file per
experiment by default), named after its inputs, so a killed or extended search continues
where it stopped; every trial is exported to `tune_trials.csv`.

After a seeded TPE search, nnU-Net's rule decides what is kept: starting from the best
trial, each active step is switched off in turn, and it stays only if it improves the
objective AND no class (neoplastic, non-neoplastic) ends up worse than with plain argmax.
So a step is never kept on the strength of noise, or at the expense of one class.
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.exit_if_help("tune")


import functools
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from joblib import effective_n_jobs

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
from data.probstore import load_probs
from data.reader import DataError
from metrics import OBJECTIVES, scores_from_stats, stats_in_chunks
from paths import Layout
from postprocessing import (
    REGION_MODES,
    PostprocessParams,
    input_store,
    postprocess,
)
from studies import StudyPlace, search_settings

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
    probs: np.ndarray, targets: np.ndarray, params: PostprocessParams, n_jobs: int = 1
) -> dict[str, float]:
    """Scores of post-processed (N, 3, H, W) maps against (N, H, W) class maps, same size.

    Images are split into one chunk per thread; OpenCV and numpy release the GIL.
    """
    if probs.shape[0] != targets.shape[0] or probs.shape[2:] != targets.shape[1:]:
        raise ValueError(f"probs {probs.shape} do not match targets {targets.shape}")
    size = targets.shape[1:]
    chunk = math.ceil(len(probs) / (4 * effective_n_jobs(n_jobs)))
    stats = stats_in_chunks(
        lambda lo, hi: np.stack([postprocess(p, size, params) for p in probs[lo:hi]]),
        targets,
        chunk,
        n_jobs,
    )
    return scores_from_stats(stats)


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
    probs: np.ndarray, targets: np.ndarray, objective: str, n_jobs: int, trial: optuna.Trial
) -> float:
    """One trial: sampled parameters -> OOF score (module level, so it pickles by
    reference into worker processes)."""
    params = suggest_params(trial)
    scores = evaluate(probs, targets, params, n_jobs)
    trial.set_user_attr("params", params.to_dict())
    trial.set_user_attr("scores", scores)
    return scores[objective]


def search(
    probs: np.ndarray,
    targets: np.ndarray,
    trials: int,
    objective: str = "competition",
    seed: int = 0,
    n_jobs: int = 1,
    place: StudyPlace | None = None,
) -> tuple[PostprocessParams, optuna.Study]:
    """Seeded TPE over `PostprocessParams`, maximising `objective` on the given set.

    `place` None: in memory; else the study of these inputs in `place.storage`, continued
    until it has `trials` complete trials; the best of its first `trials` is returned.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    n_workers = place.n_workers if place else 1
    score = functools.partial(
        _trial_score, probs, targets, objective, studies.threads_per_worker(n_jobs, n_workers)
    )
    study = studies.run_study(
        "tune",
        score,
        trials,
        seed,
        place,
        inputs=[probs, targets],
        settings={"objective": objective, "space": SPACE_VERSION},
        start=START_TRIALS,
    )
    best = studies.best_trial(study, trials)
    return PostprocessParams.from_dict(best.user_attrs["params"]), study


def ablate(
    probs: np.ndarray,
    targets: np.ndarray,
    params: PostprocessParams,
    objective: str,
    baseline: dict[str, float],
    n_jobs: int = 1,
) -> tuple[PostprocessParams, list[dict[str, Any]]]:
    """nnU-Net's rule: keep a step only if it helps the objective and hurts no class."""
    current, scores = params, evaluate(probs, targets, params, n_jobs)
    record = []
    for step in params.active_steps():
        without = current.without(step)
        scores_without = evaluate(probs, targets, without, n_jobs)
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
        log.info(
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
        log.info("kept steps %s make a class worse than argmax: none kept", current.active_steps())
        record.append({"step": "all", "kept": False, "no_class_worse_than_argmax": False})
        current = PostprocessParams()
    return current, record


def tune(
    probs: np.ndarray,
    targets: np.ndarray,
    trials: int,
    objective: str = "competition",
    seed: int = 0,
    n_jobs: int = 1,
    place: StudyPlace | None = None,
    trials_csv: Path | None = None,
) -> dict[str, Any]:
    """Search + ablation; returns the `postprocess.json` document (without provenance).

    `place`: where the study is kept (None: in memory); `trials_csv`: where its trials
    are exported.
    """
    baseline = evaluate(probs, targets, PostprocessParams(), n_jobs)
    best, study = search(probs, targets, trials, objective, seed, n_jobs, place)
    if trials_csv is not None:
        studies.export_trials(study, trials_csv)
    final, ablation = ablate(probs, targets, best, objective, baseline, n_jobs)
    after = evaluate(probs, targets, final, n_jobs)
    return {
        "params": final.to_dict(),
        "objective": objective,
        "scores": {
            "argmax": baseline,
            "best_trial": studies.best_trial(study, trials).user_attrs["scores"],
            "tuned": after,
        },
        "searched_params": best.to_dict(),
        "ablation": ablation,
        "trials": len(studies.complete_trials(study, trials)),
        "study": studies.study_record(study, place, trials_csv),
        "n_images": len(probs),
        "resolution": list(targets.shape[1:]),
        "seed": seed,
    }


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = cli.tune_parser().parse_args(argv)
    setup_logging()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        cfg = resolve_cli_config(args)
        trials, objective = search_settings(cfg, "tune", args.trials, args.objective)
        layout = Layout.of(cfg)
        path, why = input_store(cfg, "oof")
        source = path.relative_to(layout.root).as_posix()
        log.info("tuning on %s: %s", source, why)
        store = load_probs(path)
        targets = load_targets(cfg, store.ids, store.size)
        identity = {
            "source": source,
            "split_id": store.split_id,
            "meta": studies.digest(store.meta),
        }
        doc = tune(
            np.asarray(store.raw),
            targets,
            trials,
            objective,
            int(cfg.get("seed", 0)),
            args.jobs,
            studies.place_from_args(args, layout, identity),
            layout.postprocess_trials,
        )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except studies.StudyIncomplete as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    doc["source"] = source
    doc["provenance"] = provenance(
        cfg, stage="tune", source=str(store.path), split_id=store.split_id
    )
    out = layout.postprocess
    write_json(out, doc)
    keys = [objective, *class_keys(objective)]
    print(f"{'':10s}" + "".join(f"{k:>18s}" for k in keys))
    for name in ("argmax", "tuned"):
        print(f"{name:10s}" + "".join(f"{doc['scores'][name][k]:18.5f}" for k in keys))
    kept = ", ".join(PostprocessParams.from_dict(doc["params"]).active_steps()) or "none"
    print(f"kept steps: {kept}; wrote {out}")
    print(f"optuna study {doc['study']['name']} in {doc['study']['storage']}")
    return 0


if __name__ == "__main__":
    # Run as the importable module, so worker processes pickle its functions by reference.
    import tune

    sys.exit(tune.main())
