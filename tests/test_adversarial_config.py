"""Adversarial names, numbers and encoders (issue 39, items 6, 10 and 11): each is refused
where the config or the flags are read, in one line naming the key or flag and the value,
exit 2, before any folder is made; or it gets its natural behaviour."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import compare
import pipeline
import predict
import train
from core import paths
from core.config import ConfigError, load_config, resolve_cli_config
from core.paths import Layout
from core.runtime import Dist
from data.prepare import prepare_train_data
from models import PretrainedWeightsError, build_model, export_encoder, weights
from tests.test_compare import experiment as finished_by_hand
from tests.trainkit import demo_model, write_config
from workflow import planning, stages


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """What the command printed on stderr, which must be one `error:` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def config_named(tmp_path: Path, data: Path, model: str) -> Path:
    """The tiny experiment's config with its model called `model`."""
    path = write_config(tmp_path, data, epochs=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["models"] = {model: cfg["models"]["tiny"]}
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
    config = str(config_named(tmp_path, tiny_data, name))
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


@pytest.mark.parametrize("hours, shown", [("0", "0"), ("-1", "-1"), ("nan", "nan"), ("inf", "inf")])
def test_a_budget_must_be_a_positive_number_of_hours(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], hours: str, shown: str
) -> None:
    config = str(write_config(tmp_path, tiny_data))
    assert pipeline.main(["--config", config, "--budget-hours", hours]) == 2
    line = one_error_line(capsys)
    assert f"--budget-hours {shown}: must be a positive number of hours" in line
    assert made_nothing(tmp_path)


def small_plan(epochs: int = 10) -> planning.Plan:
    """Two models of 5 folds: 26 s per epoch over all folds, 17 s of predicting and OOF."""
    calibration = planning.Calibration(step_s=0.5, predict_s=0.01, params=10**6)
    models = [planning.ModelPlan(n, 5, epochs, 80, 20, 8, calibration) for n in ("a", "b")]
    return planning.Plan(models, 2, 2, 40, 4, {"best weights": 10**9}, 10**12)


def advice(problem: str) -> list[str]:
    """The `--set KEY=VALUE` settings an over-budget line advises, as the shell passes them."""
    words = shlex.split(problem.replace("(", " ").replace(")", " ").replace(";", " "))
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


@pytest.mark.parametrize("budget_s", [180.0, 60.0, 44.0])
def test_the_budget_advice_is_a_setting_the_same_command_accepts_and_then_fits(
    tmp_path: Path, budget_s: float
) -> None:
    (problem,) = planning.over_budget(small_plan(), budget_h=budget_s / 3600)
    settings = advice(problem)
    epochs = [s for s in settings if s.startswith("train.epochs=")]
    assert epochs, problem
    cfg = load_config(write_config(tmp_path, tmp_path), settings)  # accepted as typed
    fitted = small_plan(cfg["train"]["epochs"])
    assert planning.over_budget(fitted, budget_h=budget_s / 3600) == []
    # the most that fits: one epoch more does not
    assert planning.over_budget(small_plan(cfg["train"]["epochs"] + 1), budget_s / 3600)
    assert cfg["ensemble"]["models"] == ["b"]  # the other advice, parsed the same way


def test_a_budget_no_epoch_count_meets_says_so_instead_of_zero_epochs() -> None:
    (problem,) = planning.over_budget(small_plan(), budget_h=30 / 3600)  # 1 epoch: 43 s
    assert "no epoch count does (1 epoch per fold: 43.0 s)" in problem
    assert "train.epochs" not in problem and "x0" not in problem and "x-" not in problem


def test_the_plan_counts_only_what_is_left_so_a_finished_run_fits_any_budget(
    tmp_path: Path, tiny_data_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny_data_copy, epochs=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["tune"] = {"trials": 3}
    config.write_text(yaml.safe_dump(cfg))
    base = ["--config", str(config)]
    assert pipeline.main(base) == 0
    capsys.readouterr()
    # the next session runs the same command: nothing is left, so no budget refuses it
    assert pipeline.main([*base, "--budget-hours", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert "tiny | 1 | 12 |" in out and "| 0 of 2" in out
    assert "(nothing left to train or predict)" in out and "Stages of this call" in out
    # what is left of a cut run: one fold gone, and two more epochs for the other
    fold1 = tmp_path / "out" / "tiny" / "tiny" / "fold1"
    shutil.rmtree(fold1)
    assert pipeline.main([*base, "--plan", "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "| 2 of 2" in out and "predict (test maps, every fold, TTA; 1 of 1 models)" in out

    def unfinished(*overrides: str) -> tuple[int, ...]:
        args = stages.parser("pipeline").parse_args([*base, *(f"--set={o}" for o in overrides)])
        model_cfg = resolve_cli_config(args, model="tiny")
        data = prepare_train_data(model_cfg, Dist(0, 1, torch.device("cpu")))
        return planning.unfinished_folds(model_cfg, "tiny", data)

    assert unfinished("train.epochs=3") == (1, 0)  # fold 0 resumes after its epoch
    # a mask fold 0 trained on, edited (its bytes, not its pixels): fold 0 starts again
    split = json.loads((tmp_path / "out" / "tiny" / "folds.json").read_text())["folds"]
    edited = next(i for i, k in sorted(split.items()) if k == 1)
    mask = next((tiny_data_copy / "train_gt").glob(f"{edited}.*"))
    mask.write_bytes(mask.read_bytes() + b"\0")
    assert unfinished("train.epochs=3") == (0, 0)
    assert pipeline.main([*base, "--budget-hours", "1e-6"]) == 1
    assert not fold1.exists()  # refused before training
