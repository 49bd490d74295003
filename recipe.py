"""A fold's identity: everything that shapes its weights, so a changed recipe is never reused.

A fold trained with `train.lr: 0.01` must not be skipped as "complete" when the config now
says 0.003, nor continued by `--resume` under the new value; the pipeline would report old
results as new ones. The identity is the model entry, the `train` section, the `data`
section and the seed, plus the split the fold was cut from. Left out, because they change
speed or logging but not the weights: loader workers and timeout, wandb, compile, CPU
threads. `train.epochs` is left out too, so a finished fold can be extended with
`--resume`; train.py refuses that for a schedule whose curve depends on the total
(cosine, one-cycle, poly, or any warm-up), where the old curve cannot be continued.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from config import ConfigError, model_entry
from data.atomic import write_json
from data.reader import DataError

RECIPE_FILE = "recipe.json"

IGNORED = {
    "data.num_workers",
    "data.loader_timeout_s",
    "train.wandb",
    "train.wandb_project",
    "train.compile",
    "train.cpu_threads",
    "train.epochs",
}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves; null and `{}` are dropped, since both mean "the default", as absent does."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {} if node is None else {prefix[:-1]: node}


def fold_recipe(cfg: dict[str, Any], model_name: str, split_id: str) -> dict[str, Any]:
    """The flat {dotted key: value} of everything that shapes a fold's weights."""
    flat = _flatten(
        {
            "model": model_entry(cfg, model_name),
            "train": cfg.get("train") or {},
            "data": cfg.get("data") or {},
            "seed": cfg.get("seed"),
            "split_id": split_id,
        }
    )
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


def refuse_changed(where: str, old: dict[str, Any], new: dict[str, Any], experiment: str) -> None:
    """ConfigError listing what changed and the two ways on, when the recipes differ."""
    changes = recipe_changes(old, new)
    if not changes:
        return
    raise ConfigError(
        f"{where} was trained with another recipe:\n  "
        + "\n  ".join(changes)
        + "\nRetrain it in place with `train.py --force` (or delete that folder), or keep "
        f"both by giving this run a new experiment name (e.g. --set experiment={experiment}_v2)."
    )


def recorded_recipe(fold_dir: Path) -> dict[str, Any] | None:
    """The recipe a fold folder was trained with, or None for a folder never trained."""
    path = fold_dir / RECIPE_FILE
    trained = any((fold_dir / n).exists() for n in ("last.pt", "best.pt"))
    if not trained:
        # A fold that failed before its first checkpoint has nothing to protect.
        return None
    if not path.exists():
        raise ConfigError(
            f"{fold_dir} holds checkpoints but no {RECIPE_FILE}, so its recipe is unknown; "
            "retrain it with `train.py --force` or use a new experiment name"
        )
    try:
        return json.loads(path.read_text())["recipe"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); retrain the fold with --force") from exc


def check_fold(
    fold_dir: Path, recipe: dict[str, Any], experiment: str, compare_split: bool = True
) -> None:
    """Refuse a fold folder made with another recipe (or split, when `compare_split`)."""
    old = recorded_recipe(fold_dir)
    if old is None:
        return
    if not compare_split:
        old = {k: v for k, v in old.items() if k != "split_id"}
        recipe = {k: v for k, v in recipe.items() if k != "split_id"}
    refuse_changed(str(fold_dir), old, recipe, experiment)


def write_recipe(fold_dir: Path, recipe: dict[str, Any]) -> None:
    write_json(fold_dir / RECIPE_FILE, {"recipe_hash": recipe_hash(recipe), "recipe": recipe})
