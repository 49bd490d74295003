"""Experiment configuration: YAML files, command-line overrides and provenance.

One YAML file describes an experiment (data, recipe, model list, later stages). Any key
can be overridden from the command line as `dotted.key=value`, the value parsed as YAML,
so `train.epochs=3` or `models.unet.kwargs.encoder_name=resnet18` both work.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import errno
import functools
import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core import invocation
from core.paths import reserved_names

DEFAULT_CONFIG = "configs/bkai.yaml"


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


T = TypeVar("T")


def settings_from(cls: type[T], section: dict[str, Any] | None, name: str) -> T:
    """A frozen settings dataclass from a config section whose keys its fields check:
    an unknown key is a ConfigError listing the known ones (the section is open in
    `configs/defaults.yaml`, so this is where its typos are caught)."""
    section = dict(section or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            f"unknown {name} settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    try:
        return cls(**section)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a null or a string where a number belongs
        schema = defaults().get(name) or {}
        nulls = [
            f"{name}.{k}" for k, v in section.items() if v is None and schema.get(k) is not None
        ]
        said = f"{', '.join(nulls)}: null is not a value here" if nulls else str(exc)
        raise ConfigError(f"{name} settings: a value of the wrong type ({said})") from exc


DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "configs" / "defaults.yaml"
# Keys an older config may still hold -> what replaced them (said instead of did-you-mean).
RENAMED = {"train.amp": "train.precision (amp: true is auto, amp: false is fp32)"}
BASE_KEY = "base"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return doc


@functools.cache
def defaults() -> dict[str, Any]:
    """configs/defaults.yaml: every key a config may set, with the value the code assumes."""
    return _read_yaml(DEFAULTS_FILE)


def _is_open(schema: Any) -> bool:
    """A section left null or {} in the defaults takes any keys (its reader checks them)."""
    return not (isinstance(schema, dict) and schema)


def merge(
    base: dict[str, Any], over: dict[str, Any], where: str, schema: Any, prefix: str = ""
) -> dict[str, Any]:
    """`over` deep-merged onto `base`, each key checked against the defaults (`schema`).

    A list replaces a list. A mapping with a `name` that changes (an optimizer, a
    schedule) replaces the old one instead of merging, as its arguments belong to the old
    name. Keys of a closed section must exist (did-you-mean otherwise) and keep their
    type; `+key` adds a new one.
    """
    out = copy.deepcopy(base)
    for raw_key, value in over.items():
        key = str(raw_key)
        add = key.startswith("+")
        key = key.removeprefix("+")
        dotted = f"{prefix}{key}"
        sub_schema = schema.get(key) if isinstance(schema, dict) else None
        if key in out:
            old = out[key]
            renamed = (
                isinstance(old, dict)
                and isinstance(value, dict)
                and "name" in value
                and value.get("name") != old.get("name")
            )
            if isinstance(old, dict) and isinstance(value, dict) and old and not renamed:
                out[key] = merge(old, value, where, sub_schema, f"{dotted}.")
            else:
                out[key] = _checked_value(dotted, old, value, where)
        elif add or _is_open(schema):
            out[key] = value
        else:
            known = [f"{prefix}{k}" for k in (schema or {})]
            close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            hint = f"; it is now {RENAMED[dotted]}" if dotted in RENAMED else hint
            raise ConfigError(
                f"{where}: unknown key {dotted!r}{hint} (a genuinely new key is written +{key})"
            )
    return out


def _resolve_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file merged over its `base:` chain, which ends at configs/defaults.yaml."""
    path = path.resolve()
    if path in chain:
        loop = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config inheritance has a cycle: {loop}")
    doc = _read_yaml(path)
    base_name = doc.pop(BASE_KEY, None)
    if base_name is None:
        parent = defaults()
    elif isinstance(base_name, str):
        parent = _resolve_file(path.parent / base_name, (*chain, path))
    else:
        raise ConfigError(f"{path}: base must be a file name, got {base_name!r}")
    cfg = merge(parent, doc, str(path), defaults())
    if "experiment" not in doc:
        cfg["experiment"] = path.stem
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The resolved config of a file: defaults, then its `base:` chain, then the file,
    then `overrides`. `experiment` is never inherited: it defaults to the file's stem."""
    return check_names(apply_overrides(_resolve_file(Path(path)), overrides))


