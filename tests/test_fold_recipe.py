"""recipe.py's fold identity: which settings make a trained fold another recipe. A key left
out lets a fold trained one way be reused as if trained another (e.g. a finished fold kept
after the batch size changed); a key put in throws away folds for nothing."""

from __future__ import annotations

import copy

import pytest

from config import load_config
from recipe import fold_recipe, recipe_changes, recipe_hash
from tests.trainkit import DEMO_CONFIG

MODEL = "unet_mobilenetv3"


def demo() -> dict:
    return load_config(DEMO_CONFIG)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.batch_size", 8),
        ("train.lr", 3.0e-3),
        ("train.optimizer.weight_decay", 0.0),
        ("train.scheduler.pct_start", 0.3),
        ("train.loss.dice_weight", 0.5),
        ("train.amp", False),
        ("train.channels_last", False),
        ("data.img_size", [320, 384]),
        ("data.augment.affine", 0.0),
        ("data.paste.p", 0.25),
        ("data.sampling.green", 1),
        ("seed", 1),
    ],
)
def test_a_setting_that_shapes_the_weights_makes_another_recipe(key: str, value) -> None:
    cfg = demo()
    changed = copy.deepcopy(cfg)
    *parents, leaf = key.split(".")
    node = changed
    for part in parents:
        node = node[part]
    assert node[leaf] != value
    node[leaf] = value
    old, new = fold_recipe(cfg, MODEL, "s"), fold_recipe(changed, MODEL, "s")
    assert recipe_hash(old) != recipe_hash(new)
    assert [line.split(":")[0] for line in recipe_changes(old, new)] == [key]


def test_the_model_entry_and_the_split_are_part_of_the_recipe() -> None:
    cfg = demo()
    base = fold_recipe(cfg, MODEL, "s")
    assert recipe_hash(fold_recipe(cfg, MODEL, "t")) != recipe_hash(base)
    assert recipe_hash(fold_recipe(cfg, "fpn_mobilenetv3", "s")) != recipe_hash(base)
    wider = copy.deepcopy(cfg)
    wider["models"][MODEL]["kwargs"]["decoder_channels"] = [128, 64, 32, 16, 8]
    assert recipe_changes(base, fold_recipe(wider, MODEL, "s")) == [
        "model.kwargs.decoder_channels: [64, 32, 24, 16, 8] -> [128, 64, 32, 16, 8]"
    ]


def test_settings_that_do_not_shape_the_weights_keep_the_recipe() -> None:
    cfg = demo()
    other = copy.deepcopy(cfg)
    other["data"]["num_workers"] = 4
    other["data"]["loader_timeout_s"] = 60
    # epochs: a fold is extended with --resume; the one-cycle curve that depends on it is
    # checked by optim.check_recipe instead (test_recipe.py)
    other["train"].update(cpu_threads=2, compile=True, epochs=60, wandb=True, deterministic=False)
    assert fold_recipe(other, MODEL, "s") == fold_recipe(cfg, MODEL, "s")
