import argparse
from pathlib import Path

import pytest

from core.config import (
    ConfigError,
    apply_overrides,
    load_config,
    model_config,
    model_entry,
    provenance,
    resolve_cli_config,
)


def test_overrides_parse_yaml_values_and_create_nested_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 50\n  lr: 0.0001\nmodels:\n  m: {arch: unet}\n")
    cfg = load_config(path, ["train.epochs=3", "+data.img_size=[64, 96]", "+train.compile=true"])
    assert (cfg["train"]["epochs"], cfg["train"]["lr"], cfg["train"]["compile"]) == (
        3,
        0.0001,
        True,
    )
    assert cfg["data"]["img_size"] == [64, 96]


def test_overrides_do_not_mutate_the_input():
    cfg = {"train": {"epochs": 1}}
    out = apply_overrides(cfg, ["train.epochs=2"])
    assert cfg["train"]["epochs"] == 1 and out["train"]["epochs"] == 2


@pytest.mark.parametrize("bad", ["noequals", "=3", "train.epochs.x=1"])
def test_bad_overrides_are_refused(bad):
    with pytest.raises(ConfigError):
        apply_overrides({"train": {"epochs": 1}}, [bad])


def test_missing_or_invalid_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(bad)


def test_model_entry_lists_known_models_on_a_typo():
    cfg = {"models": {"unet_small": {"arch": "unet"}, "pranet": {"arch": "pranet"}}}
    assert model_entry(cfg, "pranet") == {"arch": "pranet", "kwargs": {}}
    with pytest.raises(ConfigError, match="pranet, unet_small"):
        model_entry(cfg, "pranett")


def test_provenance_records_config_hash_and_extra_fields():
    a = provenance({"x": 1}, fold=0)
    b = provenance({"x": 2}, fold=0)
    assert a["fold"] == 0 and "time" in a and a["config_hash"] != b["config_hash"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epocs=3", "did you mean 'train.epochs'"),
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("train.epochs=abc", "expected int"),
        ("train.epochs=1.7", "expected int"),
        ("train.lr=fast", "expected float"),
        ("data.augment=3", "expected dict"),
    ],
)
def test_strict_overrides_refuse_unknown_keys_and_wrong_types(override, message):
    cfg = {"train": {"epochs": 50, "lr": 1.0e-4, "ema": None}, "data": {"augment": {}}}
    with pytest.raises(ConfigError, match=message):
        apply_overrides(cfg, [override])


def test_strict_overrides_accept_new_keys_with_plus_and_numbers_as_yaml_writes_them():
    cfg = {"train": {"epochs": 50, "lr": 1.0e-4, "ema": None}}
    out = apply_overrides(cfg, ["+train.grad_clip=1.0", "train.lr=1e-3", "train.ema=0.9"])
    assert out["train"] == {"epochs": 50, "lr": 1e-3, "ema": 0.9, "grad_clip": 1.0}
    assert apply_overrides(cfg, ["train.lr=3"])["train"]["lr"] == 3.0


def test_keys_under_an_open_section_need_no_plus_as_in_a_yaml_file():
    """The README's `--set models.unet.kwargs.encoder_name=resnet50` said "no key": a
    model's kwargs (and train.loss, data.augment, ...) are open in the defaults, so a YAML
    file could add the key and an override can too; their readers check the names."""
    bkai = Path(__file__).resolve().parents[1] / "configs" / "bkai.yaml"
    cfg = load_config(bkai, ["models.unet.kwargs.encoder_name=resnet50", "data.augment.CLAHE=0.5"])
    assert cfg["models"]["unet"]["kwargs"]["encoder_name"] == "resnet50"
    assert cfg["data"]["augment"]["CLAHE"] == 0.5
    with pytest.raises(ConfigError, match=r"did you mean 'train\.epochs'"):
        load_config(bkai, ["train.epocs=3"])


def _write(path, text):
    path.write_text(text)
    return path


