"""Run every stage for every model and fold of a config, like `make`: only what is stale.

train.py skips complete folds itself; a later stage runs only when the bytes of one of its
inputs changed since it last ran (a retrained fold, a new blend, a replaced or added test
image: stamps.py, never file times), an output is missing, or the settings it recorded
differ from the config's (TTA, blended models, optuna trials and objective, refinement
settings). So a killed pipeline simply continues where it stopped, and a second call does
no training. The stages are called in-process through their own `main`, so each
validates its input exactly as on the command line.

At the end the pipeline scores what it made: out-of-fold (all training images, at working
resolution) always, and on the test set only when the data folder has a `test_gt/`
(the synthetic demo data does; the real competition data does not). No stage reads
`test_gt/`; only this final scoring does. It also writes `report.html`.
"""

from __future__ import annotations

import stages

if __name__ == "__main__":
    stages.exit_if_help("pipeline")


import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import locks
import postprocessing
import predict
import refine
import studies
import tracking
import train
from config import (
    ConfigError,
    reports_environment_errors,
    resolve_cli_config,
    setup_logging,
)
from data.atomic import write_json, write_yaml
from data.cache import load_item, train_items
from data.prepare import prepare_train_data
from data.probstore import ProbMaps, load_probs
from data.reader import (
    DataError,
    check_image_file,
    list_test,
    list_test_gt,
)
from decisions import Rule
from engine import failed_attempts, judge_fold
from evaluation import (
    DECISIONS_TABLE,
    OOF_TABLE,
    TEST_TABLE,
    decision_rows,
    format_rows,
    oof_rows,
    read_json,
    test_rows,
)
from metrics import class_stats, scores_from_stats
from paths import Layout
from postprocessing import PostprocessParams, input_store, load_params
from recipe import RetryPolicy, check_config, check_recipes_early
from report import Case, ReportInputs, write_report
from runtime import PARENT_ENV, Dist
from stages import STAGES, Plan
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


