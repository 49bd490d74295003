"""Run every stage for every model and fold of a config, like `make`: only what is stale.

train.py skips complete folds itself; a later stage runs only when the bytes of one of its
inputs changed since it last ran (a retrained fold, a new blend, a replaced or added test
image: stamps.py, never file times), an output is missing, or the settings it recorded
differ from the config's (TTA, blended models, optuna trials and objective, refinement
settings). So a killed pipeline simply continues where it stopped, and a second call does
no training. The stages are called in-process through their own `main`, so each
validates its input exactly as on the command line.

Each stage that runs first says why, in one console line: the setting that changed (old ->
new), or the inputs whose bytes changed, by name, or the earlier stage's cause that rewrote
them; the final table lists the others as reused. Everything the stages log and print goes
to `<exp>/logs/pipeline.log` (and with `-v` to the console too), so a run's console fits a
screen.

The stages after training are the table of `stages.py`, in order; the last, `report.py`,
scores what was made (out of fold always, on the test set when the data folder has a
`test_gt/`) and writes `report.html`.
"""

from __future__ import annotations

from workflow import stages

if __name__ == "__main__":
    stages.preflight("pipeline")


import contextlib
import io
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

import train
from chain import studies
from chain.evaluation import (
    format_rows,
    read_json,
)
from chain.stamps import Inputs, Stamps
from core import invocation, locks, ticker
from core.config import (
    LOG_FORMAT,
    ConfigError,
    config_argv,
    reports_environment_errors,
    setup_logging,
)
from core.paths import Layout
from core.runtime import PARENT_ENV, Dist
from core.settings import (
    DataSettings,
    ExperimentSettings,
    PredictSettings,
    TrainSettings,
    layout_of,
)
from data.atomic import write_json, write_yaml
from data.prepare import prepare_train_data
from data.reader import DataError
from models import inference
from models.registry import check_model
from training.engine import judge_fold
from training.recipe import (
    RetryPolicy,
    check_config,
    check_recipes_early,
    flatten,
    recipe_changes,
)
from workflow import launchers, planning, progress
from workflow.stages import Plan, Stage

log = logging.getLogger("pipeline")


class StageFailed(RuntimeError):
    """A stage's `main` returned non-zero; its own message has been printed already."""


def made_otherwise(stage: Stage, plan: Plan, model: str) -> list[str]:
    """`key: old -> new` for each setting the stage's JSON artefact records otherwise than
    the config asks now, by the config key the user sets (`predict.tta`, `refine.epochs`).

    The inputs' digests (stamps.py) cannot see a changed `predict.tta` or `tune.trials`;
    the artefacts record those settings, so a config change reruns the stage that
    depends on it. None and `{}` mean the default, as an absent key does (recipe.flatten).
    """
    if stage.record is None:
        return []
    path, settings = stage.record(plan, model)
    if not path.is_file():  # an output missing: the stage runs for that
        return []
    doc = read_json(path)
    shown = {k: stage.shown.get(k, f"{stage.name}.{k}") for k in settings}
    return recipe_changes(
        flatten({shown[k]: doc.get(k) for k in settings}),
        flatten({shown[k]: v for k, v in settings.items()}),
    )


def stage_label(stage: Stage, model: str) -> str:
    """The stage's name in stamps.json and timings.json: `predict unet`, `ensemble`."""
    return f"{stage.name} {model}".strip()


def listing(names: Sequence[str], most: int = 3) -> str:
    """`a`, `a, b and c`, or `a, b, c and 4 more`: names for one line."""
    if len(names) == 1:
        return names[0]
    if len(names) <= most:
        return f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{', '.join(names[:most])} and {len(names) - most} more"


# Why a stage runs: (the words of its line, the cause its outputs pass on to the stages that
# read them). A changed input made by a stage that ran in this call passes on that stage's
# cause, so a changed TTA is named by every stage it reruns, not only by predict.
Why = list[tuple[str, str]]


