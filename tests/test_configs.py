"""The shipped configs are valid: every model they name is in the zoo and builds with the
config's own arguments, and the later stages name only models the config trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import load_config, model_entry
from models import ZOO, build_model, inference
from training.recipe import check_config

CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")
    if p.name != "defaults.yaml"  # the schema every config starts from, not an experiment
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_consistent(path: Path) -> None:
    cfg = load_config(path)
    check_config(cfg)
    names = list(cfg["models"])
    assert set(cfg["ensemble"]["models"]) <= set(names)
    for name in names:
        entry = model_entry(cfg, name)
        assert entry["arch"] in ZOO or entry["arch"].startswith("smp.")
        with torch.device("meta"):  # arguments checked without allocating 100M parameters
            build_model(entry["arch"], pretrained=None, **entry["kwargs"])
    inference.tta_transforms(cfg["predict"]["tta"])  # ConfigError for an unknown TTA


def test_demo_config_trains_two_architectures_on_three_folds() -> None:
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("demo.yaml")])
    archs = {model_entry(cfg, n)["arch"].split("_")[0] for n in cfg["ensemble"]["models"]}
    assert len(archs) >= 2 and cfg["data"]["n_folds"] >= 3