def _folder_name(what: str, value: Any, reserved: frozenset[str], owner: str) -> None:
    """Refuse a name that is not one plain folder of its parent, or is one the layout
    itself gives to something else there (compared caseless, as macOS and Windows do)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"{what} {value!r}: must be a name, got a {type(value).__name__}")
    name = str(value)
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ConfigError(
            f"{what} {name!r}: must be a single folder name (not empty, no '/' or '\\', "
            "not starting with '.')"
        )
    taken = {r.casefold(): r for r in reserved}
    if name.casefold() in taken:
        raise ConfigError(
            f"{what} {name!r}: {taken[name.casefold()]!r} is {owner}'s own entry "
            f"(reserved: {', '.join(sorted(reserved))}); choose another name"
        )


def check_names(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg`, once its experiment and model names are safe folder names: each becomes a
    folder (`<out_dir>/<experiment>/<model>/`), and `../x` or a model named `ensemble`
    would write outside the experiment or into a stage's folder."""
    reserved = reserved_names()
    if cfg.get("experiment") is not None:
        _folder_name("experiment", cfg["experiment"], reserved.in_out_dir, "out_dir")
    own = "the experiment folder"
    for name in cfg.get("models") or {}:
        _folder_name("models key", name, reserved.in_experiment, own)
    for name in (cfg.get("ensemble") or {}).get("models") or []:
        _folder_name("ensemble.models entry", name, reserved.in_experiment, own)
    return cfg


