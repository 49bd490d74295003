"""Augmentations keep image and mask aligned and masks clean; bad names are errors.
Also the dataset that applies them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.runtime import choose_precision
from data.augment import build_transforms
from data.cache import prepare
from data.dataset import MEAN, STD, SegDataset, to_device, to_tensor
from data.reader import list_test, list_train

SIZE = (64, 96)


def _mask(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    for cls in (1, 2, 1):
        centre = (int(rng.integers(10, size[1] - 10)), int(rng.integers(10, size[0] - 10)))
        axes = (int(rng.integers(4, 20)), int(rng.integers(4, 15)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, cls, -1)
    return mask


def test_image_and_mask_get_the_same_geometry() -> None:
    # Square, so that 90° turns need no resize (whose image interpolation is not nearest).
    square = (64, 64)
    rng = np.random.default_rng(0)
    geometric = build_transforms(
        square,
        train=True,
        hflip=0.5,
        vflip=0.5,
        rotate90=0.5,
        affine={"p": 1.0, "interpolation": cv2.INTER_NEAREST},
        gamma=0,
        blur=0,
        dropout=0,
    )
    changed = 0
    for _ in range(40):
        mask = _mask(rng, square)
        image = np.repeat((mask * 100)[..., None], 3, axis=2)
        out = geometric(image=image, mask=mask)
        # The image was drawn from the mask; after a shared transform it still is.
        assert np.array_equal(out["image"][..., 0], out["mask"] * 100)
        changed += not np.array_equal(out["mask"], mask)
    assert changed > 30


def test_masks_keep_only_class_values_under_the_full_recipe() -> None:
    rng = np.random.default_rng(1)
    train = build_transforms(SIZE, train=True, affine=1.0, dropout=1.0, blur=1.0, gamma=1.0)
    image = rng.integers(0, 256, size=(*SIZE, 3), dtype=np.uint8)
    for _ in range(30):
        mask = _mask(rng)
        out = train(image=image, mask=mask)
        assert out["mask"].dtype == np.uint8 and out["image"].dtype == np.uint8
        assert set(np.unique(out["mask"])) <= {0, 1, 2}
        assert out["mask"].shape == SIZE and out["image"].shape == (*SIZE, 3)


def test_eval_transform_only_resizes() -> None:
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, size=(128, 192, 3), dtype=np.uint8)
    mask = cv2.resize(_mask(rng), (192, 128), interpolation=cv2.INTER_NEAREST)
    out = build_transforms(SIZE, train=False)(image=big, mask=mask)
    assert np.array_equal(out["image"], cv2.resize(big, SIZE[::-1], interpolation=cv2.INTER_AREA))
    assert np.array_equal(
        out["mask"], cv2.resize(mask, SIZE[::-1], interpolation=cv2.INTER_NEAREST)
    )
    at_size = big[: SIZE[0], : SIZE[1]]
    assert np.array_equal(build_transforms(SIZE, train=False)(image=at_size)["image"], at_size)


@pytest.mark.parametrize(
    "cfg, name",
    [
        ({"dropout": {"max_holes": 8}}, "max_holes"),
        ({"dropout": {"fill_value": 0}}, "fill_value"),
        ({"affine": {"mode": cv2.BORDER_REFLECT}}, "mode"),
        ({"affine": {"value": 0, "mask_value": 0}}, "value"),
        ({"blur": {"p": "often"}}, "blur"),
        ({"shift_scale_rotate": 0.5}, "shift_scale_rotate"),
        ({"gamma": "yes"}, "gamma"),
        ({"clahe": 0.5}, "neither a preset .* nor an albumentations transform"),
        ({"CLAHE": {"clip_limt": 2.0}}, "CLAHE"),
        ({"CLAHE": "often"}, "CLAHE"),
    ],
)
def test_old_or_unknown_names_raise(cfg: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        build_transforms(SIZE, train=True, **cfg)


def test_any_albumentations_transform_runs_after_the_presets_in_the_order_written() -> None:
    cfg = {
        "hflip": 0,
        "HueSaturationValue": 1.0,
        "CLAHE": {"p": 1.0, "clip_limit": [2.0, 3.0]},
        "GridDistortion": False,
    }
    steps = list(build_transforms(SIZE, train=True, **cfg))
    names = [type(step).__name__ for step in steps]
    presets = ["VerticalFlip", "RandomRotate90", "Affine", "RandomGamma", "GaussianBlur"]
    assert names == [*presets, "CoarseDropout", "HueSaturationValue", "CLAHE", "Resize"]
    assert steps[-3].p == 1.0 and tuple(steps[-2].clip_limit) == (2.0, 3.0)
    assert [type(s).__name__ for s in build_transforms(SIZE, train=False, **cfg)] == ["Resize"]
    image = np.random.default_rng(0).integers(0, 255, (*SIZE, 3), dtype=np.uint8)
    mask = _mask(np.random.default_rng(1))
    out = build_transforms(SIZE, train=True, **{"CLAHE": 1.0})(image=image, mask=mask)
    assert out["image"].shape == image.shape and set(np.unique(out["mask"])) <= {0, 1, 2}


def test_to_tensor_uses_fixed_imagenet_statistics() -> None:
    mean_image = np.tile((np.array(MEAN) * 255).round().astype(np.uint8), (4, 5, 1))
    tensor = to_tensor(mean_image)
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    assert tensor.abs().max() < 0.01
    white = to_tensor(np.full((2, 2, 3), 255, np.uint8))
    assert torch.allclose(white[:, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))


def test_dataset_items(tiny_data: Path, tmp_path: Path) -> None:
    samples = list_train(tiny_data)[:3] + list_test(tiny_data)[:1]
    items = prepare(samples, SIZE, tmp_path, workers=1)
    dataset = SegDataset(items, build_transforms(SIZE, train=True))
    assert len(dataset) == 4
    for index in range(4):
        item = dataset[index]
        assert item["index"] == index
        assert item["image"].shape == (3, *SIZE) and item["image"].dtype == torch.uint8
        assert item["mask"].shape == SIZE and item["mask"].dtype == torch.uint8
    assert dataset[0]["mask"].any() and not dataset[3]["mask"].any()
    # uint8 through the loader, normalised on the device: the same floats as on the host
    batch = {k: torch.stack([dataset[i][k] for i in range(2)]) for k in ("image", "mask")}
    images, masks = to_device(
        batch, torch.device("cpu"), choose_precision(torch.device("cpu"), "fp32", False)
    )
    expected = torch.stack([to_tensor(im.permute(1, 2, 0).numpy()) for im in batch["image"]])
    assert torch.equal(images, expected) and masks.dtype == torch.int64
    assert torch.equal(masks, batch["mask"].long())
