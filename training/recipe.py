"""A fold's identity: everything that shapes its weights, so a changed recipe is never reused.

A fold trained with `train.lr: 0.01` must not be skipped as "complete" when the config now
says 0.003, nor continued by `--resume` under the new value; the pipeline would report old
results as new ones. The identity is the model entry, the `train` section, the `data`
section and the seed, plus the split the fold was cut from. Left out, because they change
speed or logging but not the weights: loader workers and timeout, wandb, compile, CPU
threads. `train.epochs` is left out too, so a finished fold can be extended with
`--resume`; train.py refuses that for a schedule whose curve depends on the total
(cosine, one-cycle, poly, or any warm-up), where the old curve cannot be continued.

The other half of the identity is the data: the sha256 of every image and mask the fold
trained on, recorded beside the recipe. A changed recipe is the user's choice and is
refused; a changed training file (a cleaned mask) only makes the fold stale, and
train.py retrains it from scratch, saying which files changed, never resuming onto them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.config import ConfigError, recipe_sections, replaced
from core.invocation import rerun_hint, retrain_hint
from core.metrics import OBJECTIVES
from core.paths import RunFiles
from core.runtime import derive_seed
from core.settings import DataSettings, ExperimentSettings, RetrySettings, TrainSettings, layout_of
from data.atomic import write_json
from data.augment import transforms_for
from data.folds import resplit
from data.prepare import TrainData
from data.reader import DataError, MaskThresholds
from models.losses import SegLoss
from training.optim import check_recipe

log = logging.getLogger(__name__)

# Mixed into a retrained fold's seed, so its stream differs from every ordinary seed's.
_RETRY_SALT = 7919

IGNORED = {
    "data.num_workers",
    "data.loader_timeout_s",
    "train.wandb",
    "train.wandb_project",
    "train.compile",
    "train.cpu_threads",
    "train.deterministic",
    "train.epochs",
    "train.keep_last",
    "train.half_best",
}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves; null and `{}` are dropped, since both mean "the default", as absent does."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {} if node is None else {prefix[:-1]: node}


def fold_recipe(cfg: dict[str, Any], model_name: str, split_id: str) -> dict[str, Any]:
    """The flat {dotted key: value} of everything that shapes a fold's weights."""
    flat = flatten({**recipe_sections(cfg, model_name), "split_id": split_id})
    return {k: v for k, v in sorted(flat.items()) if k not in IGNORED}


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each key that differs (added and removed keys included)."""
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = [("(unset)" if v is missing else json.dumps(v, default=str)) for v in (a, b)]
            lines.append(f"{key}: {show[0]} -> {show[1]}")
    return lines


def two_ways_on(run: RunFiles) -> str:
    """The two commands on from a fold this run cannot reuse: retrain it in place, or keep
    it by running under a new experiment name (the same command, one `--set` added). The
    fold's folder is `<out_dir>/<experiment>/<model>/fold<k>` (paths.Layout.fold)."""
    experiment = run.dir.parent.parent.name
    return (
        f"retrain it in place: {retrain_hint(run.dir)}; or keep both under a new experiment "
        f"name: {rerun_hint('--set', f'experiment={experiment}_v2')}"
    )


def refuse_changed(run: RunFiles, old: dict[str, Any], new: dict[str, Any]) -> None:
    """ConfigError listing what changed and the two ways on, when the recipes differ."""
    changes = recipe_changes(old, new)
    if not changes:
        return
    raise ConfigError(
        f"{run.dir} was trained with another recipe:\n  "
        + "\n  ".join(changes)
        + f"\nEither {two_ways_on(run)}"
    )


def recorded_recipe(run: RunFiles) -> dict[str, Any] | None:
    """The recipe a fold folder was trained with, or None for a folder never trained."""
    doc = _recorded(run)
    return None if doc is None else doc["recipe"]


def _recorded(run: RunFiles) -> dict[str, Any] | None:
    """A trained fold folder's recipe.json, or None for a folder never trained."""
    path = run.recipe
    trained = run.last.exists() or run.best.exists()
    if not trained:
        # A fold that failed before its first checkpoint has nothing to protect.
        return None
    if not path.exists():
        raise ConfigError(
            f"{run.dir} holds checkpoints but no {path.name}, so its recipe is unknown; "
            + two_ways_on(run)
        )
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc["recipe"], dict):
            raise TypeError("its recipe is not a mapping")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); {two_ways_on(run)}") from exc
    return doc


