"""Training hyper-parameter search: optuna over the config's `hpo.space`, with pruning.

    python hpo.py --config configs/bkai.yaml --model unet --trials 30
    python hpo.py --config configs/bkai.yaml --model unet --trials 30 --epochs 10 --parallel 2

Each trial applies its sampled values to the model's config (through the same strict
merge as a `base:` file, so an unknown key is an error with a did-you-mean before any
training), trains one fold (`hpo.fold`) for `hpo.epochs` (else train.epochs) through
engine.fit, the loop train.py runs, and reports `train.best_metric` after every epoch: the
pruner (`hpo.pruner`, median by default) stops a trial that is behind. The trial's value
is its best validation score.

Trials train in `<exp>/hpo/<study>/trial<n>/` (their config and log, no checkpoint: the
search keeps scores, not weights), on the experiment's split (its folds.json), never in
a fold folder of the experiment. The study lives with the others (studies.py: resumable,
`--parallel`, `--join`, `--storage`), named after the model, fold, space, epochs and the
fold's recipe (recipe.py); `--trials N` counts complete and pruned trials. The best trial
is written as `<exp>/hpo/best_<model>.yaml`, an experiment file whose `base:` is the
searched config, ready for `python pipeline.py --config <exp>/hpo/best_<model>.yaml`.
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("hpo")


import functools
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from chain import studies
from core.config import (
    ConfigError,
    apply_overrides,
    build_entry,
    defaults,
    merge,
    model_entry,
    replaced,
    reports_environment_errors,
    setup_logging,
)
from core.invocation import command_hint
from core.runtime import Dist, configure_cpu_threads, init_dist
from core.settings import DataSettings, ExperimentSettings, HpoSettings, TrainSettings, layout_of
from data.atomic import write_text, write_yaml
from data.foldlog import write_log
from data.loader import LoaderStalled
from data.prepare import prepare_train_data
from data.reader import DataError
from training.engine import FitState, TrainingError, build_learner, build_loaders, fit, log_epoch
from training.recipe import check_config, fold_recipe, recipe_hash

log = logging.getLogger("hpo")

PRUNERS = ("median", "hyperband", "threshold", "none")


# ---------------------------------------------------------------- the search space


def parse_space(space: Any) -> dict[str, BaseDistribution]:
    """`hpo.space` as optuna distributions: `{low, high[, log, step]}` is a float range (an
    int range when low and high are both ints), a list is a categorical choice."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("hpo.space is empty: map config keys to {low, high} or [choices]")
    out: dict[str, BaseDistribution] = {}
    for key, spec in space.items():
        where = f"hpo.space.{key}"
        try:
            if isinstance(spec, list) and spec:
                out[str(key)] = CategoricalDistribution(spec)
            elif isinstance(spec, Mapping) and {"low", "high"} <= set(spec):
                extra = sorted(set(spec) - {"low", "high", "log", "step"})
                if extra:
                    raise ConfigError(
                        f"{where}: unknown {extra}; a range takes low, high, log, step"
                    )
                low, high, log_scale = spec["low"], spec["high"], bool(spec.get("log", False))
                if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
                    step = int(spec.get("step", 1))
                    out[str(key)] = IntDistribution(low, high, log=log_scale, step=step)
                else:
                    # YAML 1.1 reads `1e-4` as a string: the range says it is a number.
                    step = spec.get("step")
                    out[str(key)] = FloatDistribution(
                        float(low),
                        float(high),
                        log=log_scale,
                        step=None if step is None else float(step),
                    )
            else:
                raise ConfigError(
                    f"{where}: expected {{low, high[, log, step]}} or [choices], got {spec!r}"
                )
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # optuna's checks of the bounds
            raise ConfigError(f"{where}: {exc}") from exc
    return out


