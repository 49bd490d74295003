"""Every stage's command line, in a module that imports nothing heavy.

One shape for all stages: the same `--config` (the competition config by default), one
override syntax (`--set KEY=VALUE`, plus dedicated flags where they help), `--workers` for
loader processes and `--jobs` for threads. Parsers live here rather than in the stage
scripts so that `--help`, and the refusal of a bad config, come before torch, OpenCV and
optuna are imported: each stage calls `stages.preflight` before its heavy imports. The
stage table (stages.py) names each command's parser; nothing here lists the commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from core.config import ConfigError, add_config_arguments, parse_img_size, resolve_cli_config
from core.metrics import OBJECTIVES
from core.settings import PRECISIONS, TTA_CHOICES, Settings


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--workers, --precision and --amp, the flags of the stages that run a model."""
    parser.add_argument(
        "--workers", type=int, help="data loader worker processes; overrides data.num_workers"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="overrides train.precision (auto: bf16 on GPUs of compute capability >= 8.0, "
        "fp16 below, fp32 on the CPU)",
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--amp is --precision auto, --no-amp is --precision fp32",
    )


def runtime_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys that `add_runtime_arguments` flags override (None = not given)."""
    precision = args.precision
    if precision is None and args.amp is not None:
        precision = "auto" if args.amp else "fp32"
    return {"data.num_workers": args.workers, "train.precision": precision}


def checked(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` once every section of it builds (`Settings.of`): a bad value in any section
    is refused where the command starts, not by the stage that reads it last."""
    Settings.of(cfg)
    return cfg


def stage_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config of a command whose only config flags are `--config`, `--data-dir`,
    `--out-dir` and `--set`, checked."""
    return checked(resolve_cli_config(args))


def train_config(args: argparse.Namespace) -> dict[str, Any]:
    """train.py's config: the model's own recipe, `--set`, then train.py's dedicated flags
    (`stages.preflight` resolves it the same way before torch is imported)."""
    flags: dict[str, Any] = {
        "seed": args.seed,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        **runtime_flags(args),
        "data.img_size": parse_img_size(args.img_size) if args.img_size else None,
        "train.wandb": True if args.wandb else None,
        "train.compile": True if args.compile else None,
    }
    if args.pretrained is not None:
        flags[f"models.{args.model}.pretrained"] = args.pretrained
    return checked(resolve_cli_config(args, flags, model=args.model))


def predict_config(args: argparse.Namespace) -> dict[str, Any]:
    """predict.py's config: `--set`, then its TTA, batch and runtime flags."""
    flags = {"predict.tta": args.tta, "predict.batch_size": args.batch_size, **runtime_flags(args)}
    return checked(resolve_cli_config(args, flags))


def hpo_config(args: argparse.Namespace) -> dict[str, Any]:
    """hpo.py's config: the model's own recipe, `--set`, then the runtime flags."""
    return checked(resolve_cli_config(args, runtime_flags(args), model=args.model))


def check_jobs(jobs: int, flag: str = "--jobs") -> None:
    """joblib refuses a job count of 0 with a traceback deep in the run (the optuna stages:
    after every map is loaded): refused first, naming the flag the user wrote."""
    if jobs == 0:
        raise ConfigError(f"{flag} 0: give N >= 1, or -1 for all cores (-2 all but one, ...)")


def jobs_given(args: argparse.Namespace) -> int | None:
    """infer.py's thread count: `--jobs`, or `--threads`, its deprecated name (said so on
    stderr), each checked by the name it was given under; None when neither was given."""
    if args.threads is None:
        if args.jobs is not None:
            check_jobs(args.jobs)
        return args.jobs
    if args.jobs is not None:
        raise ConfigError("--threads is the deprecated name of --jobs: give --jobs alone")
    print("warning: --threads is deprecated: it is --jobs now (the same count)", file=sys.stderr)
    check_jobs(args.threads, "--threads")
    return args.threads