def check_fold(run: RunFiles, recipe: dict[str, Any], compare_split: bool = True) -> None:
    """Refuse a fold folder made with another recipe (or split, when `compare_split`)."""
    old = recorded_recipe(run)
    if old is None:
        return
    if not compare_split:
        old = {k: v for k, v in old.items() if k != "split_id"}
        recipe = {k: v for k, v in recipe.items() if k != "split_id"}
    refuse_changed(run, old, recipe)


def write_recipe(
    run: RunFiles, recipe: dict[str, Any], trained_on: dict[str, dict[str, str | None]]
) -> None:
    """The fold's identity: its recipe and the sha256 of the files it trains on
    (`TrainData.trained_on`), written before its first epoch so a partial fold has it too."""
    write_json(
        run.recipe,
        {"recipe_hash": recipe_hash(recipe), "recipe": recipe, "trained_on": trained_on},
    )


def stale_training_data(run: RunFiles, data: TrainData, model_name: str, fold: int) -> str | None:
    """The log line of a trained fold whose training images or masks changed since it
    trained ("unet fold 1: retraining, its training data changed since it trained: 1 mask
    (train_gt/ab12.jpeg)"), or None when they did not or it never trained."""
    changes = training_data_changes(run, data, model_name, fold)
    if changes is None:
        return None
    name = f"{model_name} fold {fold}"
    return f"{name}: retraining, its training data changed since it trained: {changes}"


def training_data_changes(run: RunFiles, data: TrainData, model_name: str, fold: int) -> str | None:
    """What changed in a trained fold's training images and masks since it trained ("1
    mask (train_gt/ab12.jpeg)"), or None when nothing did or it never trained.

    A fold trained before recipe.json recorded its files is taken as trained on today's:
    they are recorded now, with a warning that names the retrain command, rather than
    retraining every fold of an older experiment unasked.
    """
    doc = _recorded(run)
    if doc is None:
        return None
    name = f"{model_name} fold {fold}"
    if "trained_on" not in doc:
        log.warning(
            "%s: %s does not record the files it trained on (it predates that record); "
            "recording today's. If a training image or mask changed since, retrain it: %s",
            name,
            run.recipe,
            retrain_hint(run.dir),
        )
        write_json(run.recipe, {**doc, "trained_on": data.trained_on(fold)})
        return None
    return data.changes(doc["trained_on"], fold)


# ------------------------------------------------------------------ checks before any work


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config key {dotted!r} is missing")
        node = node[part]
    return node


def check_config(cfg: dict[str, Any]) -> None:
    """Fail before any work on values that would only break hours later."""
    for key in ("experiment", "data_dir", "out_dir", "seed"):
        _get(cfg, key)
    data = DataSettings.from_config(cfg)
    train = TrainSettings.from_config(cfg)
    check_recipe(train)
    check_loss_args(train.loss)
    if train.best_metric not in OBJECTIVES:
        raise ConfigError(
            f"train.best_metric {train.best_metric!r}: choose one of {', '.join(OBJECTIVES)}"
        )
    MaskThresholds.from_mapping(data.mask)
    transforms_for(data, train=True)


def check_loss_args(loss_cfg: dict[str, Any]) -> None:
    """`train.loss` keys against SegLoss's arguments, before any data is read."""
    accepted = set(inspect.signature(SegLoss).parameters)
    unknown = sorted(set(loss_cfg) - accepted)
    if unknown:
        raise ConfigError(
            f"train.loss takes no {unknown}; it accepts " + ", ".join(sorted(accepted))
        )


def parse_folds(spec: str, n_folds: int) -> list[int]:
    """`all`, `3` or `0,2` -> fold indices, each checked against the config's n_folds."""
    if spec.strip().lower() == "all":
        return list(range(n_folds))
    folds: list[int] = []
    for part in spec.split(","):
        try:
            k = int(part)
        except ValueError:
            raise ConfigError(f"--fold {spec!r}: expected 'all', K or K1,K2,...") from None
        if not 0 <= k < n_folds:
            raise ConfigError(f"--fold {k} is out of range: data.n_folds is {n_folds}")
        if k not in folds:
            folds.append(k)
    return folds


