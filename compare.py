"""Is my change real? One table over finished experiments, and the paired intervals.

    python compare.py outputs/demo outputs/demo_epochs32 outputs/demo_3models

Each argument is an experiment folder (`<out_dir>/<experiment>`, as pipeline.py leaves
it). For each: what its config changes against the first one's, each model's out-of-fold
score, what the blend, refinement and post-processing decisions chose and what the
submitted chain scores out of sample (and in sample where it was tuned), the test score
when the data had a `test_gt/`, and the wall time of its stages. Then, for every pair, the
paired per-image difference of the submitted chains' out-of-sample scores with its
bootstrap interval: on 120 images a +0.004 is usually noise, and the interval says so.
Out-of-fold images are compared only when both experiments hold the same images, scored
against the same masks: the same ids with other training masks (a cleaned mask) would
measure the masks, not the change, so such a pair is refused by name. The masks are the
ones the folds trained on, by sha256, as each fold's `recipe.json` records them.
"""

from __future__ import annotations

from workflow import stages

if __name__ == "__main__":
    stages.preflight("compare")

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from chain.decisions import Rule, bootstrap_gain
from chain.evaluation import SUBMITTED, TEST_TABLE, format_rows, read_json
from chain.records import BlendRecord, PostprocessRecord, RefineRecord
from core import invocation
from core.config import ConfigError, reports_environment_errors
from core.paths import Layout
from core.settings import MIN_N_BOOT, DataSettings
from data.reader import DataError
from training.recipe import flatten

# Keys that name where an experiment lives, not what it does.
WHERE = {"experiment", "data_dir", "out_dir"}


def config_of(exp: Path) -> dict[str, Any]:
    """The experiment's resolved config (pipeline.py writes it beside the report)."""
    path = Layout.at(exp).config
    if not path.is_file():
        raise DataError(
            f"{exp}: no {path.name}, which pipeline.py writes when it runs: not an experiment "
            "folder (<out_dir>/<experiment>) of a pipeline run"
        )
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc


def config_diff(base: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs (paths and names left out)."""
    a, b = flatten(base), flatten(other)
    keys = sorted(k for k in set(a) | set(b) if k.split(".")[0] not in WHERE)
    return [
        f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in keys if a.get(k) != b.get(k)
    ]


def training_masks(exp: Path, config: dict[str, Any], models: Sequence[str]) -> dict[str, str]:
    """The sha256 of each training mask by id, from what the folds of `models` record they
    trained on (every training image is in all folds but its own); {} when none records
    it (folds trained before recipe.json held their files, or not kept)."""
    layout = Layout.at(exp)
    masks: dict[str, str] = {}
    for model in models:
        for k in range(DataSettings.from_config(config).n_folds):
            path = layout.fold(model, k).recipe
            if path.is_file():
                masks.update((read_json(path).get("trained_on") or {}).get("masks") or {})
    return masks


def mask_check(a: Experiment, b: Experiment) -> tuple[str, bool]:
    """The pair's "training masks" cell, and whether they differ under common ids."""
    missing = [e.name for e in (a, b) if not e.masks]
    if missing:
        return f"unknown ({', '.join(missing)} records none)", False
    differ = sorted(i for i in a.masks.keys() & b.masks.keys() if a.masks[i] != b.masks[i])
    if not differ:
        return "same", False
    return f"{len(differ)} differ (e.g. {', '.join(differ[:3])})", True


class Experiment:
    """What a finished experiment folder says about itself."""

    def __init__(self, path: Path) -> None:
        self.path = path
        layout = Layout.at(path)
        for needed in (layout.weights, layout.postprocess):
            if not needed.is_file():
                raise DataError(f"{path}: no {needed}; is it a finished experiment?")
        self.config = config_of(path)
        # what a hint about this experiment names: the config it was run with
        invocation.set_context(["--config", str(layout.config)])
        self.blend = BlendRecord.read(layout.weights)
        self.tuned = PostprocessRecord.read(layout.postprocess)
        # the paired per-image difference, and the row of each experiment
        self.tuned.need("oos_image_stats", "image_ids", "chosen", "out_of_sample", "scores")
        self.blend.need("scores")
        refine = layout.refine_record
        self.refine = RefineRecord.read(refine) if refine.is_file() else None
        scores = layout.scores
        self.tables = read_json(scores)["tables"] if scores.is_file() else {}
        timings = layout.timings
        self.seconds = sum(read_json(timings).values()) if timings.is_file() else None
        self.metric = self.tuned.metric
        self.ids = list(self.tuned.image_ids)
        self.masks = training_masks(path, self.config, self.blend.models)
        self.stats = np.asarray(self.tuned.oos_image_stats, np.int64).reshape(-1, 3, 3)

    @property
    def name(self) -> str:
        return self.path.name

    def row(self, base: Experiment) -> dict[str, Any]:
        m = self.metric
        models = self.blend.models
        oof = ", ".join(f"{n} {self.blend.scores[n]['all'][m]:.3f}" for n in models)
        blend = self.blend.decision
        chain = self.tuned.out_of_sample[self.tuned.chosen][m]
        test = next(
            (
                r["competition"]
                for r in self.tables.get(TEST_TABLE, [])
                if r.get("role") == SUBMITTED
            ),
            None,
        )
        diff = config_diff(base.config, self.config) if self is not base else []
        return {
            "experiment": self.name,
            "config vs first": "; ".join(diff) if diff else "-",
            f"models OOF {m} (argmax)": oof,
            "blend": self.blend.chosen
            + (f" {blend.chosen_row.out_of_sample[m]:.4f}" if blend else ""),
            "refine": "-"
            if self.refine is None
            else ("used" if self.tuned.source == "refined" else "not used"),
            "chain": self.tuned.chosen,
            "chain out of sample": chain,
            "tuned in sample": self.tuned.scores["tuned"][m],
            "test": "-" if test is None else test,
            "wall": "-" if self.seconds is None else f"{self.seconds / 60:.1f} min",
        }


def paired_rows(experiments: Sequence[Experiment], rule: Rule) -> list[dict[str, Any]]:
    """Every pair's paired out-of-sample difference (second minus first) with its interval."""
    rows = []
    for a, b in itertools.combinations(experiments, 2):
        masks, differ = mask_check(a, b)
        row: dict[str, Any] = {
            "pair": f"{b.name} - {a.name}",
            "difference": None,
            f"{rule.confidence:.0%} interval": None,
            "images": len(a.ids),
            "training masks": masks,
            "verdict": "not comparable: different images",
        }
        same_images = sorted(a.ids) == sorted(b.ids)
        if same_images and differ:
            row["verdict"] = "not comparable: other training masks under the same ids"
        elif same_images:
            position = {image_id: i for i, image_id in enumerate(b.ids)}
            g = bootstrap_gain(a.stats, b.stats[[position[i] for i in a.ids]], rule)
            row["difference"] = g["gain"]
            row[f"{rule.confidence:.0%} interval"] = f"[{g['low']:+.4f}, {g['high']:+.4f}]"
            row["verdict"] = "real" if g["low"] > 0 or g["high"] < 0 else "within the noise"
        rows.append(row)
    return rows


def check_flags(experiments: Sequence[str], confidence: float, n_boot: int) -> None:
    """The arguments, by their names and before any experiment is read (Rule's own check
    names the config's decide.* keys). One experiment has nothing to compare with: its
    tables came out empty, exit 0."""
    if not 0.0 < confidence < 1.0:  # nan too
        raise ConfigError(f"--confidence {confidence}: must be between 0 and 1, e.g. 0.9")
    if n_boot < MIN_N_BOOT:
        raise ConfigError(f"--n-boot {n_boot}: must be at least {MIN_N_BOOT}")
    if len(experiments) < 2:
        raise ConfigError(
            f"compare.py takes two experiment folders or more (<out_dir>/<experiment>, the "
            f"first the base); got one: {experiments[0]}"
        )


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("compare").parse_args(argv)
    try:
        check_flags(args.experiments, args.confidence, args.n_boot)
        experiments = [Experiment(Path(p)) for p in args.experiments]
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metric = experiments[0].metric
    rule = Rule.default(metric=metric, confidence=args.confidence, n_boot=args.n_boot)
    print(format_rows("Experiments", [e.row(experiments[0]) for e in experiments]), end="\n\n")
    title = f"Submitted chains, paired per-image {metric} out of sample (second - first)"
    print(format_rows(title, paired_rows(experiments, rule)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
