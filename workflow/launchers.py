"""Fold jobs on a SLURM cluster, through submitit (`pipeline.py --launcher slurm`).

A lab trains the 6 x 5 folds on a cluster, not on the machine that runs `pipeline.py`.
Each (model, fold) becomes one SLURM job running `train.py --resume` (submitit's own
executor: sbatch, the job's stdout and stderr under `<exp>/logs/slurm/`); the pipeline
waits with a progress line, collects the exit codes, and runs the later stages itself.
A job that SLURM preempts or times out is requeued by submitit (`Checkpointable`) and its
fold continues from `last.pt`. Everything the jobs share lives under `out_dir`, which
must be on a filesystem every node sees; the atomic renames stay within it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from core.config import ConfigError
from core.invocation import rerun_hint
from core.settings import ExperimentSettings, SlurmSettings, TrainSettings
from core.ticker import PROGRESS_S
from workflow.progress import training_line

log = logging.getLogger("launchers")

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 5.0


def job_parameters(slurm: SlurmSettings, name: str) -> dict[str, Any]:
    """submitit's executor parameters (the unset ones left to the cluster's defaults)."""
    chosen = {
        "name": name,
        "timeout_min": slurm.timeout_min,
        "gpus_per_node": slurm.gpus_per_node,
        "slurm_partition": slurm.partition,
        "slurm_account": slurm.account,
        "cpus_per_task": slurm.cpus_per_task,
        "mem_gb": slurm.mem_gb,
        # the job imports the project's modules from this checkout
        "slurm_setup": [f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    return {k: v for k, v in chosen.items() if v is not None}


class FoldJob(submitit.helpers.Checkpointable):
    """One fold's `train.py` in a SLURM job, run as the command it is (as the local
    launcher runs it), so this library never imports a command. Checkpointable: on
    preemption or timeout submitit resubmits the same call, and `--resume` continues
    from `last.pt`."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *self.argv]).returncode


def check_slurm() -> None:
    """sbatch and srun on PATH, checked before any work: submitit needs both, and without
    them fails with a traceback once the split is made."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"--launcher slurm: {' and '.join(missing)} not found on PATH (not a SLURM "
            "login node?): run it where SLURM's commands are, or on this machine: "
            + rerun_hint("--launcher", "local")
        )


def submission_problem(exc: submitit.core.utils.FailedJobError) -> str:
    """sbatch's refusal in one line: its stderr (submitit's message), else its exit code."""
    said = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if said:
        return said
    cause = exc.__cause__
    return f"exit status {getattr(cause, 'returncode', '?')}"


def train_on_slurm(
    cfg: dict[str, Any],
    common: Sequence[str],
    jobs: Sequence[tuple[str, int]],
    recipes: dict[str, TrainSettings],
) -> tuple[float, list[str]]:
    """Every (model, fold) of `jobs` as a SLURM job; (seconds, the failed jobs). `recipes`:
    each model's training settings, for the progress lines."""
    top = ExperimentSettings.from_config(cfg)
    executor = submitit.AutoExecutor(folder=top.layout.logs / "slurm", cluster="slurm")
    slurm = SlurmSettings.from_config(cfg)
    executor.update_parameters(**job_parameters(slurm, f"neopolyp-{top.experiment}"))
    check_slurm()
    start = time.perf_counter()
    try:
        # submitit prints sbatch's stderr itself before raising it: said once, below
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():
            submitted = [
                executor.submit(FoldJob(["--model", m, "--fold", str(k), "--resume", *common]))
                for m, k in jobs
            ]
    except submitit.core.utils.FailedJobError as exc:
        raise ConfigError(
            f"sbatch refused the fold jobs: {submission_problem(exc)} (their partition, "
            "account, gpus_per_node, cpus_per_task, mem_gb and timeout_min come from the "
            "config's slurm: section, e.g. --set slurm.partition=gpu)"
        ) from exc
    for (model, fold), job in zip(jobs, submitted, strict=True):
        log.info(
            "train %s fold %d: SLURM job %s (logs %s)", model, fold, job.job_id, job.paths.stdout
        )
    told = time.monotonic()
    while not all(job.done() for job in submitted):
        time.sleep(POLL_S)
        if time.monotonic() - told >= PROGRESS_S:
            running = [fold for fold, job in zip(jobs, submitted, strict=True) if not job.done()]
            finished = [fold for fold in jobs if fold not in running]
            log.info("%s", training_line(top.layout, recipes, running, [], finished, len(jobs)))
            told = time.monotonic()
    failed = []
    for (model, fold), job in zip(jobs, submitted, strict=True):
        try:
            code = job.result()
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
            code, why = None, str(exc).splitlines()[0]
        else:
            why = f"exit {code}"
        if code != 0:
            failed.append(
                f"{model} fold {fold} (SLURM job {job.job_id}: {why}; {job.paths.stderr})"
            )
    return time.perf_counter() - start, failed