def changed_inputs(changes: dict[str, str], causes: dict[str, str]) -> Why:
    """The words for `changes` (Stamps.changes): inputs grouped by what they are ("a, b
    changed", "test/x.jpeg new"), and those an earlier stage of this call rewrote by that
    stage's cause ("predict.tta: ... (through unet/oof, unet/test)")."""
    by_state: dict[str, list[str]] = {}
    by_cause: dict[str, list[str]] = {}
    for name, state in changes.items():
        if name in causes and state != "gone":
            by_cause.setdefault(causes[name], []).append(name)
        else:
            by_state.setdefault(state, []).append(name)
    why = [
        (f"{listing(names)} {state}", f"{listing(names)} {state}")
        for state, names in by_state.items()
    ]
    said = {text for text, _ in why}
    why += [
        (f"{cause} (through {listing(names)})", cause)
        for cause, names in by_cause.items()
        if cause not in said
    ]
    return why


def stage_due(
    stage: Stage,
    plan: Plan,
    model: str,
    stamps: Stamps,
    causes: dict[str, str] | None = None,
    read: dict[Path, str] | None = None,
) -> tuple[Inputs | None, Why]:
    """(the digests of the stage's inputs for `model`, None when one is missing; why the
    stage must run, empty when it need not): an output missing, inputs other than it last
    ran on (named: `changed_inputs`, with `causes` {input name: cause} of the stages run
    before it in this call), or settings recorded other than the config's (named). A stage
    without inputs and outputs always runs. `read`: as `stamps.Inputs.of`."""
    if stage.outputs is None or stage.inputs is None:
        return None, [("it runs on every call", "")]
    named = plan.named(stage.inputs(plan, model))
    absent = [name for name, path in named.items() if not path.exists()]
    if absent:  # the stage runs and names it in its own words
        return None, [(f"{listing(absent)} missing", "")]
    inputs = Inputs.of(named, read)
    outputs = plan.named(stage.outputs(plan, model))
    missing = [name for name, path in outputs.items() if not path.exists()]
    changes = stamps.changes(stage_label(stage, model), inputs)
    if missing:
        first = changes is None and len(missing) == len(outputs)
        text = "first run" if first else f"{listing(missing)} missing"
        return inputs, [(text, text)]
    if changes is None:
        text = f"no record of the inputs it last ran on ({plan.layout.stamps.name})"
        why = [(text, text)]
    else:
        why = changed_inputs(changes, causes or {})
    return inputs, why + [(s, s) for s in made_otherwise(stage, plan, model)]


class Progress(logging.Filter):
    """The console at default verbosity: warnings, errors and progress lines (records
    with `ticker.PROGRESS`: the loops' progress, the line a stage says why it runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or bool(getattr(record, "progress", False))


class Tee(io.TextIOBase):
    """A text stream that writes to several: the console and the log file under -v."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def stage_output(path: Path, verbose: bool, argv: Sequence[str] | None) -> Iterator[None]:
    """While the stages run, everything they log or print also goes to `path` (appended, a
    call after another); the console keeps one line per stage, warnings, errors and
    progress lines (`Progress`), and with `verbose` everything.

    The stages' tables, per-epoch and per-trial lines made 170 console lines of a
    20-second tiny run, the decisions among them three times over. The console is the
    root logger's own stream handler (setup_logging), or one added for the run when the
    caller has none of its own kind (a test, a notebook with other handlers)."""
    root = logging.getLogger()
    consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]
    added = [] if consoles else [logging.StreamHandler()]
    level = root.level
    quiet = Progress()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", buffering=1) as log_file:
        to_file = logging.StreamHandler(log_file)
        for handler in [to_file, *added]:
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            root.addHandler(handler)
        if not verbose:
            for handler in [*consoles, *added]:
                handler.addFilter(quiet)
        root.setLevel(min(level, logging.INFO))  # the stages' INFO lines reach the file
        command = shlex.join(sys.argv[1:] if argv is None else argv)
        log.info("pipeline.py %s", command)
        try:
            with contextlib.redirect_stdout(Tee(sys.stdout, log_file) if verbose else log_file):
                yield
        finally:
            root.setLevel(level)
            for handler in [to_file, *added]:
                root.removeHandler(handler)
            for handler in consoles:
                handler.removeFilter(quiet)


