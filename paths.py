"""Where every artefact of an experiment lives: one place, so the stages cannot disagree.

<out_dir>/cache/                        working-size images and masks (all experiments)
<out_dir>/<experiment>/
    folds.json                          the shared split
    <model>/fold<k>/                    train.py: checkpoints, log, recipe, oof/, and
                                        retries.json + failed_attempt<n>.jsonl if retrained
    <model>/oof, <model>/test           predict.py: the model's probability stores
    ensemble/oof, ensemble/test         ensemble.py: the blend
    refine/oof, refine/test             refine.py: the region-refined blend, and refine.json
    ensemble/weights.json, trials.csv
    postprocess.json, tune_trials.csv   tune.py
    submission.csv                      postprocess.py
    report.html, scores.json            pipeline.py
    config.yaml, timings.json           pipeline.py: the resolved config, stage times
    stamps.json                         pipeline.py: digests of the inputs each stage ran on
    optuna.db                           every study of the experiment
    wandb/                              offline W&B runs (outside the fold folders)
    hpo/<study>/trial<n>/               hpo.py: each trial's config and log (never a fold's)
    hpo/best_<model>.yaml, hpo/trials_<model>.csv
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    """The artefact paths of one experiment (`root` = <out_dir>/<experiment>)."""

    root: Path
    out_dir: Path

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> Layout:
        out_dir = Path(cfg["out_dir"])
        return cls(out_dir / str(cfg["experiment"]), out_dir)

    @property
    def cache(self) -> Path:
        return self.out_dir / "cache"

    @property
    def folds(self) -> Path:
        return self.root / "folds.json"

    def fold(self, model: str, k: int) -> Path:
        return self.root / model / f"fold{k}"

    @property
    def lock(self) -> Path:
        """Held by the pipeline running on this experiment (locks.py)."""
        return self.root / ".lock"

    def fold_lock(self, model: str, k: int) -> Path:
        """Held by the process training this fold; beside the fold's folder, which a
        forced retrain may move away."""
        return self.root / model / f".fold{k}.lock"

    def fold_retries(self, model: str, k: int) -> Path:
        """The failed attempts of a fold that was retrained (train.py, recipe.RetryPolicy)."""
        return self.fold(model, k) / "retries.json"

    def failed_log(self, model: str, k: int, attempt: int) -> Path:
        """The epoch log of a fold's failed attempt, kept when it is retrained."""
        return self.fold(model, k) / f"failed_attempt{attempt}.jsonl"

    def store(self, model: str, kind: str) -> Path:
        """A model's probability store of `kind` "oof" or "test" (predict.py)."""
        return self.root / model / kind

    def blend(self, kind: str) -> Path:
        return self.root / "ensemble" / kind

    def refined(self, kind: str) -> Path:
        """refine.py's store of `kind` "oof" or "test"."""
        return self.root / "refine" / kind

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
    def optuna_db(self) -> Path:
        return self.root / "optuna.db"

    @property
    def hpo(self) -> Path:
        return self.root / "hpo"

    def hpo_trial(self, study: str, number: int) -> Path:
        """A search trial's folder: per study, as trial numbers restart in each study."""
        return self.hpo / study / f"trial{number}"

    def hpo_best(self, model: str) -> Path:
        """The best trial as an experiment file with `base:` the searched config."""
        return self.hpo / f"best_{model}.yaml"

    def hpo_trials(self, model: str) -> Path:
        return self.hpo / f"trials_{model}.csv"
