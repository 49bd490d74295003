"""Offline encoders: `python -m models.weights` writes what a config's ImageNet models need,
and `pretrained_dir` makes training read them instead of a hub. No hub here, so the
encoders are written from random initialisation (`--random-init`), as the README's
rehearsal does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from core.config import ConfigError, build_entry, load_config
from models import build_model
from models.inference import NUM_CLASSES, load_checkpoint
from models.pretrained import read_state_dict
from models.weights import main
from tests.trainkit import fold_path, run_main, write_config
from training.recipe import fold_recipe


def offline_config(tmp_path: Path, tiny_data: Path) -> Path:
    """The tiny experiment whose model asks for ImageNet weights, beside one that does not."""
    path = write_config(tmp_path, tiny_data, epochs=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["models"]["tiny"]["pretrained"] = "imagenet"
    cfg["models"]["scratch"] = {**cfg["models"]["tiny"], "pretrained": None}
    cfg["ensemble"] = {"models": ["tiny"]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_command_writes_each_imagenet_encoder_and_training_reads_it_offline(
    tmp_path: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    config = offline_config(tmp_path, tiny_data)
    encoders = tmp_path / "encoders"
    assert main(["--config", str(config), "--out", str(encoders), "--random-init"]) == 0
    assert sorted(p.name for p in encoders.iterdir()) == ["tiny.safetensors"]
    assert "1 encoders" in capsys.readouterr().out

    cfg = load_config(config, [f"pretrained_dir={encoders}"])
    entry = build_entry(cfg, "tiny")
    assert entry["pretrained"] == str(encoders / "tiny.safetensors")
    assert build_entry(cfg, "scratch")["pretrained"] is None
    model = build_model(
        entry["arch"], num_classes=NUM_CLASSES, pretrained=entry["pretrained"], **entry["kwargs"]
    )
    saved = read_state_dict(encoders / "tiny.safetensors")
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # the fold's identity is the imagenet one, wherever the file lies
    assert fold_recipe(cfg, "tiny", "s") == fold_recipe(load_config(config), "tiny", "s")

    # a fold trains from the file with every hub out of reach
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_main(config, "--fold", "0", "--set", f"pretrained_dir={encoders}") == 0
    assert load_checkpoint(fold_path(tmp_path) / "best.pt")["epoch"] == 1


def test_a_missing_encoder_file_names_the_command_that_writes_it(
    tmp_path: Path, tiny_data: Path
) -> None:
    cfg = load_config(offline_config(tmp_path, tiny_data), [f"pretrained_dir={tmp_path}"])
    with pytest.raises(
        ConfigError, match=r"tiny\.safetensors not found.*python -m models\.weights"
    ):
        build_entry(cfg, "tiny")


def test_an_unknown_model_is_refused_before_any_download(tmp_path: Path, tiny_data: Path, capsys):
    config = offline_config(tmp_path, tiny_data)
    assert main(["--config", str(config), "--out", str(tmp_path / "e"), "--models", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