def run_stage(name: str, main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> float:
    """Call a stage's `main`; returns its wall time. Raises StageFailed on a non-zero exit."""
    log.info("stage %s: %s", name, " ".join(argv))
    start = time.perf_counter()
    code = main(list(argv))
    if code != 0:
        raise StageFailed(f"stage {name} failed with exit code {code}")
    return time.perf_counter() - start


def visible_gpus(count: int) -> list[str]:
    """The ids to give a child's CUDA_VISIBLE_DEVICES: the parent's own list when it has
    one (`CUDA_VISIBLE_DEVICES=2,3 python pipeline.py` uses GPUs 2 and 3), else 0..count-1."""
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def start_fold(
    model: str, fold: int, common: Sequence[str], logs: Path, gpu: str | None
) -> tuple[subprocess.Popen, Any]:
    """A `train.py --resume` process of one fold, writing to its log file in `logs`, on
    `gpu` (a CUDA_VISIBLE_DEVICES id) when given; the process and the open log file."""
    # its hints and interrupt line name this pipeline's command, which the user typed
    env = {**os.environ, PARENT_ENV: str(os.getpid()), **invocation.child_env()}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log_file = (logs / f"train_{model}_fold{fold}.log").open("w")
    cmd = [sys.executable, str(Path(train.__file__).resolve()), "--model", model]
    cmd += ["--fold", str(fold), "--resume", *common]
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env), log_file


def train_in_parallel(
    cfg: dict[str, Any],
    common: Sequence[str],
    jobs: Sequence[tuple[str, int]],
    parallel: int,
    recipes: dict[str, TrainSettings],
) -> float:
    """Every (model, fold) of `jobs` as its own `train.py` process, up to `parallel` at once.

    Folds are independent and seeded by (seed, fold), so the result is the sequential
    one. With several GPUs each process is pinned to the GPU running the fewest folds at
    its start (nnU-Net's way of using several GPUs for cross-validation), so a GPU whose
    fold ended gets the next one; on one GPU they share it; on the CPU each process
    computes on `train.cpu_threads` (one by default, as a sequential run does: runtime.py).
    Each fold's full log goes to `<exp>/logs/`; the console gets a line when a fold
    starts or ends, and a progress line (progress.py, from each model's `recipes`) at
    least every PROGRESS_S seconds.
    """
    import torch

    layout = layout_of(cfg)
    logs = layout.logs
    logs.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus(torch.cuda.device_count())
    folds_on = dict.fromkeys(gpus, 0)
    jobs = list(jobs)
    finished: list[tuple[str, int]] = []
    total, trained = len(jobs), 0
    told = time.monotonic()
    running: list[tuple[str, int, subprocess.Popen, Any, str | None]] = []
    failed: list[str] = []
    start = time.perf_counter()
    try:
        while jobs or running:
            while jobs and len(running) < parallel:
                model, fold = jobs.pop(0)
                gpu = None
                if len(gpus) > 1:
                    gpu = min(gpus, key=lambda g: (folds_on[g], gpus.index(g)))
                    folds_on[gpu] += 1
                proc, log_file = start_fold(model, fold, common, logs, gpu)
                running.append((model, fold, proc, log_file, gpu))
                on = f" on GPU {gpu}" if gpu is not None else ""
                log.info("train %s fold %d: started%s (log %s)", model, fold, on, log_file.name)
            time.sleep(0.2)
            for entry in [r for r in running if r[2].poll() is not None]:
                model, fold, proc, log_file, gpu = entry
                running.remove(entry)
                if gpu is not None:
                    folds_on[gpu] -= 1
                log_file.close()
                tail = Path(log_file.name).read_text().strip().splitlines()[-1:] or [""]
                if proc.returncode:
                    failed.append(f"{model} fold {fold} (exit {proc.returncode}, {log_file.name})")
                    log.error("train %s fold %d failed: %s", model, fold, tail[0])
                else:
                    log.info("train %s", tail[0])
                    trained += 1
                    invocation.finished(f"{trained} of {total} folds trained")
                finished.append((model, fold))
            if time.monotonic() - told >= ticker.PROGRESS_S:
                folds = [(m, k) for m, k, *_ in running]
                line = progress.training_line(layout, recipes, folds, jobs, finished, parallel)
                log.info("%s", line)
                told = time.monotonic()
    finally:
        # an interrupt (Ctrl-C, an error here) ends the children too; SIGKILL: end_with_parent
        for _, _, proc, log_file, _ in running:
            proc.terminate()
            proc.wait()
            log_file.close()
    if failed:
        raise StageFailed("training failed: " + "; ".join(failed))
    return time.perf_counter() - start