def add_search_arguments(p: argparse.ArgumentParser, section: str) -> None:
    """The optuna stages' flags; --trials/--objective defaults come from `section`."""
    p.add_argument(
        "--trials",
        type=int,
        help=f"complete optuna trials in all; a rerun continues the study to this count "
        f"(default: {section}.trials, else 100)",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help=f"OOF score to maximise (default: {section}.objective, else competition)",
    )
    p.add_argument(
        "--jobs", type=int, default=-1, help="threads over images (default: -1, all cores)"
    )
    add_study_arguments(p)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """Where an optuna stage's study lives and who works on it (studies.place_from_args)."""
    p.add_argument(
        "--storage",
        help="optuna storage URL (postgresql://..., mysql://..., sqlite:///FILE) or "
        "journal:PATH (default: sqlite:///<out_dir>/<experiment>/optuna.db)",
    )
    p.add_argument(
        "--parallel",
        dest="n_workers",
        metavar="N",
        type=int,
        default=1,
        help="processes working on the study at once, through its storage (default: 1)",
    )
    p.add_argument(
        "--join",
        action="store_true",
        help="join a study other machines are working on: leave its RUNNING trials alone",
    )


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a model of the config's zoo on one or more folds of the shared split.",
    )
    p.add_argument("--model", required=True, help="name of an entry in the config's `models:`")
    p.add_argument(
        "--fold", required=True, help="fold index, comma-separated indices, or 'all' (in sequence)"
    )
    add_config_arguments(p)
    p.add_argument("--epochs", type=int, help="overrides train.epochs")
    p.add_argument(
        "--batch-size", type=int, help="per-process batch size; overrides train.batch_size"
    )
    p.add_argument(
        "--img-size", help="working size N or HxW, e.g. 352 or 352x416; overrides data.img_size"
    )
    p.add_argument("--lr", type=float, help="overrides train.lr")
    p.add_argument(
        "--pretrained",
        help="'none', 'imagenet' or a weights file; overrides models.<model>.pretrained",
    )
    p.add_argument(
        "--seed", type=int, help="training seed (the split uses data.fold_seed); overrides seed"
    )
    p.add_argument("--resume", action="store_true", help="continue each fold from its last.pt")
    p.add_argument(
        "--force",
        action="store_true",
        help="delete the fold folders and retrain, even complete ones",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log to Weights & Biases (offline unless WANDB_MODE is set)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_runtime_arguments(p)
    return p


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Out-of-fold and test probabilities of one model's fold checkpoints, with TTA.",
    )
    p.add_argument("--model", required=True, help="name of an entry in the config's `models:`")
    add_config_arguments(p)
    p.add_argument(
        "--tta", choices=TTA_CHOICES, help="test-time augmentation; overrides predict.tta"
    )
    p.add_argument(
        "--batch-size", type=int, help="images per forward pass; overrides predict.batch_size"
    )
    p.add_argument(
        "--num-parts",
        type=int,
        metavar="K",
        help="predict one of K shares of the images (one machine each; default: 1)",
    )
    p.add_argument(
        "--part-id",
        type=int,
        metavar="I",
        help="the share this call predicts, 0..K-1 (default: 0)",
    )
    p.add_argument(
        "--merge-parts",
        type=int,
        metavar="K",
        help="join the K shares written with --num-parts K into the model's stores, checked "
        "for completeness",
    )
    add_runtime_arguments(p)
    return p


def ensemble_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tune blend weights on OOF predictions and blend.")
    add_config_arguments(p)
    p.add_argument(
        "--models", nargs="+", help="models to blend (default: ensemble.models, else all)"
    )
    add_search_arguments(p, "ensemble")
    return p


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tune post-processing on the blended OOF maps; writes postprocess.json."
    )
    add_config_arguments(p)
    add_search_arguments(p, "tune")
    return p


def hpo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Search training hyper-parameters (the config's hpo.space) on one fold "
        "with optuna and pruning; writes the best as an experiment file inheriting the config."
    )
    p.add_argument("--model", required=True, help="name of an entry in the config's `models:`")
    add_config_arguments(p)
    p.add_argument(
        "--trials",
        type=int,
        help="finished (complete or pruned) trials in all; a rerun continues the study to "
        "this count (default: hpo.trials, else 20)",
    )
    p.add_argument(
        "--fold", type=int, help="the fold each trial trains (default: hpo.fold, else 0)"
    )
    p.add_argument(
        "--epochs", type=int, help="epochs per trial (default: hpo.epochs, else train.epochs)"
    )
    add_study_arguments(p)
    add_runtime_arguments(p)
    return p


def postprocess_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Post-process the blended test probabilities and write submission.csv."
    )
    add_config_arguments(p)
    p.add_argument(
        "--probs",
        type=Path,
        help="test probability store (default: the one postprocess.json names, "
        "<out>/<exp>/refine/test when tune.py chose the refined maps out of sample, else "
        "<out>/<exp>/ensemble/test)",
    )
    p.add_argument(
        "--params",
        type=Path,
        help="tuned parameters (default: <out>/<exp>/postprocess.json; missing = plain argmax)",
    )
    p.add_argument(
        "--jobs", type=int, default=-1, help="threads over images (default: -1, all cores)"
    )
    p.add_argument(
        "--message", default=None, help="submission message for the printed kaggle command"
    )
    return p


