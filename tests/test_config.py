import pytest

from config import ConfigError, apply_overrides, load_config, model_entry, provenance


def test_overrides_parse_yaml_values_and_create_nested_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 50\n  lr: 0.0001\nmodels:\n  m: {arch: unet}\n")
    cfg = load_config(path, ["train.epochs=3", "+data.img_size=[64, 96]", "+train.amp=false"])
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
