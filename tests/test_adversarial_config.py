"""Adversarial names, numbers and encoders (issue 39, items 6, 10 and 11): each is refused
where the config or the flags are read, in one line naming the key or flag and the value,
exit 2, before any folder is made; or it gets its natural behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

import compare
import paths
import pipeline
import predict
import train
from config import ConfigError, load_config
from models import PretrainedWeightsError, build_model, export_encoder, weights
from paths import Layout
from tests.test_compare import experiment as finished_by_hand
from tests.trainkit import demo_model, write_config


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """What the command printed on stderr, which must be one `error:` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def config_named(tmp_path: Path, data: Path, model: str = "tiny", **top: object) -> Path:
    """The tiny experiment's config with its model called `model` and `top` keys set."""
    path = write_config(tmp_path, data, epochs=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["models"] = {model: cfg["models"]["tiny"]}
    cfg.update(top)
    path.write_text(yaml.safe_dump(cfg))
    return path


def made_nothing(tmp_path: Path) -> bool:
    """Nothing beside the config in tmp_path, and nothing escaped to its parent."""
    return [p.name for p in tmp_path.iterdir()] == ["tiny.yaml"] and not any(
        (tmp_path.parent / name).exists() for name in ("escaped", "evil")
    )


@pytest.mark.parametrize(
    "name", ["../../escaped", "../escaped", "a/b", "a\\b", ".hidden", "..", "cache", "''"]
)
def test_an_experiment_that_is_not_one_plain_folder_is_refused_before_any_folder(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    config = str(write_config(tmp_path, tiny_data))
    assert pipeline.main(["--config", config, "--set", f"experiment={name}"]) == 2
    line = one_error_line(capsys)
    expected = f"experiment {name!r}:" if name != "''" else "missing key 'experiment'"
    assert expected in line
    assert made_nothing(tmp_path)


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "a\\b", ".x", "ensemble", "Refine", "hpo", "logs", "wandb"]
)
def test_a_model_name_that_is_a_path_or_a_stage_folder_is_refused_by_every_stage(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    config = str(config_named(tmp_path, tiny_data, model=name))
    assert pipeline.main(["--config", config]) == 2
    assert f"models key {name!r}:" in one_error_line(capsys)
    assert train.main(["--config", config, "--model", name, "--fold", "0"]) == 2
    assert f"models key {name!r}:" in one_error_line(capsys)
    assert made_nothing(tmp_path)


def test_a_blended_model_is_checked_too_and_plain_names_pass(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"ensemble": {"models": ["../x"]}}))
    with pytest.raises(ConfigError, match=r"ensemble.models entry '\.\./x'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"experiment 'logs/x'"):
        load_config(path, ["ensemble.models=[a]", "experiment=logs/x"])
    path.write_text(yaml.safe_dump({"models": {"unet.v2_1-a": {"arch": "unet"}}}))
    # a model may be named like a folder inside another one's (parts, fold0, oof)
    cfg = load_config(path, ["experiment=run.1", "+models.parts={arch: unet}"])
    assert set(cfg["models"]) == {"unet.v2_1-a", "parts"}


def test_the_reserved_names_are_read_off_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    reserved = paths.reserved_names()
    assert {"ensemble", "refine", "hpo", "logs", "config.yaml", "folds.json"} <= (
        reserved.in_experiment
    )
    assert reserved.in_out_dir == {"cache", "plan_calibration.json"}
    # a stage folder added to the layout is reserved with no list to update
    monkeypatch.setattr(Layout, "extra", property(lambda self: self.root / "extra" / "x"), False)
    paths.reserved_names.cache_clear()
    try:
        assert "extra" in paths.reserved_names().in_experiment
    finally:
        monkeypatch.undo()
        paths.reserved_names.cache_clear()
    assert "extra" not in paths.reserved_names().in_experiment


def test_an_unknown_timm_encoder_is_one_line_with_the_nearest_names_before_any_work(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path, tiny_data))
    typo = ["--set", "models.tiny.kwargs.encoder_name=tu-mobilenetv3_smal_100"]
    for main, extra in (
        (pipeline.main, ["--plan"]),
        (train.main, ["--model", "tiny", "--fold", "0"]),
    ):
        assert main(["--config", config, *typo, *extra]) == 2
        line = one_error_line(capsys)
        assert "models.tiny: unknown encoder_name 'tu-mobilenetv3_smal_100'" in line
        assert "did you mean 'tu-mobilenetv3_small_100'" in line
        assert made_nothing(tmp_path)  # no cache, no split


