"""Synthetic data: deterministic, right layout and balance, masks that decode to what was
drawn, and a class cue that texture carries but colour does not."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from data.reader import (
    decode_mask,
    list_test,
    list_test_gt,
    list_train,
    load_image,
    load_mask,
    stratum,
)
from data.synthetic import (
    DEFAULT_HEIGHTS,
    encode_jpeg,
    generate,
    main,
    mask_rgb,
    preview,
    render,
)

SMALL = (64, 80)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", 6, 2, seed=7, size=SMALL)
    b = generate(tmp_path / "b", 6, 2, seed=7, size=SMALL, workers=2)
    c = generate(tmp_path / "c", 6, 2, seed=8, size=SMALL)
    assert _files(a) == _files(b)
    assert set(_files(a)).isdisjoint(_files(c))


@pytest.mark.parametrize("nested", [False, True])
def test_layout(tmp_path: Path, nested: bool) -> None:
    root = generate(tmp_path / "d", 5, 3, seed=0, nested=nested, size=SMALL)
    prefix = "train/train" if nested else "train"
    assert len(list((root / prefix).glob("*.jpeg"))) == 5
    train, test, gt = list_train(root), list_test(root), list_test_gt(root)
    assert len(train) == 5 and len(test) == 3 and [s.id for s in gt] == [s.id for s in test]
    ids = [s.id for s in train + test]
    assert len(set(ids)) == 8 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    for sample in train + gt:
        image = load_image(sample.image)
        assert image.shape == (*SMALL, 3)
        assert load_image(sample.mask).shape == image.shape
        assert stratum(load_mask(sample.mask)) != "none"


def test_default_size_is_like_the_real_data(tmp_path: Path) -> None:
    root = generate(tmp_path / "full", 2, 0, seed=1)
    for sample in list_train(root):
        h, w = load_image(sample.image).shape[:2]
        assert w == 1280 and h in DEFAULT_HEIGHTS


def test_class_balance_is_like_the_real_train_set(tmp_path: Path) -> None:
    root = generate(tmp_path / "many", 300, 0, seed=0, size=SMALL)
    counts = Counter(stratum(load_mask(s.mask)) for s in list_train(root))
    assert counts["none"] == 0
    assert abs(counts["red"] / 300 - 0.693) < 0.07
    assert abs(counts["green"] / 300 - 0.257) < 0.07
    assert 3 <= counts["both"] <= 30


def test_mask_colours_decode_to_the_drawn_classes() -> None:
    rng = np.random.default_rng(0)
    for classes in ([1], [2], [2, 2], [1, 2], [1, 2, 2], [1, 1, 1]):
        drawn = render(rng, (96, 128), classes).class_map
        assert set(np.unique(drawn)) == {0, *classes}
        jpeg = cv2.imdecode(np.frombuffer(encode_jpeg(mask_rgb(drawn), 75), np.uint8), 1)
        decoded, _ = decode_mask(jpeg[..., ::-1])
        assert stratum(decoded) == stratum(drawn)
        edges = cv2.morphologyEx(drawn, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        near_edge = cv2.dilate(edges, np.ones((5, 5), np.uint8)) > 0
        assert not ((decoded != drawn) & ~near_edge).any()


def _polyp_features(n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per polyp: mean chromaticity, fine-texture strength, class."""
    rng = np.random.default_rng(0)
    colour, texture, label = [], [], []
    for _ in range(n_images):
        sample = render(rng, (256, 320), [1, 2])
        image = sample.image.astype(np.float32)
        grey = image.mean(axis=2)
        detail = np.abs(grey - cv2.GaussianBlur(grey, (0, 0), 1.5))
        for cls in (1, 2):
            inner = cv2.erode((sample.class_map == cls).astype(np.uint8), np.ones((5, 5), np.uint8))
            inner = inner.astype(bool)
            if inner.sum() < 150:
                continue
            pixels = image[inner]
            colour.append(pixels.mean(axis=0) / pixels.mean())
            texture.append([np.median(detail[inner]) / grey[inner].mean()])
            label.append(cls)
    return np.array(colour), np.array(texture), np.array(label)


def test_texture_not_colour_tells_the_classes_apart() -> None:
    colour, texture, label = _polyp_features(40)
    assert len(label) > 50 and 0.3 < (label == 1).mean() < 0.7
    model = LogisticRegression(C=100, max_iter=2000)
    by_colour = cross_val_score(model, colour, label, cv=5).mean()
    by_texture = cross_val_score(model, texture, label, cv=5).mean()
    assert by_colour < 0.75, f"colour alone separates the classes ({by_colour:.2f})"
    assert by_texture > 0.9 and by_texture > by_colour + 0.2


def test_preview_is_a_small_png(tiny_data: Path, tmp_path: Path) -> None:
    path = tmp_path / "samples.png"
    preview(tiny_data, path, n=4, cell_width=120)
    picture = cv2.imread(str(path))
    assert picture.shape == (4 * round(120 * 0.78), 240, 3)
    assert path.stat().st_size < 300_000


def test_cli_refuses_a_non_empty_out(tiny_data: Path, capsys) -> None:
    assert (
        main(["--out", str(tiny_data), "--n-train", "2", "--n-test", "1", "--size", "64x80"]) == 2
    )
    assert "not empty" in capsys.readouterr().out