def check_recipes_early(cfg: dict[str, Any], model_name: str, folds: Sequence[int]) -> None:
    """Before any data is read: refuse folds made with another recipe or split.

    The split is compared when `folds.json` exists; otherwise it is compared once the
    new split is made (train_fold), so a changed recipe still fails before any work.
    """
    layout = layout_of(cfg)
    path = layout.folds
    split_id = None
    if path.exists():
        try:
            split_id = json.loads(path.read_text())["split_id"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a readable folds file ({exc}); {resplit(path)}") from exc
    recipe = fold_recipe(cfg, model_name, split_id or "")
    for k in folds:
        check_fold(layout.fold(model_name, k), recipe, bool(split_id))


# ------------------------------------------------------------------ failed folds


@dataclass(frozen=True)
class RetryPolicy(RetrySettings):
    """The config's `retry:` section: when a trained fold counts as failed, and the remedy.

    A fold fails when its best validation score never beats predicting nothing, or when
    its gain over predicting nothing trails the median of its model's other folds by more
    than `margin` (engine.fold_verdict). It is then retrained, up to `attempts` times, each
    time with a new seed (`reseed`) and the peak learning rate times `lr_scale`;
    `attempts: 0` only warns. A fold under predicting nothing is retrained only when another
    fold of its model beat it: otherwise the recipe is the limit, not the seed, and the fold
    is kept with a warning naming what to change. The remedy is a function of the config
    and the attempt, so a retrained fold is as reproducible as any other, and it is not
    part of the fold's recipe identity.
    """

    def remedy(self, cfg: dict[str, Any], attempt: int) -> dict[str, Any]:
        """The config attempt `attempt` trains with (attempt 0: `cfg` itself)."""
        if attempt == 0:
            return cfg
        values: dict[str, Any] = {
            "train.lr": TrainSettings.from_config(cfg).lr * self.lr_scale**attempt
        }
        if self.reseed:
            seed = ExperimentSettings.from_config(cfg).seed
            values["seed"] = derive_seed(seed, _RETRY_SALT, attempt)
        return replaced(cfg, values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_fold_checkpoint(
    ckpt: dict[str, Any],
    run: RunFiles,
    fold: int,
    split_id: str,
    size: list[int],
    model_name: str,
    arch: str,
) -> None:
    """Refuse a checkpoint that would give leaked, mis-sized or mislabelled maps.

    A checkpoint copied from another fold folder has seen this fold's validation images;
    one from another recipe (learning rate, seed, ...) is not the model its folder's
    `recipe.json` describes, which train.py checks against the config.
    """
    path = run.best
    if (ckpt.get("model_name"), ckpt.get("arch")) != (model_name, arch):
        raise DataError(
            f"{path} is a checkpoint of {ckpt.get('model_name')} ({ckpt.get('arch')}), not of "
            f"{model_name} ({arch}); it was copied into the wrong fold folder"
        )
    if ckpt["split_id"] != split_id:
        raise DataError(
            f"{path} was trained on split {ckpt['split_id']} but folds.json is split {split_id}"
        )
    if ckpt.get("fold") != fold:
        raise DataError(
            f"{path} was trained as fold {ckpt.get('fold')}, not fold {fold}: it has seen "
            f"this fold's validation images; put it back, or retrain fold {fold}: "
            f"{retrain_hint(run.dir)}"
        )
    folder = recorded_recipe(run)
    if ckpt.get("recipe_hash") != recipe_hash(folder or {}):
        raise DataError(
            f"{path} was trained with another recipe than {run.recipe} records"
            f" (recipe hash {ckpt.get('recipe_hash')}, the folder's {recipe_hash(folder or {})}); "
            f"retrain the fold: {retrain_hint(run.dir)}"
        )
    trained = list(DataSettings.from_config(ckpt["config"]).img_size)
    if trained != list(size):
        raise ConfigError(f"{path} was trained at {trained} but data.img_size is {size}")