@pytest.mark.parametrize(
    "arch, encoder, nearest",
    [("smp.Unet", "resnet343", "resnet34"), ("pranet", "res2net50_26w_4x", "res2net50_26w_4s")],
)
def test_every_zoo_builder_names_an_unknown_encoder(arch: str, encoder: str, nearest: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown encoder_name '{encoder}'.*'{nearest}'"):
        build_model(arch, encoder_name=encoder)


def test_an_unknown_smp_architecture_is_named(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": {"m": {"arch": "smp.Unett"}}}))
    args = ["--config", str(config), "--out", str(tmp_path / "enc"), "--models", "m"]
    assert weights.main(args) == 2
    assert "unknown smp architecture 'Unett'" in one_error_line(capsys)


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--confidence", "1.5"], "--confidence 1.5: must be between 0 and 1"),
        (["--confidence", "0"], "--confidence 0.0: must be between 0 and 1"),
        (["--confidence", "nan"], "--confidence nan: must be between 0 and 1"),
        (["--n-boot", "0"], "--n-boot 0: must be at least 100"),
        (["--n-boot", "-5"], "--n-boot -5: must be at least 100"),
    ],
)
def test_compare_refuses_an_interval_it_cannot_draw_by_its_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], said: str
) -> None:
    a, b = (finished_by_hand(tmp_path, name, 24, [0.5, 0.7, 0.9]) for name in "ab")
    assert compare.main([str(a), str(b), *flags]) == 2
    assert said in one_error_line(capsys)
    # checked first: no experiment needs to be read to say so
    assert compare.main([str(tmp_path / "none"), *flags]) == 2
    assert said in one_error_line(capsys)


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--num-parts", "0"], "--num-parts 0: must be at least 1"),
        (["--num-parts", "-2", "--part-id", "0"], "--num-parts -2: must be at least 1"),
        (["--num-parts", "2", "--part-id", "2"], "--part-id 2 is not in 0..1"),
        (["--part-id", "1"], "--part-id 1 is not in 0..0"),
        (["--merge-parts", "2", "--num-parts", "2"], "takes no --num-parts"),
        (["--merge-parts", "2", "--part-id", "0"], "takes no --part-id"),
        (["--merge-parts", "1"], "--merge-parts 1: must be at least 2"),
        (["--merge-parts", "0"], "--merge-parts 0: must be at least 2"),
    ],
)
def test_predict_refuses_shares_that_mean_nothing_before_any_work(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], flags, said
) -> None:
    config = str(write_config(tmp_path, tiny_data))
    assert predict.main(["--config", config, "--model", "tiny", *flags]) == 2
    assert said in one_error_line(capsys)
    assert made_nothing(tmp_path)


def test_a_pretrained_file_holding_a_sliver_of_the_encoder_is_refused(tmp_path: Path) -> None:
    # resnet18's tensors all sit, with their shapes, inside resnet34: 100 of its 180
    small = build_model("unet", encoder_name="resnet18")
    path = export_encoder(small, tmp_path / "resnet18.safetensors")
    with pytest.raises(
        PretrainedWeightsError,
        match=r"resnet18\.safetensors: holds only 100 of the encoder's 180 weight tensors",
    ):
        build_model("unet", encoder_name="resnet34", pretrained=path)
    # one tensor of the demo's encoder, as the issue found
    arch, kwargs = demo_model()["arch"], demo_model()["kwargs"]
    name, tensor = next(iter(build_model(arch, **kwargs).encoder.state_dict().items()))
    save_file({name: tensor.contiguous()}, str(tmp_path / "one.safetensors"))
    with pytest.raises(PretrainedWeightsError, match=r"one\.safetensors: holds only 1 of"):
        build_model(arch, pretrained=tmp_path / "one.safetensors", **kwargs)
