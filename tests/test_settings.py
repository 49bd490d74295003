"""The typed `data` and `train` sections: one type and one check per key, defaults from
configs/defaults.yaml, and no stage reading those sections raw."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from core.config import ConfigError, defaults, load_config, model_config
from core.settings import (
    DataSettings,
    DecideSettings,
    EnsembleSettings,
    ExperimentSettings,
    HpoSettings,
    PredictSettings,
    RefineSettings,
    RetrySettings,
    SearchSettings,
    Settings,
    SlurmSettings,
    TrainSettings,
    refining,
)
from tests.trainkit import write_config

ROOT = Path(__file__).resolve().parents[1]


SECTION_CLASSES = [
    DataSettings,
    TrainSettings,
    PredictSettings,
    SearchSettings,
    EnsembleSettings,
    DecideSettings,
    RetrySettings,
    RefineSettings,
    SlurmSettings,
    HpoSettings,
]


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda c: c.__name__)
def test_the_fields_are_the_keys_of_the_defaults_file_and_declare_no_default(cls: type) -> None:
    """defaults.yaml is the one place a default is written (refine's `enabled` is the
    stage's switch, read by `refining`)."""
    fields = dataclasses.fields(cls)
    assert {f.name for f in fields} == set(defaults()[cls.NAME]) - {"enabled"}
    assert all(f.default is dataclasses.MISSING for f in fields)
    assert cls.default() == cls.from_config({})
    Settings.of(load_config(ROOT / "configs" / "bkai.yaml"))


def test_null_and_empty_values_are_refused_by_name_or_mean_their_default() -> None:
    with pytest.raises(ConfigError, match=r"decide\.n_boot: null is not a value here"):
        DecideSettings.from_config({"decide": {"n_boot": None}})
    with pytest.raises(ConfigError, match="seed must be a whole number"):
        ExperimentSettings.from_config({"experiment": "e", "seed": None})
    with pytest.raises(ConfigError, match="no data dir"):
        ExperimentSettings.from_config({"experiment": "e", "data_dir": ""}).data()
    with pytest.raises(ConfigError, match=r"ensemble\.models must list model names"):
        EnsembleSettings.from_config({"ensemble": {"models": "unet"}})
    # a trial count of null has always meant the default
    assert (
        SearchSettings.from_config({"tune": {"trials": None}}).trials
        == defaults()["tune"]["trials"]
    )
    assert HpoSettings.from_config({"hpo": {"trials": None}}).trials == defaults()["hpo"]["trials"]
    # the defaults say flip: no reader falls back to another TTA
    assert PredictSettings.from_config({}).tta == defaults()["predict"]["tta"] == "flip"


def test_a_partial_section_gets_the_defaults_and_off_options_their_neutral_values() -> None:
    train = TrainSettings.from_config({"train": {"lr": 3, "epochs": "4"}})
    assert (train.lr, train.epochs, train.batch_size) == (3.0, 4, defaults()["train"]["batch_size"])
    assert isinstance(train.lr, float) and isinstance(train.epochs, int)
    assert (train.multiscale, train.grad_clip, train.early_stop_patience) == ((1.0,), 0.0, 0)
    assert (train.cpu_threads, train.ema, train.encoder_lr_ratio) == (1, None, None)
    assert train.optimizer_spec == {"name": "adam", "weight_decay": 1.0e-4}
    assert train.schedule == {"name": "step", "step_epochs": 5, "gamma": 0.6}
    lion = {"optimizer": {"name": "lion", "weight_decay": 0.5}, "scheduler": {"name": "none"}}
    own = TrainSettings.from_config({"train": lion})
    assert own.optimizer_spec == {"name": "lion", "weight_decay": 0.5}
    assert own.schedule == {"name": "none"}
    data = DataSettings.from_config({"data": {"img_size": [64, 96], "paste": {}}})
    assert (data.img_size, data.n_folds, data.paste, data.mask) == ((64, 96), 5, None, {})


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("data", {"img_size": [64, 70]}, "positive multiples of 32"),
        ("data", {"img_size": [64.0, 64]}, r"\[height, width\]"),
        ("data", {"n_folds": 1}, "at least 2"),
        ("data", {"paste": {"p": 2}}, "p in"),
        ("data", {"paste": {"q": 1}}, "or null"),
        ("data", {"sampling": {"blue": 1}}, "strata"),
        ("data", {"sampling": {"red": -1}}, "non-negative"),
        ("data", {"img_sise": [64, 64]}, "unknown data settings: img_sise"),
        ("train", {"epochs": 0}, "train.epochs must be at least 1"),
        ("train", {"batch_size": 0}, "train.batch_size must be at least 1"),
        ("train", {"lr": 0}, "train.lr must be positive"),
        ("train", {"encoder_lr_ratio": 0}, "positive number or null"),
        ("train", {"multiscale": [0.1]}, r"scales in \[0.25, 4\]"),
        ("train", {"ema": 1.5}, "EMA decay"),
        ("train", {"epoch": 3}, "unknown train settings: epoch"),
    ],
)
def test_a_wrong_value_is_refused_naming_its_key(section: str, values: dict, message: str) -> None:
    cls = DataSettings if section == "data" else TrainSettings
    with pytest.raises(ConfigError, match=message):
        cls.from_config({section: values})


