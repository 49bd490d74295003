"""Helpers shared by the train/DDP/predict tests: a tiny experiment config and readers of
what train.py writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

import pipeline
import train
from core.config import load_config, model_entry
from core.runtime import Dist
from data.cache import CachedItem
from data.prepare import prepare_train_data

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def demo_model(name: str = "unet_mobilenetv3") -> dict:
    """A light model as configs/demo.yaml declares it ({"arch", "kwargs", "pretrained"})."""
    entry = model_entry(load_config(DEMO_CONFIG), name)
    return {"arch": entry["arch"], "kwargs": entry["kwargs"], "pretrained": None}


def write_config(tmp_path: Path, data_dir: Path, **train_cfg) -> Path:
    """A tiny experiment: 64x64 images, 2 folds, a light UNet, in-process loading."""
    cfg = {
        "experiment": "tiny",
        "data_dir": str(data_dir),
        "out_dir": str(tmp_path / "out"),
        "seed": 0,
        "data": {
            "img_size": [64, 64],
            "n_folds": 2,
            "fold_seed": 0,
            "num_workers": 0,
            "mask": {},
            "augment": {},
        },
        "train": {
            "epochs": 2,
            "batch_size": 2,
            "lr": 3e-3,
            "weight_decay": 0.0,
            "lr_step": 1,
            "lr_gamma": 0.5,
            "loss": {},
            "precision": "fp32",
            "compile": False,
            "wandb": False,
            "cpu_threads": 1,  # 2 threads on a busy 2-core machine thrash
            # the resume tests read a finished fold's last.pt; the default (drop it) is
            # tested in test_train
            "keep_last": True,
            **train_cfg,
        },
        "models": {"tiny": demo_model()},
        "predict": {"tta": "none", "batch_size": 4},
        # tiny models trained for an epoch or two rarely beat predicting nothing: the tests
        # of the retry policy switch it on themselves
        "retry": {"attempts": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def best_only_at(epoch: int):
    """A `train.fit` that calls only `epoch` (1-based) the best, whatever it scored: for
    tests whose point needs best.pt to come from a given epoch (monkeypatch it in)."""
    real = train.fit

    def fit(cfg, learner, loaders, fold, dist, name, state):
        for record in real(cfg, learner, loaders, fold, dist, name, state):
            record["best"] = state.epoch == epoch
            yield record

    return fit


def fold_path(tmp_path: Path, fold: int = 0) -> Path:
    return tmp_path / "out" / "tiny" / "tiny" / f"fold{fold}"


def train_items(config: Path) -> dict[str, CachedItem]:
    """The cached working-size items of a config's train set, by id."""
    dist = Dist(rank=0, world_size=1, device=torch.device("cpu"))
    data = prepare_train_data(load_config(config), dist)
    return {it.id: it for it in data.items}


def run_main(config: Path, *args: str) -> int:
    return train.main(["--config", str(config), "--model", "tiny", *args])


def split_of(tmp_path: Path) -> dict[str, int]:
    return json.loads((tmp_path / "out" / "tiny" / "folds.json").read_text())["folds"]


def history(fold_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (fold_dir / "log.jsonl").read_text().splitlines()]


def finished_experiment(root: Path, data_dir: Path) -> Path:
    """A finished two-model experiment in `root` (its own copy of `data_dir`): flip TTA, a
    refiner, the pipeline run on it. What export and infer are tested on."""
    data = Path(shutil.copytree(data_dir, root / "data"))
    config = write_config(root, data, epochs=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["models"]["tiny2"] = demo_model("fpn_mobilenetv3")
    cfg["predict"]["tta"] = "hflip"
    cfg["ensemble"] = {"models": ["tiny", "tiny2"], "trials": 3, "objective": "competition"}
    cfg["tune"] = {"trials": 3, "objective": "competition"}
    cfg["refine"] = {"enabled": True, "crop": 16, "epochs": 2, "batch_size": 8, "width": 4}
    config.write_text(yaml.safe_dump(cfg))
    assert pipeline.main(["--config", str(config)]) == 0
    return root
