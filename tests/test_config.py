import pytest

from config import ConfigError, apply_overrides, load_config, model_entry, provenance


def test_overrides_parse_yaml_values_and_create_nested_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 50\n  lr: 0.0001\nmodels:\n  m: {arch: unet}\n")
    cfg = load_config(path, ["train.epochs=3", "data.img_size=[64, 96]", "train.amp=false"])
    assert cfg["train"] == {"epochs": 3, "lr": 0.0001, "amp": False}
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
