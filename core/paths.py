"""Where every artefact of an experiment lives: one place, so the stages cannot disagree.

<out_dir>/cache/                        working-size images and masks (all experiments)
<out_dir>/<experiment>/
    folds.json                          the shared split
    <model>/fold<k>/                    train.py (RunFiles): best.pt, last.pt, log.jsonl,
                                        config.yaml, recipe.json, oof/, and retries.json +
                                        failed_attempt<n>.jsonl if retrained
    <model>/oof, <model>/test           predict.py: the model's probability stores
    ensemble/oof, ensemble/test         ensemble.py: the blend
    refine/oof, refine/test             refine.py: the region-refined blend, refine.json and
                                        refiners.safetensors (the fold refiners)
    ensemble/weights.json, trials.csv
    postprocess.json, tune_trials.csv   tune.py
    submission.csv                      postprocess.py
    report.html, scores.json            report.py
    config.yaml, timings.json           pipeline.py: the resolved config, stage times
    stamps.json                         pipeline.py: digests of the inputs each stage ran on
    logs/                               pipeline.py: pipeline.log, each fold process's log
                                        (slurm/: SLURM's)
    optuna.db                           every study of the experiment
    wandb/                              offline W&B runs (outside the fold folders)
    hpo/<study>/trial<n>/               hpo.py (RunFiles): each trial's config and log
    hpo/best_<model>.yaml, hpo/trials_<model>.csv
    stages/<stage>/                     a stage added with its entry alone (stages.py):
                                        the files it names there
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFiles:
    """The artefacts of one training run's folder: a fold (train.py) or a search trial."""

    dir: Path

    @property
    def best(self) -> Path:
        """Inference weights of the best epoch (no optimizer state)."""
        return self.dir / "best.pt"

    @property
    def last(self) -> Path:
        """Weights, optimizer, schedule and RNG states of the last epoch: what --resume reads."""
        return self.dir / "last.pt"

    @property
    def log(self) -> Path:
        """One JSON record per epoch."""
        return self.dir / "log.jsonl"

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def recipe(self) -> Path:
        """The fold's identity (recipe.py): what a complete fold must match to be reused."""
        return self.dir / "recipe.json"

    @property
    def oof(self) -> Path:
        """The fold's validation probabilities from best.pt (a probability store)."""
        return self.dir / "oof"

    @property
    def retries(self) -> Path:
        """The failed attempts of a fold that was retrained (train.py, recipe.RetryPolicy)."""
        return self.dir / "retries.json"

    def failed_log(self, attempt: int) -> Path:
        """The epoch log of a failed attempt, kept when the fold is retrained."""
        return self.dir / f"failed_attempt{attempt}.jsonl"


@dataclass(frozen=True)
class InferFiles:
    """What infer.py writes under its --out folder."""

    dir: Path

    @property
    def submission(self) -> Path:
        return self.dir / "submission.csv"

    @property
    def masks(self) -> Path:
        return self.dir / "masks"

    @property
    def overlays(self) -> Path:
        return self.dir / "overlays"

    @property
    def outputs(self) -> tuple[Path, Path, Path]:
        """What one run replaces as a whole when it succeeds."""
        return self.submission, self.masks, self.overlays

    @property
    def lock(self) -> Path:
        """Held by the run writing here (locks.py); that it exists marks the outputs beside
        it as infer.py's, which a later run may replace."""
        return self.dir / ".infer.lock"

    def mask(self, image_id: str) -> Path:
        """Class ids (0, 1, 2) at the image's own size; `image_id` may hold subfolders."""
        return self.masks / f"{image_id}.png"

    def overlay(self, image_id: str) -> Path:
        return self.overlays / f"{image_id}.jpg"