def test_a_models_own_train_section_reaches_its_settings(tmp_path: Path, tiny_data: Path) -> None:
    cfg = load_config(
        write_config(tmp_path, tiny_data),
        ["train.lr=0.01", "+models.unet.train={lr: 0.5, multiscale: [0.5, 1.0]}"],
    )
    assert TrainSettings.from_config(cfg).lr == 0.01
    own = TrainSettings.from_config(model_config(cfg, "unet"))
    assert (own.lr, own.multiscale) == (0.5, (0.5, 1.0))


def test_refining_reads_refine_enabled() -> None:
    assert not refining({}) and not refining({"refine": None})
    assert not refining({"refine": {"enabled": False, "epochs": 3}})
    assert refining({"refine": {"enabled": True}})


# The config's sections, whose names no other document uses as a key ("models" and "seed"
# are also keys of blend records and folds.json).
SECTIONS = frozenset(k for k, v in defaults().items() if isinstance(v, dict)) - {"models"}


def _looks_like_config(node: ast.expr) -> bool:
    """`cfg`, `model_cfg`, `plan.cfg`, `config`, `ckpt["config"]`: a config by its name."""
    if isinstance(node, ast.Subscript):
        node = node.slice
        return isinstance(node, ast.Constant) and node.value == "config"
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return name in ("cfg", "config") or name.endswith("_cfg")


def raw_config_reads(path: Path) -> list[str]:
    """Each raw read of a config in a module: `x[...]` or `x.get(...)` on a name that holds a
    config (any key), or of a section on anything (`doc["train"]`, `d.get("predict")`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            target, key = node.value, node.slice
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault")
            and node.args
        ):
            target, key = node.func.value, node.args[0]
        else:
            continue
        keyed = isinstance(key, ast.Constant) and key.value in SECTIONS
        if keyed or _looks_like_config(target):
            found.append(f"{path.relative_to(path.parents[1]).as_posix()}:{node.lineno}")
    return found


# The config package: the only modules that read the config as written (a fold's identity
# hashes the sections as written: config.recipe_sections).
RAW_READERS = {"core/settings.py", "core/config.py"}


def test_no_module_outside_the_config_package_reads_the_config_raw() -> None:
    files = [
        p
        for folder in ("", "core", "data", "models", "training", "chain", "workflow", "bench")
        for p in (ROOT / folder).glob("*.py")
        if p.relative_to(ROOT).as_posix() not in RAW_READERS
    ]
    found = [hit for p in sorted(files) for hit in raw_config_reads(p)]
    assert not found, f"read through the settings classes (core/settings.py) instead: {found}"


def test_the_raw_read_finder_finds_each_form(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    probe = tmp_path / "pkg" / "probe.py"
    lines = [
        'a = cfg["data"]',
        'b = plan.cfg.get("anything")',
        'c = ckpt["config"]["lr"]',
        'd = model_cfg.pop("seed", 0)',
        'e = doc["predict"]',
        'f = meta["seed"]',  # not a config, no section: not a read
        'cfg["train"] = {}',  # a write: the config package's own business, not a read
    ]
    probe.write_text("\n".join(lines) + "\n")
    assert [h.split(":")[1] for h in raw_config_reads(probe)] == ["1", "2", "3", "4", "5"]
