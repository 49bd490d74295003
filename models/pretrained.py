"""Pretrained encoder weights without assuming a network.

`pretrained` is one of:
  * `None` / `"none"`: random initialisation (tests, the demo, offline machines);
  * `"imagenet"`: timm's or smp's own download/cache mechanism. Offline and without a
    filled cache it fails; we turn that into a `PretrainedWeightsError` that says what to
    do instead, rather than a hub stack trace;
  * a path to a `.pth`/`.pt`/`.bin`/`.safetensors` file holding an **encoder** state dict,
    e.g. timm's own `model.safetensors` for the backbone, or one written by
    `export_encoder`. Keys are matched to `model.encoder` (every zoo model keeps its
    encoder there); missing and unexpected keys are logged; shape mismatches, and a
    file holding less than MIN_COVERED of the encoder's weights, are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.config import ConfigError
from core.invocation import rerun_with
from data.atomic import atomic_write, save_torch

log = logging.getLogger(__name__)

HOW_TO_PROVIDE = (
    "Provide the encoder weights as a local file (pretrained=/path/encoder.safetensors or "
    ".pth, e.g. the backbone's timm model.safetensors), fill the Hugging Face / torch hub "
    "cache on a machine with network access, or train from scratch (pretrained: none). "
    "Set HF_HUB_OFFLINE=1 to make an offline attempt fail at once instead of retrying."
)

# Checkpoint wrappers and module prefixes that may sit in front of the encoder's own keys.
_WRAPPERS = ("state_dict", "model")
_STRIP = ("", "module.", "encoder.", "module.encoder.")
_ADD = ("", "model.")  # smp's `tu-` encoders hold the timm model under `.model`
# A file of the encoder's own architecture holds all its weights (a counter buffer or two
# aside); one of another that shares some names (resnet18's layers inside resnet34, a stem)
# holds a part, and loading it would leave the rest at random init behind a warning.
MIN_COVERED = 0.9


class PretrainedWeightsError(ConfigError):
    """Pretrained weights were asked for but cannot be had (offline, bad file, mismatch)."""


@dataclass(frozen=True)
class LoadReport:
    matched: list[str]
    missing: list[str]
    unexpected: list[str]


@contextmanager
def from_scratch_hint(names: Sequence[str]) -> Iterator[None]:
    """A PretrainedWeightsError inside gains the command that trains config models `names`
    from scratch instead: the user's command with `--set models.<name>.pretrained=none`
    (train.py's --pretrained is the same, but pipeline.py and hpo.py have no such flag)."""
    try:
        yield
    except PretrainedWeightsError as exc:
        if not names:
            raise
        keys = [f"models.{name}.pretrained" for name in names]
        scratch = rerun_with(dict.fromkeys(keys, "none"), {keys[0]: "--pretrained"})
        raise PretrainedWeightsError(f"{exc} To train from scratch: {scratch}") from exc


def parse_pretrained(spec: str | Path | None) -> str | Path | None:
    """Normalise a `pretrained` value: None (random), "imagenet" or an existing file."""
    if spec is None or str(spec).strip().lower() in ("", "none", "null", "false"):
        return None
    if str(spec).strip().lower() == "imagenet":
        return "imagenet"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights file not found: {path} (expected 'imagenet', 'none' or a "
            f"path to an encoder state dict). {HOW_TO_PROVIDE}"
        )
    return path


@contextmanager
def imagenet_download(model_name: str) -> Iterator[None]:
    """Turn any failure of the hub download/cache lookup into one actionable error."""
    try:
        yield
    except TypeError:
        raise  # a wrong argument, not a download problem: let the caller report it
    except Exception as exc:
        raise PretrainedWeightsError(
            f"could not load ImageNet weights for model {model_name!r} "
            f"({type(exc).__name__}: {exc}). {HOW_TO_PROVIDE}"
        ) from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or torch file, unwrapped from a checkpoint dict."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"{path}: not a readable state dict ({exc})") from exc
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise PretrainedWeightsError(f"{path}: holds no state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _align(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename the file's keys with the prefix change that matches most encoder keys."""
    best: dict[str, torch.Tensor] = state
    best_hits = len(target_keys & state.keys())
    for strip in _STRIP:
        for add in _ADD:
            renamed = {add + k[len(strip) :]: v for k, v in state.items() if k.startswith(strip)}
            hits = len(target_keys & renamed.keys())
            if hits > best_hits:
                best, best_hits = renamed, hits
    return best


def load_encoder_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load an encoder state dict from `path` into `model.encoder`."""
    path = Path(path)
    encoder: nn.Module = model.encoder
    target = encoder.state_dict()
    state = _align(read_state_dict(path), set(target))
    matched = sorted(target.keys() & state.keys())
    if not matched:
        raise PretrainedWeightsError(
            f"{path}: none of its {len(state)} keys match the encoder "
            f"(file keys start {sorted(state)[:3]}, encoder keys {sorted(target)[:3]})"
        )
    bad = [k for k in matched if state[k].shape != target[k].shape]
    if bad:
        details = ", ".join(
            f"{k}: file {tuple(state[k].shape)} vs encoder {tuple(target[k].shape)}"
            for k in bad[:10]
        )
        raise PretrainedWeightsError(
            f"{path}: {len(bad)} encoder weights have the wrong shape ({details}); "
            "was it exported from a different encoder?"
        )
    weights = [k for k in target if not k.endswith("num_batches_tracked")]
    covered = [k for k in weights if k in state]
    if len(covered) < MIN_COVERED * len(weights):
        raise PretrainedWeightsError(
            f"{path}: holds only {len(covered)} of the encoder's {len(weights)} weight "
            f"tensors (at least {MIN_COVERED:.0%} are needed); was it exported from a "
            "different encoder?"
        )
    encoder.load_state_dict({k: state[k] for k in matched}, strict=False)
    report = LoadReport(
        matched=matched,
        missing=sorted(target.keys() - state.keys()),
        unexpected=sorted(state.keys() - target.keys()),
    )
    log.info("%s: loaded %d encoder tensors", path, len(matched))
    if report.missing:
        log.warning(
            "%s: %d encoder keys not in the file, left at random init: %s",
            path,
            len(report.missing),
            ", ".join(report.missing),
        )
    if report.unexpected:
        log.warning(
            "%s: %d keys in the file not used by the encoder: %s",
            path,
            len(report.unexpected),
            ", ".join(report.unexpected),
        )
    return report


def export_encoder(model: nn.Module, path: str | Path) -> Path:
    """Write `model.encoder`'s state dict (`.safetensors` by suffix, else torch.save)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        with atomic_write(path, "wb") as fh:
            fh.write(save(state))
    else:
        save_torch(state, path)
    return path
