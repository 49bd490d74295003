"""Run every stage for every model and fold of a config, like `make`: only what is stale.

train.py skips complete folds itself; a later stage runs only when the bytes of one of its
inputs changed since it last ran (a retrained fold, a new blend, a replaced or added test
image: stamps.py, never file times), an output is missing, or the settings it recorded
differ from the config's (TTA, blended models, optuna trials and objective, refinement
settings). So a killed pipeline simply continues where it stopped, and a second call does
no training. The stages are called in-process through their own `main`, so each
validates its input exactly as on the command line.

The stages after training are the table of `stages.py`, in order; the last, `report.py`,
scores what was made (out of fold always, on the test set when the data folder has a
`test_gt/`) and writes `report.html`.
"""

from __future__ import annotations

import stages

if __name__ == "__main__":
    stages.preflight("pipeline")


import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import launchers
import locks
import planning
import progress
import refine
import studies
import ticker
import train
from config import (
    ConfigError,
    reports_environment_errors,
    setup_logging,
)
from data.atomic import write_json, write_yaml
from data.prepare import prepare_train_data
from data.reader import (
    DataError,
    check_image_file,
    list_test,
    list_test_gt,
)
from decisions import Rule
from engine import judge_fold
from evaluation import (
    format_rows,
    read_json,
)
from models import inference
from models.registry import check_model
from paths import Layout
from recipe import RetryPolicy, check_config, check_recipes_early, stale_training_data
from runtime import PARENT_ENV, Dist
from settings import DataSettings, TrainSettings
from stages import STAGES, Plan, Stage
from stamps import Stamps, digest

log = logging.getLogger("pipeline")


class StageFailed(RuntimeError):
    """A stage's `main` returned non-zero; its own message has been printed already."""


def made_otherwise(path: Path, settings: dict[str, Any]) -> bool:
    """True when a stage's JSON artefact records other settings than the config's now.

    The inputs' digests (stamps.py) cannot see a changed `predict.tta` or `tune.trials`;
    the artefacts record those settings, so a config change reruns the stage that
    depends on it.
    """
    doc = read_json(path)
    return any(doc.get(k) != v for k, v in settings.items())


def stage_label(stage: Stage, model: str) -> str:
    """The stage's name in stamps.json and timings.json: `predict unet`, `ensemble`."""
    return f"{stage.name} {model}".strip()