def trial_config(cfg: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The model's resolved config with `values` merged in as a `base:` file's diff would
    be: strict keys with a did-you-mean, a renamed optimizer or schedule replaced."""
    return merge(cfg, replaced({}, values), "hpo.space", defaults())


def check_space(cfg: dict[str, Any], space: Mapping[str, BaseDistribution]) -> None:
    """Every key exists and every bound or choice gives a config train.py accepts, before
    the first trial rather than in trial 17."""
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            candidates = list(dist.choices)
        else:
            candidates = [dist.low, dist.high]
        for value in candidates:
            # check_config builds the training transforms too (data.augment is open)
            check_config(trial_config(cfg, {key: value}))


def experiment_diff(values: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The diff a best-trial file states over its base. `train.*` values go under
    `models.<model>.train`, as in the trials they win over the model's own recipe there,
    and they were searched for this model only. `ensemble.models` is that model alone:
    `pipeline.py` on the file trains the tuned model, not every model of the base."""
    moved = {(f"models.{model}.{k}" if k.startswith("train.") else k): v for k, v in values.items()}
    return replaced({}, {"ensemble.models": [model], **moved})


# ---------------------------------------------------------------- pruner and identity


def build_pruner(spec: Any, epochs: int) -> optuna.pruners.BasePruner:
    """`hpo.pruner: {name, ...optuna arguments}`; null is the median pruner."""
    spec = dict(spec or {"name": "median"})
    name = str(spec.pop("name", "median"))
    makers = {
        "median": optuna.pruners.MedianPruner,
        # Hyperband's resource is the epoch: a bracket's budget ends at the trial's length.
        "hyperband": functools.partial(
            optuna.pruners.HyperbandPruner, min_resource=1, max_resource=epochs
        ),
        "threshold": optuna.pruners.ThresholdPruner,
        "none": optuna.pruners.NopPruner,
    }
    if name not in makers:
        raise ConfigError(f"hpo.pruner.name {name!r}: choose one of {', '.join(PRUNERS)}")
    try:
        return makers[name](**spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"hpo.pruner ({name}): {exc}") from exc


# ---------------------------------------------------------------- one trial


def suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def run_trial(
    cfg: dict[str, Any],
    model: str,
    fold: int,
    space: Mapping[str, BaseDistribution],
    dist: Dist,
    trial: optuna.Trial,
) -> float:
    """Train one fold with the trial's values; the best `train.best_metric` of its epochs.

    A diverging recipe (TrainingError: non-finite loss) is a result of the search, not a
    failure of it: the trial is pruned with what it reported, so the search goes on and a
    resumed run does not draw the same values again.
    """
    values = {key: suggest(trial, key, d) for key, d in space.items()}
    tcfg = trial_config(cfg, values)
    train = TrainSettings.from_config(tcfg)
    metric, epochs = train.best_metric, train.epochs
    out = layout_of(tcfg).hpo_trial(trial.study.study_name, trial.number)
    out.dir.mkdir(parents=True, exist_ok=True)
    write_yaml(out.config, tcfg)
    configure_cpu_threads(train.cpu_threads)
    # Per trial: a searched data key (e.g. the mask thresholds) may change the cached items.
    data = prepare_train_data(tcfg, dist)
    loaders = build_loaders(tcfg, data, fold, dist)
    learner = build_learner(
        tcfg, build_entry(tcfg, model), fold, dist, steps_per_epoch=len(loaders.train)
    )
    state = FitState()
    name = f"{model} trial {trial.number}"
    try:
        for record in fit(tcfg, learner, loaders, fold, dist, name, state):
            write_log(out.log, state.history)
            log_epoch(name, epochs, record)
            trial.report(record[metric], record["epoch"])
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", record["epoch"])
                raise optuna.TrialPruned(f"{name}: pruned after epoch {record['epoch']}")
    except TrainingError as exc:
        trial.set_user_attr("diverged", str(exc))
        raise optuna.TrialPruned(str(exc)) from exc
    best = max(state.history, key=lambda r: r[metric])
    trial.set_user_attr("best_epoch", best["epoch"])
    trial.set_user_attr(
        "scores", {k: best[k] for k in ("competition", "dice_seg", "dice_neo", "dice_non")}
    )
    return state.best_score


# ---------------------------------------------------------------- the stage


def write_best(
    path: Path, config_path: str, model: str, values: Mapping[str, Any], header: Sequence[str]
) -> None:
    """The best trial as an experiment file: `base:` the searched config (relative to the
    new file, so the pair moves together), then the best values as nested YAML."""
    base = os.path.relpath(Path(config_path).resolve(), path.parent.resolve())
    doc = {"base": base, **experiment_diff(values, model)}
    comments = "".join(f"# {line}\n" for line in header)
    write_text(path, comments + yaml.safe_dump(doc, sort_keys=False))


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("hpo").parse_args(argv)
    setup_logging()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dist = init_dist()
    try:
        cfg = cli.hpo_config(args)
        hp = HpoSettings.from_config(cfg)
        train_epochs = TrainSettings.from_config(cfg).epochs
        epochs = studies.flag_count("epochs", args.epochs, hp.epochs or train_epochs)
        fold = args.fold if args.fold is not None else hp.fold
        trials = studies.flag_count("trials", args.trials, hp.trials)
        cfg = apply_overrides(cfg, [f"train.epochs={epochs}"])
        check_config(cfg)
        model_entry(cfg, args.model)
        n_folds = DataSettings.from_config(cfg).n_folds
        if not 0 <= fold < n_folds:
            raise ConfigError(f"fold {fold} is not in 0..{n_folds - 1}")
        space = parse_space(hp.space)
        check_space(cfg, space)
        pruner = build_pruner(hp.pruner, epochs)
        layout = layout_of(cfg)
        # Creates the experiment's split if it is the first stage to run: trials share it.
        split_id = prepare_train_data(cfg, dist).folds.split_id
        # What shapes a trial's weights is a fold's recipe (recipe.py: model, train, data,
        # seed, split; not paths or speed settings); epochs and space are the settings.
        identity = {
            "model": args.model,
            "fold": fold,
            "recipe": recipe_hash(fold_recipe(cfg, args.model, split_id)),
        }
        place = studies.place_from_args(args, layout, identity)
        study = studies.run_study(
            "hpo",
            functools.partial(run_trial, cfg, args.model, fold, space, dist),
            trials,
            ExperimentSettings.from_config(cfg).seed,
            place,
            settings={"space": hp.space, "epochs": epochs},
            pruner=pruner,
        )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (studies.StudyError, LoaderStalled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    csv_path = studies.export_trials(study, layout.hpo_trials(args.model))
    if not studies.complete_trials(study, trials):
        print(
            f"error: study {study.study_name}: all {trials} trials were pruned, none to "
            f"write (trials in {csv_path})",
            file=sys.stderr,
        )
        return 1
    best = studies.best_trial(study, trials)
    metric = TrainSettings.from_config(cfg).best_metric
    out = layout.hpo_best(args.model)
    header = [
        f"hpo.py: best of {trials} trials of study {study.study_name}",
        f"in {studies.redact(place.storage)}: trial {best.number}, "
        f"{metric} {best.value:.5f} on fold {fold} after {epochs} epochs",
        *([f"the search also had --set {' '.join(args.set)}"] if args.set else []),
        f"train every fold: {command_hint('pipeline', config=out)}",
    ]
    write_best(out, args.config, args.model, best.params, header)
    print(f"best trial {best.number}: {metric} {best.value:.5f}")
    for key, value in best.params.items():
        print(f"  {key}: {value}")
    print(f"wrote {out}; trials in {csv_path}")
    print(f"optuna study {study.study_name} in {studies.redact(place.storage)}")
    return 0


if __name__ == "__main__":
    # Run as the importable module, so worker processes pickle its functions by reference.
    import hpo

    sys.exit(hpo.main())
