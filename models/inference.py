"""Trained checkpoints back into models, and models into probability maps.

Used by train.py (each fold's out-of-fold maps), predict.py (OOF and test maps, TTA) and
infer.py (an exported package's networks, torch or ONNX, on new images).

TTA (ttach) wraps a module that returns *softmax probabilities*, so the views are averaged
as probabilities, not as logits. The transform lists are built here because ttach's own
aliases do not fit: its `d4_transform` runs 16 passes for the 8 distinct elements of the
dihedral group, and its vertical-flip alias is misspelt `vlip_transform`.
- `hflip`: identity, horizontal flip (2 passes);
- `flip`: {identity, h-flip} x {identity, v-flip} (4 passes);
- `d4`: {identity, h-flip} x rotations by 0/90/180/270 (the 8 elements of D4).
`d4` on a non-square working size feeds the model W x H images for the 90/270 rotations:
every zoo model is fully convolutional and both sides are multiples of 32, so this works,
and ttach rotates each prediction back to H x W before averaging.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import ttach
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.config import ConfigError
from core.invocation import retrain_hint
from core.runtime import Precision
from core.settings import TTA_CHOICES
from data.dataset import to_device
from data.reader import DataError
from models.registry import build_model

NUM_CLASSES = 3


class Probabilities(nn.Module):
    """Softmax on top of a segmentation model, so that TTA averages probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(images).float(), dim=1)


@torch.no_grad()
def predict_probs(
    prob_model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: Precision,
    desc: str = "predict",
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """float32 (N, 3, H, W) probabilities of a loader's images, in loader order.
    `on_batch(n)` after each batch of n images (a ticker.Ticker's step)."""
    prob_model.eval()
    out = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        images, _ = to_device(batch, device, precision)
        with precision.autocast():
            probs = prob_model(images)
        out.append(probs.float().cpu().numpy())
        if on_batch is not None:
            on_batch(len(images))
    return np.concatenate(out) if out else np.zeros((0, NUM_CLASSES, 0, 0), np.float32)


def tta_transforms(name: str) -> ttach.Compose | None:
    """The ttach transform list of a TTA setting; None for no TTA."""
    if name == "none":
        return None
    if name == "hflip":
        return ttach.Compose([ttach.HorizontalFlip()])
    if name == "flip":
        return ttach.Compose([ttach.HorizontalFlip(), ttach.VerticalFlip()])
    if name == "d4":
        return ttach.Compose([ttach.HorizontalFlip(), ttach.Rotate90(angles=[0, 90, 180, 270])])
    raise ConfigError(f"unknown TTA {name!r}; choose one of {', '.join(TTA_CHOICES)}")


def tta_views(name: str) -> int:
    """Forward passes per image of a TTA setting (1 without TTA)."""
    transforms = tta_transforms(name)
    return 1 if transforms is None else len(list(transforms))


def probability_model(model: nn.Module, tta: str) -> nn.Module:
    """A module mapping images to class probabilities, averaged over the TTA views."""
    probs = Probabilities(model)
    transforms = tta_transforms(tta)
    if transforms is None:
        return probs
    return ttach.SegmentationTTAWrapper(probs, transforms, merge_mode="mean")


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint of train.py, or DataError naming the file when it cannot be one.

    Checkpoints are data, not code: they are read with `weights_only=True`, so a shared
    `best.pt` crafted to run code on load is refused instead of executed. train.py writes
    only tensors, numbers, strings and containers of them (the RNG states included).
    """
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path}: refused, it holds objects other than weights and plain data, which "
            f"could run code when loaded ({str(exc).splitlines()[0][:200]}); only load "
            "checkpoints written by train.py"
        ) from exc
    except Exception as exc:
        raise DataError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}); it was not written by "
            f"train.py or was damaged after writing: retrain that fold: {retrain_hint(path.parent)}"
        ) from exc
    if not isinstance(ckpt, dict) or not {"model", "arch", "kwargs"} <= ckpt.keys():
        raise DataError(f"{path}: not a train.py checkpoint (no model/arch/kwargs entries)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device) -> nn.Module:
    """The trained model of a checkpoint; weights come from it, never from `pretrained`."""
    model = build_model(ckpt["arch"], num_classes=NUM_CLASSES, pretrained=None, **ckpt["kwargs"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