def stage_due(
    stage: Stage, plan: Plan, model: str, stamps: Stamps, module: ModuleType
) -> tuple[str | None, bool]:
    """(the digest of the stage's inputs for `model`, None when one is missing; whether the
    stage must run): an output missing, inputs other than it last ran on, or settings
    recorded other than the config's. A stage without inputs and outputs always runs."""
    if stage.outputs is None or stage.inputs is None:
        return None, True
    inputs = stage.inputs(plan, model)
    # with an input missing the stage runs and names it in its own words
    ident = digest(inputs) if all(p.exists() for p in inputs) else None
    due = (
        ident is None
        or stamps.changed(stage_label(stage, model), ident, stage.outputs(plan, model))
        or (stage.record is not None and made_otherwise(*stage.record(plan, module, model)))
    )
    return ident, due


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
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
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

    layout = Layout.of(cfg)
    logs = layout.logs
    logs.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus(torch.cuda.device_count())
    folds_on = dict.fromkeys(gpus, 0)
    jobs = list(jobs)
    finished: list[tuple[str, int]] = []
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
    training settings, for the progress lines. StageFailed names the failed ones."""
    import torch

    # The split is made once, before any fold starts, so no two processes race to write it.
    data = prepare_train_data(cfg, Dist(rank=0, world_size=1, device=torch.device("cpu")))
    for model, fold in jobs:
        # its own process retrains it, saying why in its log file: the console says it too
        stale = stale_training_data(Layout.of(cfg).fold(model, fold), data, model, fold)
        if stale:
            log.info("%s", stale)
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
    views = inference.tta_views(str((cfg.get("predict") or {}).get("tta", "none")))
    layout = Layout.of(cfg)
    predict = next(stage for stage in STAGES if stage.name == "predict")
    stages_plan = Plan(cfg, layout, list(model_cfgs), [], [])
    stamps, module = Stamps(layout.stamps), predict.module()
    predicted = [m for m in model_cfgs if not stage_due(predict, stages_plan, m, stamps, module)[1]]
    plan = planning.plan_run(cfg, model_cfgs, views, parallel, device, predicted)
    print("\n".join(planning.report(plan)))
    return planning.over_budget(plan, budget_h)


def preflight(cfg: dict[str, Any], model_cfgs: dict[str, dict[str, Any]]) -> None:
    """Everything that can be checked before training, in one pass, so that a typo in a
    later stage's settings or a missing test folder fails in seconds, not after every fold.
    `model_cfgs` holds each model's config as train.py resolves it (its own recipe).
    """
    for model_cfg in model_cfgs.values():
        check_config(model_cfg)
    inference.tta_transforms(str((cfg.get("predict") or {}).get("tta", "none")))
    for section in ("ensemble", "tune"):
        studies.search_settings(cfg, section)
    refine.RefineSettings.from_config(cfg)
    Rule.from_config(cfg)
    RetryPolicy.from_config(cfg)
    # Unreadable or truncated test images are named now, not after training; so are
    # unpaired or unreadable test_gt/ files, which only the last stage (report) reads.
    data_dir = Path(cfg["data_dir"])
    for sample in list_test(data_dir):
        check_image_file(sample.image)
    for sample in list_test_gt(data_dir) or []:
        check_image_file(sample.mask)


def run_stages(
    cfg: dict[str, Any],
    model_cfgs: dict[str, dict[str, Any]],
    common: Sequence[str],
    parallel: int = 1,
    search: Sequence[str] = (),
    started: float | None = None,
    launcher: str = "local",
) -> dict[str, float]:
    """Every stale stage, in order (after `preflight`); returns the seconds per stage.

    `model_cfgs`: each model's config as train.py resolves it. `search`: extra flags of
    the optuna stages (ensemble, tune), e.g. `--storage URL`. `started` (epoch seconds):
    when this call began; training times are the experiment's only when a fold trained
    since then. Each stage's time goes to timings.json as it ends, for the report.
    """
    layout = Layout.of(cfg)
    names = list(model_cfgs)
    n_folds = DataSettings.from_config(cfg).n_folds
    timings: dict[str, float] = {}

    def keep(labels: Sequence[str]) -> None:
        # A stage skipped in this call keeps the time it took when it ran.
        previous = read_json(layout.timings) if layout.timings.is_file() else {}
        write_json(layout.timings, {**previous, **{k: round(timings[k], 1) for k in labels}})

    for name, model_cfg in model_cfgs.items():
        check_recipes_early(model_cfg, name, range(n_folds))
    if parallel > 1 or launcher != "local":
        jobs = [(m, k) for m in names for k in range(n_folds)]
        recipes = {m: TrainSettings.from_config(c) for m, c in model_cfgs.items()}
        label = "train (parallel)" if launcher == "local" else f"train ({launcher})"
        timings[label] = train_folds(cfg, common, jobs, parallel, launcher, recipes)
        # A fold is judged against its model's other folds, which finish in other
        # processes: judge them all now, and retrain the failed ones (train.py applies the
        # retry policy and stops when its attempts are spent).
        for _ in range(RetryPolicy.from_config(cfg).attempts):
            failed = [(m, k) for m, k in jobs if judge_fold(model_cfgs[m], m, k)]
            if not failed:
                break
            log.warning("failed folds to retrain: %s", ", ".join(f"{m} {k}" for m, k in failed))
            seconds = train_folds(cfg, common, failed, parallel, launcher, recipes)
            timings["train (retrain)"] = timings.get("train (retrain)", 0.0) + seconds
    else:
        for name in names:
            timings[f"train {name}"] = run_stage(
                "train", train.main, ["--model", name, "--fold", "all", "--resume", *common]
            )
    logs = [layout.fold(n, k).log for n in names for k in range(n_folds)]
    if started is None or any(p.is_file() and p.stat().st_mtime >= started for p in logs):
        keep(list(timings))
    write_yaml(layout.config, cfg)
    stamps = Stamps(layout.stamps)
    plan = Plan(cfg, layout, names, list(common), list(search))
    for stage in STAGES:
        if stage.argv is None or not stage.enabled(plan):
            continue
        module = stage.module()
        for model in names if stage.per_model else [""]:
            label = stage_label(stage, model)
            ident, due = stage_due(stage, plan, model, stamps, module)
            if due:
                timings[label] = run_stage(stage.name, module.main, stage.argv(plan, model))
                keep([label])
                if ident is not None:
                    stamps.record(label, ident)
    return timings


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("pipeline").parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    started = time.time()
    if args.wandb:
        args.set.append("+train.wandb=true")
    common = ["--config", args.config]
    for flag, value in (("--data-dir", args.data_dir), ("--out-dir", args.out_dir)):
        if value:
            common += [flag, str(value)]
    for item in args.set:
        common += ["--set", item]
    try:
        cfg, model_cfgs = stages.pipeline_configs(args)
        if not cfg.get("data_dir"):
            raise ConfigError("no data dir: give --data-dir or set data_dir in the config")
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
        layout = Layout.of(cfg)
        with locks.hold(layout.lock, f"experiment {layout.root}"):
            timings = run_stages(
                cfg, model_cfgs, common, args.parallel, search, started, args.launcher
            )
    except (ConfigError, DataError, StageFailed, locks.InUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [{"stage": k, "seconds": round(v, 1)} for k, v in timings.items()]
    print(format_rows("Stages run in this call", rows), end="\n\n")
    print(f"submission: {Layout.of(cfg).submission}")
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