def test_base_chain_deep_merges_and_names_the_experiment_after_the_file(tmp_path):
    _write(
        tmp_path / "root.yaml",
        "experiment: root\ntrain: {epochs: 9, lr: 0.1}\ndata: {img_size: [64, 64]}\n"
        "models: {a: {kwargs: {encoder_name: resnet18}}}\n",
    )
    _write(tmp_path / "mid.yaml", "base: root.yaml\ntrain: {lr: 0.01}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    leaf = _write(sub / "leaf_v2.yaml", "base: ../mid.yaml\ndata: {img_size: [96, 128]}\n")
    cfg = load_config(leaf)
    assert cfg["experiment"] == "leaf_v2"  # never inherited from root.yaml
    assert (cfg["train"]["epochs"], cfg["train"]["lr"]) == (9, 0.01)
    assert cfg["data"]["img_size"] == [96, 128]  # a list replaces a list
    assert cfg["data"]["n_folds"] == 5  # configs/defaults.yaml under the whole chain
    assert model_entry(cfg, "a") == {"arch": "a", "kwargs": {"encoder_name": "resnet18"}}


def test_a_base_cycle_is_an_error_naming_the_loop(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_a_renamed_optimizer_replaces_the_base_arguments(tmp_path):
    _write(tmp_path / "b.yaml", "train: {optimizer: {name: sgd, momentum: 0.9}}\n")
    leaf = _write(tmp_path / "c.yaml", "base: b.yaml\ntrain: {optimizer: {name: adamw}}\n")
    assert load_config(leaf)["train"]["optimizer"] == {"name": "adamw"}
    same = _write(tmp_path / "d.yaml", "base: b.yaml\ntrain: {optimizer: {nesterov: true}}\n")
    assert load_config(same)["train"]["optimizer"] == {
        "name": "sgd",
        "momentum": 0.9,
        "nesterov": True,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {epocs: 3}\n", r"unknown key 'train.epocs'; did you mean 'train.epochs'"),
        ("trian: {epochs: 3}\n", r"unknown key 'trian'; did you mean 'train'"),
        ("train: {epochs: abc}\n", r"train.epochs='abc': expected int"),
        ("data: {n_folds: 1.5}\n", r"data.n_folds=1.5: expected int"),
    ],
)
def test_yaml_keys_are_checked_like_overrides(tmp_path, text, message):
    path = _write(tmp_path / "typo.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "typo.yaml" in str(info.value)


def test_open_sections_and_plus_keys_take_new_keys(tmp_path):
    path = _write(
        tmp_path / "c.yaml",
        "data: {augment: {affine: 0.3}}\ntrain: {loss: {focal_weight: 1.0}, +my_note: x}\n"
        "models: {unet: {kwargs: {encoder_name: resnet18}}}\n",
    )
    cfg = load_config(path)
    assert cfg["data"]["augment"] == {"affine": 0.3}
    assert cfg["train"]["my_note"] == "x"


def test_per_model_train_section_sits_between_the_file_and_set(tmp_path):
    path = _write(
        tmp_path / "c.yaml",
        "train: {lr: 0.1, batch_size: 16}\n"
        "models: {big: {arch: unet, train: {lr: 0.01, batch_size: 4}}, small: {arch: unet}}\n",
    )
    cfg = load_config(path)
    assert model_config(cfg, "big")["train"]["lr"] == 0.01
    assert model_config(cfg, "small")["train"]["lr"] == 0.1
    args = argparse.Namespace(config=str(path), set=["train.lr=0.5"], data_dir=None, out_dir=None)
    resolved = resolve_cli_config(args, {"train.batch_size": 2}, model="big")
    # --set beats the model section, a dedicated flag beats --set
    assert (resolved["train"]["lr"], resolved["train"]["batch_size"]) == (0.5, 2)
    bad = _write(tmp_path / "bad.yaml", "models: {big: {train: {lrr: 1}}}\n")
    with pytest.raises(
        ConfigError, match=r"models.big.train.*'train.lrr'; did you mean 'train.lr'"
    ):
        model_config(load_config(bad), "big")


@pytest.mark.parametrize(
    ("written", "size"), [("64x96", [64, 96]), ("64X96", [64, 96]), ("352", [352, 352])]
)
def test_the_working_size_is_written_the_same_with_set_as_with_img_size(tmp_path, written, size):
    """`--set data.img_size=64x96` was refused ('expected list') where `--img-size 64x96`,
    which sets the same key, worked."""
    from workflow import cli, stages

    path = _write(tmp_path / "c.yaml", "models: {unet: {arch: unet}}\n")
    common = ["--config", str(path), "--model", "unet", "--fold", "0"]
    by_flag = cli.train_config(stages.parser("train").parse_args([*common, "--img-size", written]))
    by_set = cli.train_config(
        stages.parser("train").parse_args([*common, "--set", f"data.img_size={written}"])
    )
    assert by_flag["data"]["img_size"] == by_set["data"]["img_size"] == size
    assert load_config(path, [f"data.img_size={written}"])["data"]["img_size"] == size
    in_file = _write(tmp_path / "f.yaml", f"data: {{img_size: {written}}}\n")
    assert load_config(in_file)["data"]["img_size"] == size


@pytest.mark.parametrize("written", ["64by96", "64x96x2", "x"])
def test_a_working_size_that_is_not_n_or_hxw_is_refused_naming_the_key(tmp_path, written):
    with pytest.raises(ConfigError) as refused:
        load_config(_write(tmp_path / "c.yaml", ""), [f"data.img_size={written}"])
    assert str(refused.value) == (
        f"override data.img_size {written!r}: expected N or HxW, e.g. 352 or 352x416"
    )
