"""recipe.py's fold identity: which settings make a trained fold another recipe. A key left
out lets a fold trained one way be reused as if trained another (e.g. a finished fold kept
after the batch size changed); a key put in throws away folds for nothing."""

from __future__ import annotations

import pytest

from core.config import load_config
from tests.trainkit import DEMO_CONFIG
from training.recipe import fold_recipe, recipe_changes, recipe_hash

MODEL = "unet_mobilenetv3"


def recipe(*overrides: str, model: str = MODEL, split_id: str = "s") -> dict:
    """The demo's fold recipe with `--set`-style overrides (strict: each key must exist)."""
    return fold_recipe(load_config(DEMO_CONFIG, overrides), model, split_id)


@pytest.mark.parametrize(
    "override",
    [
        "train.batch_size=8",
        "train.lr=3.0e-3",
        "train.optimizer.weight_decay=0.0",
        "train.scheduler.pct_start=0.3",
        "train.loss.dice_weight=0.5",
        "train.precision=fp32",
        "train.channels_last=false",
        "data.img_size=[320, 384]",
        "data.augment.affine=0.0",
        "data.paste.p=0.25",
        "data.sampling.green=1",
        "seed=1",
    ],
)
def test_a_setting_that_shapes_the_weights_makes_another_recipe(override: str) -> None:
    old, new = recipe(), recipe(override)
    assert recipe_hash(old) != recipe_hash(new)
    assert [line.split(":")[0] for line in recipe_changes(old, new)] == [override.split("=")[0]]


def test_the_model_entry_and_the_split_are_part_of_the_recipe() -> None:
    base = recipe()
    assert recipe_hash(recipe(split_id="t")) != recipe_hash(base)
    assert recipe_hash(recipe(model="fpn_mobilenetv3")) != recipe_hash(base)
    wider = recipe(f"models.{MODEL}.kwargs.decoder_channels=[128, 64, 32, 16, 8]")
    assert recipe_changes(base, wider) == [
        "model.kwargs.decoder_channels: [64, 32, 24, 16, 8] -> [128, 64, 32, 16, 8]"
    ]


def test_settings_that_do_not_shape_the_weights_keep_the_recipe() -> None:
    # epochs: a fold is extended with --resume; the one-cycle curve that depends on it is
    # checked by optim.check_recipe instead (test_recipe.py)
    quiet = (
        "data.num_workers=4",
        "data.loader_timeout_s=60",
        "train.cpu_threads=2",
        "train.compile=true",
        "train.epochs=60",
        "train.wandb=true",
        "train.deterministic=false",
    )
    assert recipe(*quiet) == recipe()