def train_folds(
    cfg: dict[str, Any],
    common: Sequence[str],
    jobs: Sequence[tuple[str, int]],
    parallel: int,
    launcher: str,
    recipes: dict[str, TrainSettings],
) -> float:
    """Each (model, fold) of `jobs` in a process of its own: `parallel` local ones at a
    time, or SLURM jobs (launchers.py); the seconds it took. `recipes`: each model's
    training settings, for the progress lines. StageFailed names the failed ones. The
    split must exist (`train_models` makes it), or the processes race to write it."""
    if launcher == "local":
        return train_in_parallel(cfg, common, jobs, parallel, recipes)
    seconds, failed = launchers.train_on_slurm(cfg, common, jobs, recipes)
    if failed:
        raise StageFailed("training failed: " + "; ".join(failed))
    return seconds


def print_plan(
    cfg: dict[str, Any],
    model_cfgs: dict[str, dict[str, Any]],
    parallel: int,
    budget_h: float | None,
) -> list[str]:
    """Print what is left of the run (planning.py), and why it does not fit the budget if it
    does not. A model's predictions count as done when this call's run would not predict
    it again (`stage_due`), so a run continued in a new session is planned for what is left."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    views = inference.tta_views(PredictSettings.from_config(cfg).tta)
    layout = layout_of(cfg)
    predict = next(stage for stage in stages.STAGES if stage.name == "predict")
    stages_plan = Plan(cfg, layout, list(model_cfgs), [], [])
    stamps = Stamps(layout.stamps)
    predicted = [m for m in model_cfgs if not stage_due(predict, stages_plan, m, stamps)[1]]
    plan = planning.plan_run(cfg, model_cfgs, views, parallel, device, predicted)
    print("\n".join(planning.report(plan)))
    return planning.over_budget(plan, budget_h)


def preflight(cfg: dict[str, Any], model_cfgs: dict[str, dict[str, Any]]) -> None:
    """Everything that can be checked before training, in one pass, so that a typo in a
    later stage's settings or an unreadable test image fails in seconds, not after every
    fold: each model's recipe (`model_cfgs`: its config as train.py resolves it), then
    each stage's own `check`, in table order.
    """
    for model_cfg in model_cfgs.values():
        check_config(model_cfg)
    for stage in stages.STAGES:
        if stage.check is not None:
            stage.check(cfg)


def fold_reasons(folds: dict[int, tuple[int, str]]) -> str:
    """`folds 0 and 1: not trained yet; fold 2: continued from epoch 3 to 5`: the folds of
    `planning.folds_to_train`, grouped by why."""
    by_why: dict[str, list[str]] = {}
    for k, (_, why) in folds.items():
        by_why.setdefault(why, []).append(str(k))
    return "; ".join(
        f"fold{'s' if len(ks) > 1 else ''} {listing(ks)}: {why}" for why, ks in by_why.items()
    )


def training_ticker(
    layout: Layout, model: str, recipe: TrainSettings, folds: Sequence[int]
) -> ticker.Ticker:
    """Progress lines of a model's folds trained in this process, read from their logs, as
    a parallel run's are: its epochs' own lines go to the log file."""
    runs = [layout.fold(model, k) for k in folds]

    def epochs() -> int:
        return sum(
            progress.FoldProgress.read(model, run, recipe.epochs, recipe.best_metric).done
            for run in runs
        )

    return ticker.Ticker(f"train {model}", recipe.epochs * len(runs), "epochs", epochs, logger=log)


def train_models(
    cfg: dict[str, Any],
    model_cfgs: dict[str, dict[str, Any]],
    common: Sequence[str],
    parallel: int,
    launcher: str,
) -> dict[str, float | None]:
    """Train what is left of every model's folds: here one model after the other, or each
    fold in a process of its own (`train_folds`); {stage label: seconds, None when no fold
    trained}. Each model with folds to train says which and why first (one line)."""
    import torch

    layout = layout_of(cfg)
    names = list(model_cfgs)
    n_folds = DataSettings.from_config(cfg).n_folds
    # The split is made once, before any fold starts, so no two processes race to write it.
    data = prepare_train_data(cfg, Dist(rank=0, world_size=1, device=torch.device("cpu")))
    due = {m: planning.folds_to_train(c, m, data) for m, c in model_cfgs.items()}

    def say_why(models: Sequence[str]) -> None:
        for model in models:
            if due[model]:
                why = fold_reasons(due[model])
                log.info("train %s: running (%s)", model, why, extra=ticker.PROGRESS)

    logs = {(m, k): layout.fold(m, k).log for m in names for k in range(n_folds)}
    before = {job: path.read_bytes() if path.is_file() else None for job, path in logs.items()}

    def trained(models: Sequence[str]) -> bool:
        """Whether a fold of `models` trained in this call: its log is another now."""
        now = {job: path.read_bytes() if path.is_file() else None for job, path in logs.items()}
        return any(now[job] != before[job] for job in logs if job[0] in models)

    recipes = {m: TrainSettings.from_config(c) for m, c in model_cfgs.items()}
    ran: dict[str, float | None] = {}
    if parallel > 1 or launcher != "local":
        label = "train (parallel)" if launcher == "local" else f"train ({launcher})"
        jobs = [(m, k) for m in names for k in due[m]]
        say_why(names)
        seconds = train_folds(cfg, common, jobs, parallel, launcher, recipes) if jobs else 0.0
        ran[label] = seconds if trained(names) else None
        # A fold is judged against its model's other folds, which finish in other
        # processes: judge them all now, and retrain the failed ones (train.py applies the
        # retry policy and stops when its attempts are spent).
        for _ in range(RetryPolicy.from_config(cfg).attempts):
            verdicts = {(m, k): judge_fold(model_cfgs[m], m, k) for m, k in logs}
            failed = [job for job, verdict in verdicts.items() if verdict and verdict.retrain]
            if not failed:
                break
            log.warning("failed folds to retrain: %s", ", ".join(f"{m} {k}" for m, k in failed))
            seconds = train_folds(cfg, common, failed, parallel, launcher, recipes)
            ran["train (retrain)"] = (ran.get("train (retrain)") or 0.0) + seconds
        return ran
    for name in names:
        argv = ["--model", name, "--fold", "all", "--resume", *common]
        say_why([name])
        folds = list(due[name])
        with (
            training_ticker(layout, name, recipes[name], folds)
            if folds
            else contextlib.nullcontext()
        ):
            seconds = run_stage("train", train.main, argv)
        ran[f"train {name}"] = seconds if trained([name]) else None
    return ran


def write_config(layout: Layout, cfg: dict[str, Any]) -> list[str]:
    """Write the resolved config beside the report; `key: old -> new` for each setting
    that differs from the one written by the last call (none when there was none)."""
    old = None
    with contextlib.suppress(OSError, yaml.YAMLError):
        old = yaml.safe_load(layout.config.read_text())
    write_yaml(layout.config, cfg)
    if not isinstance(old, dict):
        return []
    return recipe_changes(flatten(old), flatten(yaml.safe_load(layout.config.read_text())))


def run_stages(
    cfg: dict[str, Any],
    model_cfgs: dict[str, dict[str, Any]],
    common: Sequence[str],
    parallel: int = 1,
    search: Sequence[str] = (),
    launcher: str = "local",
) -> dict[str, float | None]:
    """Every stale stage, in order (after `preflight`); returns the seconds of each stage,
    None for one reused as it was.

    `model_cfgs`: each model's config as train.py resolves it. `search`: extra flags of
    the optuna stages (ensemble, tune), e.g. `--storage URL`. Each stage that runs first
    says why (one line: `stage_due`); its time goes to timings.json as it ends, for the
    report.
    """
    layout = layout_of(cfg)
    names = list(model_cfgs)
    n_folds = DataSettings.from_config(cfg).n_folds

    def keep(times: dict[str, float | None]) -> None:
        # A stage reused in this call keeps the time it took when it ran.
        previous = read_json(layout.timings) if layout.timings.is_file() else {}
        ran = {k: round(v, 1) for k, v in times.items() if v is not None}
        write_json(layout.timings, {**previous, **ran})

    for name, model_cfg in model_cfgs.items():
        check_recipes_early(model_cfg, name, range(n_folds))
    timings = train_models(cfg, model_cfgs, common, parallel, launcher)
    keep(timings)
    settings = write_config(layout, cfg)
    stamps = Stamps(layout.stamps)
    plan = Plan(cfg, layout, names, list(common), list(search))
    # {input name: why it changed in this call}, for the stages that read it (changed_inputs)
    causes = dict.fromkeys(plan.named([layout.config]), "; ".join(settings)) if settings else {}
    read: dict[Path, str] = {}
    for stage in stages.STAGES:
        if stage.argv is None or not stage.enabled(plan):
            continue
        module = stage.module()
        for model in names if stage.per_model else [""]:
            label = stage_label(stage, model)
            inputs, why = stage_due(stage, plan, model, stamps, causes, read)
            if not why:
                timings[label] = None
                if inputs is not None and stamps.recorded.get(label) != inputs.each:
                    stamps.record(label, inputs)  # an older record: one digest for all
                continue
            log.info("%s: running (%s)", label, "; ".join(t for t, _ in why), extra=ticker.PROGRESS)
            timings[label] = run_stage(stage.name, module.main, stage.argv(plan, model))
            keep({label: timings[label]})
            invocation.finished(f"stage {label} done")
            read.clear()  # what it wrote is read again
            cause = "; ".join(dict.fromkeys(c for _, c in why if c))
            if cause and stage.outputs is not None:
                causes.update(dict.fromkeys(plan.named(stage.outputs(plan, model)), cause))
            if inputs is not None:
                stamps.record(label, inputs)
    return timings


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("pipeline").parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    if args.wandb:
        args.set.append("+train.wandb=true")
    common = config_argv(args)
    try:
        cfg, model_cfgs = stages.pipeline_configs(args)
        ExperimentSettings.from_config(cfg).data()  # refused now, not after training
        if args.parallel is None:
            import torch

            args.parallel = max(1, torch.cuda.device_count())
        if args.parallel < 1:
            raise ConfigError(f"--parallel must be at least 1, got {args.parallel}")
        budget = args.budget_hours
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise ConfigError(f"--budget-hours {budget:g}: must be a positive number of hours")
        search: list[str] = []
        if args.storage:
            studies.open_storage(args.storage)  # a bad URL fails now, not after training
            search = ["--storage", args.storage]
        if args.launcher == "slurm":
            launchers.check_slurm()
        for name, model_cfg in model_cfgs.items():
            check_model(model_cfg, name)  # an unknown encoder fails before the data is read
        preflight(cfg, model_cfgs)  # reads only: a typo fails before the folder exists
        if args.plan or args.budget_hours is not None:
            problems = print_plan(cfg, model_cfgs, args.parallel, args.budget_hours)
            for problem in problems:
                print(f"does not fit: {problem}", file=sys.stderr)
            if args.plan or problems:
                return 1 if problems else 0
        layout = layout_of(cfg)
        with (
            locks.hold(layout.lock, f"experiment {layout.root}"),
            stage_output(layout.pipeline_log, args.verbose, argv),
        ):
            timings = run_stages(cfg, model_cfgs, common, args.parallel, search, args.launcher)
        scores = read_json(layout.scores) if layout.scores.is_file() else {}
    except (ConfigError, DataError, StageFailed, locks.InUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [
        {"stage": k, "seconds": "reused" if v is None else f"{v:.1f}"} for k, v in timings.items()
    ]
    print(format_rows("Stages of this call", rows), end="\n\n")
    print(f"submission: {layout_of(cfg).submission}")
    print(f"every stage's own output: {layout_of(cfg).pipeline_log}")
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s")
    # the report's first lines, last here: what a user reads when the run ends
    for warning in scores.get("warnings", []):
        print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