def run_stage(name: str, main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> float:
    """Call a stage's `main`; returns its wall time. Raises StageFailed on a non-zero exit."""
    log.info("stage %s: %s", name, " ".join(argv))
    start = time.perf_counter()
    code = main(list(argv))
    if code != 0:
        raise StageFailed(f"stage {name} failed with exit code {code}")
    return time.perf_counter() - start


def model_names(cfg: dict[str, Any]) -> list[str]:
    """The models the pipeline trains: `ensemble.models` if set, else every config model."""
    names = list((cfg.get("ensemble") or {}).get("models") or cfg.get("models") or [])
    if not names:
        raise ConfigError("the config lists no models")
    return names


def train_in_parallel(
    cfg: dict[str, Any], common: Sequence[str], jobs: Sequence[tuple[str, int]], parallel: int
) -> float:
    """Every (model, fold) of `jobs` as its own `train.py` process, up to `parallel` at once.

    Folds are independent and seeded by (seed, fold), so the result is the sequential
    one. With several GPUs each process is pinned to one (nnU-Net's way of using several
    GPUs for cross-validation); on one GPU they share it; on the CPU each process computes
    on `train.cpu_threads` (one by default, as a sequential run does: runtime.py). Each
    fold's full log goes to `<exp>/logs/`; the console gets one line per fold.
    """
    import torch

    logs = Layout.of(cfg).root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # The split is made once, before any fold starts, so no two processes race to write it.
    prepare_train_data(cfg, Dist(rank=0, world_size=1, device=torch.device("cpu")))
    gpus = torch.cuda.device_count()
    jobs = list(jobs)
    running: list[tuple[str, int, subprocess.Popen, Any]] = []
    failed: list[str] = []
    start = time.perf_counter()
    try:
        while jobs or running:
            while jobs and len(running) < parallel:
                model, fold = jobs.pop(0)
                env = {**os.environ, PARENT_ENV: str(os.getpid())}
                if gpus > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(fold % gpus)
                log_file = (logs / f"train_{model}_fold{fold}.log").open("w")
                cmd = [sys.executable, str(Path(train.__file__).resolve()), "--model", model]
                cmd += ["--fold", str(fold), "--resume", *common]
                proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
                running.append((model, fold, proc, log_file))
                log.info("train %s fold %d: started (log %s)", model, fold, log_file.name)
            time.sleep(0.2)
            for entry in [r for r in running if r[2].poll() is not None]:
                model, fold, proc, log_file = entry
                running.remove(entry)
                log_file.close()
                tail = Path(log_file.name).read_text().strip().splitlines()[-1:] or [""]
                if proc.returncode:
                    failed.append(f"{model} fold {fold} (exit {proc.returncode}, {log_file.name})")
                    log.error("train %s fold %d failed: %s", model, fold, tail[0])
                else:
                    log.info("train %s", tail[0])
    finally:
        # an interrupt (Ctrl-C, an error here) ends the children too; SIGKILL: end_with_parent
        for _, _, proc, log_file in running:
            proc.terminate()
            proc.wait()
            log_file.close()
    if failed:
        raise StageFailed("training failed: " + "; ".join(failed))
    return time.perf_counter() - start


def preflight(cfg: dict[str, Any], model_cfgs: dict[str, dict[str, Any]]) -> None:
    """Everything that can be checked before training, in one pass, so that a typo in a
    later stage's settings or a missing test folder fails in seconds, not after every fold.
    `model_cfgs` holds each model's config as train.py resolves it (its own recipe).
    """
    for model_cfg in model_cfgs.values():
        check_config(model_cfg)
    predict.tta_transforms(str((cfg.get("predict") or {}).get("tta", "none")))
    for section in ("ensemble", "tune"):
        value = (cfg.get(section) or {}).get("trials", 100)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{section}.trials must be a positive whole number, got {value!r}")
        studies.search_settings(cfg, section)
    refine.RefineSettings.from_config(cfg)
    Rule.from_config(cfg)
    RetryPolicy.from_config(cfg)
    # Unreadable or truncated test images are named now, not after training.
    for sample in list_test(Path(cfg["data_dir"])):
        check_image_file(sample.image)


def run_stages(
    cfg: dict[str, Any],
    model_cfgs: dict[str, dict[str, Any]],
    common: Sequence[str],
    parallel: int = 1,
    search: Sequence[str] = (),
) -> dict[str, float]:
    """Every stale stage, in order (after `preflight`); returns the seconds per stage.

    `model_cfgs`: each model's config as train.py resolves it. `search`: extra flags of
    the optuna stages (ensemble, tune), e.g. `--storage URL`.
    """
    layout = Layout.of(cfg)
    names = list(model_cfgs)
    n_folds = int(cfg["data"]["n_folds"])
    timings: dict[str, float] = {}
    for name, model_cfg in model_cfgs.items():
        check_recipes_early(model_cfg, name, range(n_folds))
    if parallel > 1:
        jobs = [(m, k) for m in names for k in range(n_folds)]
        timings["train (parallel)"] = train_in_parallel(cfg, common, jobs, parallel)
        # A fold is judged against its model's other folds, which finish in other
        # processes: judge them all now, and retrain the failed ones (train.py applies the
        # retry policy and stops when its attempts are spent).
        for _ in range(RetryPolicy.from_config(cfg).attempts):
            failed = [(m, k) for m, k in jobs if judge_fold(model_cfgs[m], m, k)]
            if not failed:
                break
            log.warning("failed folds to retrain: %s", ", ".join(f"{m} {k}" for m, k in failed))
            seconds = train_in_parallel(cfg, common, failed, parallel)
            timings["train (retrain)"] = timings.get("train (retrain)", 0.0) + seconds
    else:
        for name in names:
            timings[f"train {name}"] = run_stage(
                "train", train.main, ["--model", name, "--fold", "all", "--resume", *common]
            )
    stamps = Stamps(layout.stamps)
    plan = Plan(cfg, layout, names, list(common), list(search))
    for stage in STAGES:
        if stage.argv is None or not stage.enabled(plan):
            continue
        module = stage.module()
        for model in names if stage.per_model else [""]:
            label = f"{stage.name} {model}".strip()
            argv = stage.argv(plan, model)
            if stage.outputs is None or stage.inputs is None:
                timings[label] = run_stage(stage.name, module.main, argv)
                continue
            inputs = stage.inputs(plan, model)
            # with an input missing the stage runs and names it in its own words
            ident = digest(inputs) if all(p.exists() for p in inputs) else None
            due = ident is None or stamps.changed(label, ident, stage.outputs(plan, model))
            if due or (stage.record and made_otherwise(*stage.record(plan, module, model))):
                timings[label] = run_stage(stage.name, module.main, argv)
                if ident is not None:
                    stamps.record(label, ident)
    return timings


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


def refine_record(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """refine.py's `refine.json` when the config enables refinement, else None."""
    if not (cfg.get("refine") or {}).get("enabled"):
        return None
    return read_json(Layout.of(cfg).refine_record)


def refine_cases(cfg: dict[str, Any], doc: dict[str, Any]) -> list[Case]:
    """The regions the refiner changed most, in their windows: blend and refined argmax,
    with each whole image's competition score before and after."""
    layout = Layout.of(cfg)
    rows = doc.get("most_changed") or []
    if not rows:
        return []
    blend, refined = (load_probs(path) for path in (layout.blend("oof"), layout.refined("oof")))
    ids = sorted({r["id"] for r in rows})
    items = dict(zip(ids, train_items(cfg, ids, blend.size), strict=True))
    row_of = {image_id: i for i, image_id in enumerate(blend.ids)}
    cases = []
    for r in rows:
        image, target = load_item(items[r["id"]])
        i = row_of[r["id"]]
        before, after = (s.raw[i].argmax(axis=0).astype(np.uint8) for s in (blend, refined))
        stats = class_stats(np.stack([before, after]), np.stack([target, target]))
        score, score_after = (scores_from_stats(stats[j : j + 1])["competition"] for j in (0, 1))
        y0, y1, x0, x1 = r["box"]
        w = np.s_[y0:y1, x0:x1]
        cases.append(Case(r["id"], image[w], target[w], before[w], after[w], score, score_after))
    return cases


def summarise(
    cfg: dict[str, Any], timings: dict[str, float], started: float | None = None
) -> dict[str, Any]:
    """Score tables (decisions and OOF always, test when test_gt exists) and the report.

    `started` (epoch seconds): when this call began; training timings count as the
    experiment's only when a fold was trained since then.
    """
    layout = Layout.of(cfg)
    names = model_names(cfg)
    blend_doc = read_json(layout.weights)
    tuned = read_json(layout.postprocess)
    params = load_params(layout.postprocess)
    # the maps tune.py and the submission used: the refined ones when refinement was kept
    source, why = input_store(cfg, "oof")
    source_name = "refined" if source == layout.refined("oof") else "blend"
    cases = oof_cases(load_probs(source), cfg, params)
    refined = refine_record(cfg)
    records = {
        "blend": blend_doc.get("decision"),
        "refined mask": refined["refined_mask"]["decision"] if refined else None,
        "refinement and post-processing": tuned["decision"],
    }
    tables = [
        (DECISIONS_TABLE, decision_rows(records)),
        (OOF_TABLE, oof_rows(cfg, [c.target for c in cases], blend_doc, refined, tuned)),
    ]
    notes = [f"Submitted chain: {decision_note(records)}.", *retrain_notes(cfg, names)]
    data_dir = Path(cfg["data_dir"])
    if list_test_gt(data_dir):
        rows, verdict = test_rows(cfg, names, blend_doc, tuned)
        tables.append((TEST_TABLE, rows))
        notes.append(verdict)
    logs = {
        n: {k: layout.fold(n, k).log for k in range(int(cfg["data"]["n_folds"]))} for n in names
    }
    steps = ", ".join(params.active_steps()) or "none"
    notes += [
        f"Post-processing used: {steps} ({tuned['decision']['reason']}).",
        f"Is a change real? python compare.py {layout.root} <another experiment folder> "
        "prints both side by side, with the paired per-image difference and its interval.",
        *study_notes({"ensemble": blend_doc.get("study"), "tune": tuned.get("study")}),
    ]
    if refined is not None:
        notes.append(f"Region refinement: {why}; submitted from the {source_name} maps.")
    inputs = ReportInputs(
        cfg=cfg,
        tables=tables,
        cases=cases,
        folds=read_json(layout.folds)["folds"],
        blend=blend_doc,
        tuned=tuned,
        logs=logs,
        timings=timings,
        submission=layout.submission,
        test_images={s.id: s.image for s in list_test(data_dir)},
        notes=notes,
        refined=refine_cases(cfg, refined) if refined is not None else [],
        source=source_name,
    )
    report = write_report(layout.report, f"neopolyp: {cfg['experiment']}", inputs)
    timing_rows = [{"stage": k, "seconds": round(v, 1)} for k, v in timings.items()]
    if timing_rows:
        tables.append(("Stages run in this call", timing_rows))
    write_yaml(layout.config, cfg)
    # A stage skipped in this call keeps the time it took when it ran.
    previous = read_json(layout.timings) if layout.timings.is_file() else {}
    trained = started is None or any(
        p.is_file() and p.stat().st_mtime >= started for by in logs.values() for p in by.values()
    )
    ran = {k: round(v, 1) for k, v in timings.items() if trained or not k.startswith("train")}
    write_json(layout.timings, {**previous, **ran})
    write_json(layout.scores, {"tables": {t: rows for t, rows in tables}, "notes": notes})
    if tracking.enabled(cfg):
        tracking.log_summary(cfg, tables, blend_doc, tuned, [report, layout.submission])
    return {"tables": tables, "report": report, "notes": notes}


def retrain_notes(cfg: dict[str, Any], names: Sequence[str]) -> list[str]:
    """One line per fold that was retrained after failing (its `retries.json`)."""
    layout = Layout.of(cfg)
    notes = []
    for name in names:
        for k in range(int(cfg["data"]["n_folds"])):
            failed = failed_attempts(layout, name, k)
            if failed:
                why = "; ".join(f"attempt {f['attempt']}: {f['reason']}" for f in failed)
                notes.append(
                    f"{name} fold {k} was retrained {len(failed)} time(s) after failing ({why}); "
                    f"its failed logs are kept in {layout.fold(name, k).dir}."
                )
    return notes


def decision_note(records: dict[str, dict[str, Any] | None]) -> str:
    """The decisions in a line: what each stage chose."""
    return "; ".join(f"{stage}: {rec['chosen']}" for stage, rec in records.items() if rec)


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
        cfg = resolve_cli_config(args)
        if not cfg.get("data_dir"):
            raise ConfigError("no data dir: give --data-dir or set data_dir in the config")
        if args.parallel < 1:
            raise ConfigError(f"--parallel must be at least 1, got {args.parallel}")
        search: list[str] = []
        if args.storage:
            studies.open_storage(args.storage)  # a bad URL fails now, not after training
            search = ["--storage", args.storage]
        model_cfgs = {n: resolve_cli_config(args, model=n) for n in model_names(cfg)}
        preflight(cfg, model_cfgs)  # reads only: a typo fails before the folder exists
        layout = Layout.of(cfg)
        with locks.hold(layout.lock, f"experiment {layout.root}"):
            timings = run_stages(cfg, model_cfgs, common, args.parallel, search)
            summary = summarise(cfg, timings, started)
    except (ConfigError, DataError, StageFailed, locks.InUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    for title, rows in summary["tables"]:
        print(format_rows(title, rows), end="\n\n")
    print("\n".join(summary["notes"]), end="\n\n")
    print(f"report: {summary['report']}")
    print(f"submission: {Layout.of(cfg).submission}")
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