def pipeline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train, predict, blend, tune and submit for every model and fold of a "
        "config, skipping what is complete; ends with a score table and report.html.",
    )
    add_config_arguments(p)
    p.add_argument(
        "--parallel",
        type=int,
        help="train up to N folds at once, each its own process on the GPU running the "
        "fewest folds (default: one per GPU when there are several, else 1; more than the "
        "GPUs share them)",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log every fold, the scores, report.html and submission.csv to Weights & Biases "
        "(offline runs in <out_dir>/<experiment>/wandb/ unless WANDB_MODE is set)",
    )
    p.add_argument(
        "--storage",
        help="optuna storage of the ensemble and tune studies, passed to both "
        "(default: sqlite:///<out_dir>/<experiment>/optuna.db)",
    )
    p.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="where the fold processes run: this machine (--parallel at a time), or one "
        "SLURM job each through submitit, with the config's slurm: section (partition, "
        "account, gpus_per_node, cpus_per_task, mem_gb, timeout_min) (default: local)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="train nothing: measure each model on this machine (cached) and print the time "
        "per fold, per stage and in total, and the disk of the finished run",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every stage's own output on the console too (its tables, epochs, trials); "
        "by default the console gets one line per stage, warnings and progress, and the rest "
        "goes to <out_dir>/<experiment>/logs/pipeline.log",
    )
    p.add_argument(
        "--budget-hours",
        type=float,
        metavar="H",
        help="refuse (exit 1) a plan that takes more than H hours or more disk than is "
        "free, naming the settings that would make it fit; without --plan, checked "
        "before the run starts",
    )
    return p


def config_parser(description: str) -> argparse.ArgumentParser:
    """The parser of a command whose only flags are the config's (--config, --data-dir,
    --out-dir, --set): a stage entry names it with its description (stages.py), so a new
    stage of that shape needs nothing here."""
    p = argparse.ArgumentParser(description=description)
    add_config_arguments(p)
    return p


def refine_parser() -> argparse.ArgumentParser:
    return config_parser(
        "Refine the blend's regions with a second-stage network trained on its "
        "out-of-fold predictions; writes refine/{oof,test} and refine/refine.json. Whether "
        "the submission uses the refined maps is tune.py's decision, out of sample "
        "(decisions.py): each fold scored by what was fitted without it, the refined maps "
        "used only when their gain over the blend has a paired bootstrap interval above zero."
    )


def report_parser() -> argparse.ArgumentParser:
    return config_parser(
        "Build the experiment's score tables, scores.json and report.html from "
        "its artefacts (the pipeline runs it last; run it alone to rebuild the report)."
    )


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare finished experiments: config differences, out-of-fold scores, "
        "the decisions and submitted chains, test scores and wall time, and for each pair "
        "the paired per-image difference of the submitted chains with a bootstrap interval."
    )
    p.add_argument(
        "experiments", nargs="+", help="experiment folders (<out_dir>/<experiment>), first = base"
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=0.9,
        help="two-sided level of the intervals (default: 0.9)",
    )
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Gather a finished experiment's submission chain (every blended model's "
        "fold weights, blend weights, refiner, post-processing, working size, TTA) into one "
        "package that infer.py applies without the experiment folder or the training data."
    )
    add_config_arguments(p)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the package to write (what infer.py --package reads; the experiment is read "
        "from --out-dir): a folder, or a zip when the name ends in .zip; it must be new, an "
        "empty folder, or a package (with --force); anything else is refused",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the package at --out (only once the new one is complete); a folder "
        "or file that is not a package is never replaced",
    )
    p.add_argument(
        "--half",
        action="store_true",
        help="store the weights in fp16 (ONNX files too, computed in fp32): half the size, "
        "but the predictions move by the rounding, so the submission is no longer "
        "byte-identical to the pipeline's",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write every network as ONNX (opset 17, dynamic batch and image size) for "
        "infer.py --runtime onnx and other programs",
    )
    return p


def infer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Apply an exported package to a folder of images (JPEG or PNG, any size, "
        "flat or nested) with exactly the experiment's chain (TTA, blend, refiner if chosen, "
        "post-processing); writes <out>/submission.csv in the competition format."
    )
    p.add_argument("--package", type=Path, required=True, help="package folder or zip (export.py)")
    p.add_argument("--images", type=Path, required=True, help="folder of images to predict")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder, outside --images; its submission.csv, masks/ and overlays/ are "
        "replaced only when a run succeeds, and only if infer.py wrote them",
    )
    p.add_argument(
        "--masks",
        action="store_true",
        help="also write <out>/masks/<id>.png: class ids (0, 1, 2) at each image's own size",
    )
    p.add_argument(
        "--overlays",
        action="store_true",
        help="also write <out>/overlays/<id>.jpg: the classes' colours over each image",
    )
    p.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default="torch",
        help="torch, or onnxruntime with a package exported with --onnx (default: torch)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the networks run (default: auto, a GPU when there is one)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        help="CPU threads of the networks, the decoding and the post-processing: N, or -1 "
        "for all cores, -2 for all but one, ... (default: the networks on the experiment's "
        "train.cpu_threads, which gives the pipeline's bytes, the rest on all cores; a count "
        "given is faster on a CPU and may move a few pixels)",
    )
    p.add_argument("--threads", type=int, help="deprecated: the old name of --jobs")
    p.add_argument(
        "--bad-images",
        choices=("skip", "stop"),
        default="skip",
        help="an unreadable image is named and skipped, or stops the run with exit 1 "
        "(default: skip; the run ends with the count)",
    )
    return p