@dataclass(frozen=True)
class Layout:
    """The artefact paths of one experiment (`root` = <out_dir>/<experiment>)."""

    root: Path
    out_dir: Path

    @classmethod
    def at(cls, root: Path) -> Layout:
        """The layout of an experiment folder found on disk (compare.py)."""
        return cls(root, root.parent)

    @property
    def cache(self) -> Path:
        return self.out_dir / "cache"

    @property
    def plan_calibration(self) -> Path:
        """pipeline.py --plan's measurements, shared by the experiments of this out_dir."""
        return self.out_dir / "plan_calibration.json"

    @property
    def folds(self) -> Path:
        return self.root / "folds.json"

    def fold(self, model: str, k: int) -> RunFiles:
        return RunFiles(self.root / model / f"fold{k}")

    @property
    def lock(self) -> Path:
        """Held by the pipeline running on this experiment (locks.py)."""
        return self.root / ".lock"

    def fold_lock(self, model: str, k: int) -> Path:
        """Held by the process training this fold; beside the fold's folder, which a
        forced retrain may move away."""
        return self.root / model / f".fold{k}.lock"

    def store(self, model: str, kind: str) -> Path:
        """A model's probability store of `kind` "oof" or "test" (predict.py)."""
        return self.root / model / kind

    def store_part(self, model: str, kind: str, part: int, parts: int) -> Path:
        """One machine's share of a model's store (`predict.py --num-parts K --part-id i`),
        until `--merge-parts K` joins the shares into `store(model, kind)`."""
        return self.root / model / "parts" / f"{kind}-{part}of{parts}"

    def stage_dir(self, stage: str) -> Path:
        """The folder of a stage added by its script and its `stages.Stage` entry alone,
        which name the files in it: under `stages/`, so that `reserved_names` keeps every
        such folder apart from the models' with no name to add here."""
        return self.root / "stages" / stage

    def blend(self, kind: str) -> Path:
        return self.root / "ensemble" / kind

    def refined(self, kind: str) -> Path:
        """refine.py's store of `kind` "oof" or "test"."""
        return self.root / "refine" / kind

    @property
    def refiners(self) -> Path:
        """refine.py's fold refiners (refinement.save_refiners), for export.py."""
        return self.root / "refine" / "refiners.safetensors"

    @property
    def refine_record(self) -> Path:
        return self.root / "refine" / "refine.json"

    @property
    def weights(self) -> Path:
        return self.root / "ensemble" / "weights.json"

    @property
    def weights_trials(self) -> Path:
        return self.root / "ensemble" / "trials.csv"

    @property
    def postprocess(self) -> Path:
        return self.root / "postprocess.json"

    @property
    def postprocess_trials(self) -> Path:
        return self.root / "tune_trials.csv"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def scores(self) -> Path:
        return self.root / "scores.json"

    @property
    def config(self) -> Path:
        """The experiment's resolved config, as pipeline.py last ran it (compare.py)."""
        return self.root / "config.yaml"

    @property
    def timings(self) -> Path:
        """Seconds each stage took when it last ran (pipeline.py), summed by compare.py."""
        return self.root / "timings.json"

    @property
    def stamps(self) -> Path:
        """Digests of the inputs each stage last ran on (stamps.py), for pipeline.py."""
        return self.root / "stamps.json"

    @property
    def logs(self) -> Path:
        """The fold processes' logs (pipeline.py --parallel, --launcher slurm)."""
        return self.root / "logs"

    @property
    def pipeline_log(self) -> Path:
        """Everything pipeline.py's stages logged and printed; the console keeps one line
        a stage unless -v."""
        return self.logs / "pipeline.log"

    @property
    def wandb(self) -> Path:
        """Where `wandb.init(dir=root)` writes the offline runs (tracking.py)."""
        return self.root / "wandb"

    @property
    def optuna_db(self) -> Path:
        return self.root / "optuna.db"

    @property
    def hpo(self) -> Path:
        return self.root / "hpo"

    def hpo_trial(self, study: str, number: int) -> RunFiles:
        """A search trial's folder: per study, as trial numbers restart in each study."""
        return RunFiles(self.hpo / study / f"trial{number}")

    def hpo_best(self, model: str) -> Path:
        """The best trial as an experiment file with `base:` the searched config."""
        return self.hpo / f"best_{model}.yaml"

    def hpo_trials(self, model: str) -> Path:
        return self.hpo / f"trials_{model}.csv"


@dataclass(frozen=True)
class Reserved:
    """Names the layout itself gives to entries of an experiment folder (`in_experiment`)
    and of out_dir beside the experiments (`in_out_dir`)."""

    in_experiment: frozenset[str]
    in_out_dir: frozenset[str]


_PROBE = "<probe>"


@functools.cache
def reserved_names() -> Reserved:
    """What a model may not be named (its folder would be a stage's) and what an
    experiment may not be named (its folder would be the cache's).

    Read off a probe Layout, every property and every path method called with probe
    arguments, so a path added to Layout is reserved with no second list to keep.
    """
    out_dir = Path("/out")
    layout = Layout(out_dir / _PROBE, out_dir)
    paths: list[Path] = []
    for name, member in vars(Layout).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            paths.append(member.fget(layout))
        elif inspect.isfunction(member):
            params = list(inspect.signature(member, eval_str=True).parameters.values())[1:]
            args = [0 if p.annotation is int else _PROBE for p in params]
            paths.append(member(layout, *args))
    in_experiment, in_out_dir = set(), set()
    for path in paths:
        path = path.dir if isinstance(path, RunFiles) else path
        top = path.relative_to(out_dir).parts[0]
        if top != _PROBE:
            in_out_dir.add(top)
        elif path != layout.root:
            in_experiment.add(path.relative_to(layout.root).parts[0])
    return Reserved(frozenset(in_experiment - {_PROBE}), frozenset(in_out_dir))
