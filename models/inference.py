"""Trained checkpoints back into models, and models into probability maps.

Used by train.py (each fold's out-of-fold maps) and predict.py (OOF and test maps, TTA).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import to_device
from data.reader import DataError
from models.registry import build_model
from runtime import Precision

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
) -> np.ndarray:
    """float32 (N, 3, H, W) probabilities of a loader's images, in loader order."""
    prob_model.eval()
    out = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        images, _ = to_device(batch, device, precision)
        with precision.autocast():
            probs = prob_model(images)
        out.append(probs.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, NUM_CLASSES, 0, 0), np.float32)


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
            "train.py or was damaged after writing: delete it and retrain that fold"
        ) from exc
    if not isinstance(ckpt, dict) or not {"model", "arch", "kwargs"} <= ckpt.keys():
        raise DataError(f"{path}: not a train.py checkpoint (no model/arch/kwargs entries)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device) -> nn.Module:
    """The trained model of a checkpoint; weights come from it, never from `pretrained`."""
    model = build_model(ckpt["arch"], num_classes=NUM_CLASSES, pretrained=None, **ckpt["kwargs"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