def model_config(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The config as model `name` trains with it: `models.<name>.train` over `train`."""
    entry = model_entry(cfg, name)
    section = entry.get("train") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"models.{name}.train must be a mapping, got {section!r}")
    out = copy.deepcopy(cfg)
    out["train"] = merge(
        cfg["train"], section, f"models.{name}.train", defaults()["train"], "train."
    )
    return out


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    keys = []
    for key, value in node.items():
        keys.append(f"{prefix}{key}")
        keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _checked_value(key: str, old: Any, new: Any, where: str = "override") -> Any:
    """`new` if it has the type of `old` (None takes anything); ints widen to floats. The
    working size may be written as `--img-size` takes it (`64x96`, `352`), so
    `--set data.img_size=64x96` means what `--img-size 64x96` does."""
    if key == IMG_SIZE_KEY and isinstance(new, str | int) and not isinstance(new, bool):
        new = parse_img_size(str(new), f"{where} {key}")
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        ok = isinstance(old, bool) and isinstance(new, bool)
    elif isinstance(old, float):
        if isinstance(new, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; the key says it is a number.
            with contextlib.suppress(ValueError):
                new = float(new)
        ok = isinstance(new, int | float)
        new = float(new) if ok else new
    elif isinstance(old, int):
        ok = isinstance(new, int)
    elif isinstance(old, str):
        ok = isinstance(new, str)
    elif isinstance(old, list):
        ok = isinstance(new, list)
    elif isinstance(old, dict):
        ok = isinstance(new, dict) or new is None
    else:
        ok = True
    if not ok:
        raise ConfigError(
            f"{where} {key}={new!r}: expected {type(old).__name__} like the config's {old!r}"
        )
    return new


def _in_open_section(dotted: str) -> bool:
    """Whether the defaults leave the section holding `dotted` open (see `merge`)."""
    schema: Any = defaults()
    for part in dotted.split(".")[:-1]:
        if _is_open(schema):
            return True
        schema = schema.get(part)
    return _is_open(schema)


def apply_overrides(
    cfg: dict[str, Any], overrides: Iterable[str], strict: bool = True
) -> dict[str, Any]:
    """Return a copy of `cfg` with each `a.b.c=value` override applied.

    Strict by default, as a misspelt key would otherwise train silently with the default:
    the key must exist in the config and the value must have its type (`train.epocs=3`
    and `train.epochs=abc` are errors, the first with a did-you-mean). A genuinely new key
    is added with a leading `+` (`+train.ema=0.9`), Hydra's convention. Under a section
    the defaults leave open (a model's `kwargs`, `train.loss`, `data.augment`...), any key
    is accepted without `+`, as a YAML file may add it there: its reader checks it.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        add = key.startswith("+")
        key = key.removeprefix("+")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        add = add or _in_open_section(key)
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if child is None and (add or not strict or part not in node):
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            node = child
        value = yaml.safe_load(raw)
        if leaf in node:
            node[leaf] = _checked_value(key, node[leaf], value) if strict else value
        elif add or not strict:
            node[leaf] = value
        else:
            close = difflib.get_close_matches(key, _dotted_keys(cfg), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            hint = f"; it is now {RENAMED[key]}" if key in RENAMED else hint
            raise ConfigError(
                f"override {item!r}: no key {key!r} in the config{hint} "
                f"(add a new key with +{key}=...)"
            )
    return cfg


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """One log format for every stage, so a pipeline's log reads as one story."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every stage shares: which config, which data, where outputs go, overrides.

    Every stage takes the same `--config` (the competition config by default) and one
    override syntax, `--set KEY=VALUE`, so a command line moves between stages unchanged.
    """
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"experiment YAML file (default: {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--data-dir", help="dataset folder (train/, train_gt/, test/); overrides data_dir"
    )
    parser.add_argument(
        "--out-dir",
        help="experiments root: the run is <out-dir>/<experiment>/; overrides out_dir",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set train.epochs=3 (repeatable)",
    )


def config_argv(args: argparse.Namespace) -> list[str]:
    """The `add_config_arguments` flags of `args` as a command line: what a printed hint
    must repeat so the command it names reads the same config."""
    argv = ["--config", str(args.config)]
    for flag, value in (("--data-dir", args.data_dir), ("--out-dir", args.out_dir)):
        if value:
            argv += [flag, str(value)]
    for item in args.set:
        argv += ["--set", item]
    return argv


def _override_item(cfg: dict[str, Any], key: str, value: Any) -> str:
    """A dedicated flag's value as the `--set` item that gives the same config, so a hint
    naming another command (which lacks the flag) keeps it; `+key` where the key is new."""
    text = value if isinstance(value, str) and yaml.safe_load(value) == value else None
    item = f"{key}={json.dumps(value) if text is None else text}"
    try:
        apply_overrides(cfg, [item])
    except ConfigError:
        return f"+{item}"
    return item


def resolve_cli_config(
    args: argparse.Namespace, flags: Mapping[str, Any] | None = None, model: str | None = None
) -> dict[str, Any]:
    """The stage's config. Precedence, lowest first: defaults < `base:` chain < the file <
    `models.<model>.train` (when the stage trains one model) < `--set` < dedicated flags.

    `flags` maps dotted keys to flag values; None means the flag was not given.
    """
    cfg = _resolve_file(Path(args.config))
    if model is not None:
        cfg = model_config(cfg, model)
    cfg = apply_overrides(cfg, args.set)
    given_flags = {k: v for k, v in (flags or {}).items() if v is not None}
    overrides = [_override_item(cfg, k, v) for k, v in given_flags.items()]
    invocation.set_context([*config_argv(args), *(a for o in overrides for a in ("--set", o))])
    given = {"data_dir": args.data_dir, "out_dir": args.out_dir, **given_flags}
    # JSON is valid YAML, so apply_overrides parses each value back exactly.
    cfg = apply_overrides(
        cfg, [f"{k}={json.dumps(v)}" for k, v in given.items() if v is not None], strict=False
    )
    for key in ("experiment", "out_dir"):
        if not cfg.get(key):
            raise ConfigError(f"{args.config}: missing key {key!r}")
    return check_names(cfg)


IMG_SIZE_KEY = "data.img_size"


def parse_img_size(text: str, what: str = "--img-size") -> list[int]:
    """`352` -> [352, 352]; `352x416` -> [352, 416] (height x width). `what` is the flag or
    key the text came from, which an error names."""
    problem = ConfigError(f"{what} {text!r}: expected N or HxW, e.g. 352 or 352x416")
    try:
        size = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise problem from None
    if len(size) == 1:
        size *= 2
    if len(size) != 2:
        raise problem
    return size


def model_entry(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The `models.<name>` entry: which architecture (`arch`, the name itself by default),
    with which arguments."""
    models = cfg.get("models") or {}
    if name not in models:
        known = ", ".join(sorted(models)) or "(none)"
        raise ConfigError(f"unknown model {name!r}; this config defines: {known}")
    entry = dict(models[name] or {})
    entry.setdefault("arch", name)
    if entry.get("kwargs") is None:
        entry["kwargs"] = {}
    return entry


def recipe_sections(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The sections, as written, that shape the weights of a fold of model `name`: what
    recipe.fold_recipe flattens into the fold's identity. Raw, not typed: a key the user
    sets is part of the identity exactly as it is written."""
    return {
        "model": model_entry(cfg, name),
        "train": cfg.get("train") or {},
        "data": cfg.get("data") or {},
        "seed": cfg.get("seed"),
    }


def replaced(cfg: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `cfg` with each dotted key set to its value: a config the code derives
    (a retrained fold's seed and learning rate; from `{}`, the nested diff of an hpo trial),
    unlike `apply_overrides`, which parses and checks what a user typed."""
    out = copy.deepcopy(cfg)
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def encoder_file(pretrained_dir: str | Path, name: str) -> Path:
    """Where `python -m models.weights` writes, and an offline run reads, model `name`'s
    ImageNet encoder."""
    return Path(pretrained_dir).expanduser() / f"{name}.safetensors"


def build_entry(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """`model_entry` as the network is built: with `pretrained_dir` set, `imagenet` is read
    from its file there (no hub). The fold's identity keeps `imagenet`, so the same fold is
    recognised on a machine with network and on an offline one."""
    entry = model_entry(cfg, name)
    folder = cfg.get("pretrained_dir")
    if folder and str(entry.get("pretrained")).lower() == "imagenet":
        path = encoder_file(folder, name)
        if not path.is_file():
            write = invocation.command_line(
                "models.weights",
                "--config",
                invocation.config_file(),
                "--models",
                name,
                "--out",
                str(folder),
            )
            raise ConfigError(
                f"pretrained_dir: {path} not found for model {name!r}; write the encoders "
                f"with network access: {write}"
            )
        entry["pretrained"] = str(path)
    return entry


def config_hash(cfg: dict[str, Any]) -> str:
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def provenance(cfg: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """What made an artefact: config hash, code version, time, plus the caller's fields."""
    record: dict[str, Any] = {
        "git": git_hash(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if cfg is not None:
        record["config_hash"] = config_hash(cfg)
    record.update(extra)
    return record


# Errors of the machine, not of the data or the config: a full disk, a read-only or
# missing output folder, a path through a file.
_ENVIRONMENT = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EEXIST,
}


def environment_error(exc: BaseException) -> str | None:
    """One line naming the path, for an OSError of the machine anywhere in `exc`'s chain.

    torch.save wraps a full disk in a RuntimeError, so the chain is searched, not just the
    exception itself.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _ENVIRONMENT:
            where = seen.filename or "an output file"
            return f"cannot write {where}: {seen.strerror or seen}"
        seen = seen.__cause__ or seen.__context__
    return None


def reports_environment_errors(
    main: Any = None, *, resume: Callable[[list[str]], list[str]] | None = None
) -> Any:
    """Wrap a command's `main`: a disk or permission problem is exit 1 and one line, not a
    traceback; Ctrl-C or SIGTERM is one line naming what was finished and the command that
    resumes (`resume` turns the arguments given into those that resume, when they differ),
    exit 130 or 143. Inside another command (a stage pipeline.py calls) an interrupt goes
    on to the outer one, which the user typed and so is what resumes. Any other exception
    propagates unchanged."""

    def decorate(main: Any) -> Any:
        @functools.wraps(main)
        def wrapped(argv: Any = None) -> int:
            with invocation.invoked(main.__module__, argv, resume) as call:
                try:
                    return main(argv)
                except KeyboardInterrupt as exc:
                    if not invocation.is_outermost(call):
                        raise
                    line, code = invocation.interrupted(call, exc)
                    print(line, file=sys.stderr)
                    return code
                except Exception as exc:
                    problem = environment_error(exc)
                    if problem is None:
                        raise
                    print(f"error: {problem}", file=sys.stderr)
                    return 1

        return wrapped

    return decorate if main is None else decorate(main)
