"""Reader: pairing by stem, both layouts, image loading and robust mask decoding."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.config import ConfigError
from data.reader import (
    DataError,
    MaskThresholds,
    decode_mask,
    find_dirs,
    list_test,
    list_test_gt,
    list_train,
    load_image,
    load_mask,
    stratum,
)


def _jpeg_roundtrip(rgb: np.ndarray, quality: int = 75) -> np.ndarray:
    ok, buf = cv2.imencode(".jpeg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


def _drawn_mask(h: int = 240, w: int = 320) -> np.ndarray:
    class_map = np.zeros((h, w), np.uint8)
    cv2.ellipse(class_map, (90, 100), (60, 40), 20, 0, 360, 1, -1)
    cv2.ellipse(class_map, (240, 150), (45, 70), -10, 0, 360, 2, -1)
    cv2.circle(class_map, (250, 40), 9, 1, -1)
    cv2.circle(class_map, (40, 210), 7, 2, -1)
    return class_map


def _paint(class_map: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*class_map.shape, 3), np.uint8)
    rgb[class_map == 1] = (255, 0, 0)
    rgb[class_map == 2] = (0, 255, 0)
    return rgb


@pytest.mark.parametrize("quality", [60, 75, 95])
def test_mask_decoding_survives_jpeg_noise(quality: int) -> None:
    truth = _drawn_mask()
    noisy = _jpeg_roundtrip(_paint(truth), quality)
    assert not np.isin(noisy, (0, 255)).all(), "JPEG should have introduced noise"
    decoded, n_ambiguous = decode_mask(noisy)
    assert decoded.dtype == np.uint8 and set(np.unique(decoded)) == {0, 1, 2}
    wrong = decoded != truth
    assert wrong.mean() < 0.02
    # Every disagreement lies on a drawn boundary (within 2 pixels of it).
    edges = cv2.morphologyEx(truth, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    near_edge = cv2.dilate(edges.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert not (wrong & ~near_edge).any()
    assert n_ambiguous < 0.01 * truth.size


def test_bright_unknown_colour_is_background_but_counted() -> None:
    rgb = _paint(_drawn_mask())
    rgb[180:210, 90:140] = (40, 60, 230)  # blue: bright, neither class
    rgb[5:15, 5:15] = (255, 255, 255)
    decoded, n_ambiguous = decode_mask(rgb)
    assert (decoded[180:210, 90:140] == 0).all() and (decoded[5:15, 5:15] == 0).all()
    # The 5x5 median rounds the corners of the patches off, hence a tolerance.
    assert n_ambiguous == pytest.approx(30 * 50 + 10 * 10, abs=40)
    black, n_black = decode_mask(np.zeros((20, 20, 3), np.uint8))
    assert not black.any() and n_black == 0


def test_thresholds_are_configurable() -> None:
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[:, :5] = (0, 200, 0)  # hue 60
    assert stratum(decode_mask(rgb)[0]) == "green"
    narrow = MaskThresholds.from_mapping({"green_hue_max": 50})
    decoded, n_ambiguous = decode_mask(rgb, narrow)
    assert stratum(decoded) == "none" and n_ambiguous == 50
    with pytest.raises(ConfigError, match="green_hue_mx"):
        MaskThresholds.from_mapping({"green_hue_mx": 50})
    with pytest.raises(ConfigError, match="odd"):
        MaskThresholds(median_ksize=4)


def test_load_image_is_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[..., 0] = 200  # red
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    loaded = load_image(path)
    assert loaded.shape == (8, 12, 3) and loaded.dtype == np.uint8
    assert (loaded[..., 0] == 200).all() and (loaded[..., 1:] == 0).all()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "truncated JPEG"),
        (lambda b: b"not an image at all", "not a readable image"),
        (lambda b: b"", "empty file"),
    ],
)
def test_bad_image_files_raise_naming_them(
    tiny_data: Path, tmp_path: Path, damage, message
) -> None:
    source = list_train(tiny_data)[0].image
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(damage(source.read_bytes()))
    with pytest.raises(DataError, match=message) as info:
        load_image(bad)
    assert "broken.jpeg" in str(info.value)
    with pytest.raises(DataError, match=r"missing\.jpeg"):
        load_image(tmp_path / "missing.jpeg")


def test_pairs_by_stem_whatever_the_listing_order(tiny_data: Path, monkeypatch) -> None:
    expected = list_train(tiny_data)
    original = Path.iterdir
    rng = random.Random(0)

    def shuffled(self: Path):
        entries = list(original(self))
        rng.shuffle(entries)
        return iter(entries)

    monkeypatch.setattr(Path, "iterdir", shuffled)
    for _ in range(3):
        samples = list_train(tiny_data)
        assert samples == expected
    assert all(s.image.stem == s.mask.stem == s.id for s in samples)
    assert [s.id for s in samples] == sorted(s.id for s in samples)


def test_flat_and_nested_layouts(tiny_data: Path, tiny_data_nested: Path) -> None:
    flat, nested = find_dirs(tiny_data), find_dirs(tiny_data_nested)
    assert flat["train"] == tiny_data / "train"
    assert nested["train"] == tiny_data_nested / "train" / "train"
    assert nested["test_gt"] == tiny_data_nested / "test_gt" / "test_gt"
    for root in (tiny_data, tiny_data_nested):
        assert len(list_train(root)) == 24
        test = list_test(root)
        assert len(test) == 6 and all(s.mask is None for s in test)
        gt = list_test_gt(root)
        assert [s.id for s in gt] == [s.id for s in test]
    # Same seed, same content: ids and decoded masks agree across layouts.
    for a, b in zip(list_train(tiny_data), list_train(tiny_data_nested), strict=True):
        assert a.id == b.id
        assert (load_mask(a.mask) == load_mask(b.mask)).all()


def test_missing_test_gt_is_none(tiny_data_copy: Path) -> None:
    shutil.rmtree(tiny_data_copy / "test_gt")
    assert list_test_gt(tiny_data_copy) is None


def test_unpaired_files_raise_naming_every_one(tiny_data_copy: Path) -> None:
    samples = list_train(tiny_data_copy)
    samples[0].mask.unlink()
    samples[1].image.unlink()
    stray = tiny_data_copy / "train_gt" / ("f" * 32 + ".jpeg")
    shutil.copy(samples[2].mask, stray)
    with pytest.raises(DataError) as info:
        list_train(tiny_data_copy)
    text = str(info.value)
    assert samples[0].image.name in text and "image without mask" in text
    assert samples[1].mask.name in text and stray.name in text and "mask without image" in text


def test_missing_folders_and_dirs_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        find_dirs(tmp_path / "nope")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="train_gt"):
        list_train(tmp_path)
    (tmp_path / "train_gt").mkdir()
    with pytest.raises(
        DataError, match=r"train is empty \(no image files\), and .*train_gt holds 0"
    ):
        list_train(tmp_path)


def test_an_empty_folder_is_named_not_every_file_of_the_other(tiny_data_copy: Path) -> None:
    """A copy that failed (train/ empty, train_gt/ full) said one line per mask."""
    masks = len(list(tiny_data_copy.glob("train_gt/*")))
    for image in (tiny_data_copy / "train").iterdir():
        image.unlink()
    with pytest.raises(DataError) as info:
        list_train(tiny_data_copy)
    assert str(info.value) == (
        f"{tiny_data_copy / 'train'} is empty (no image files), and "
        f"{tiny_data_copy / 'train_gt'} holds {masks}"
    )
    for mask in (tiny_data_copy / "train_gt").iterdir():
        mask.unlink()
    (tiny_data_copy / "train").rmdir()
    shutil.copytree(tiny_data_copy / "test", tiny_data_copy / "train")
    with pytest.raises(DataError, match=r"train_gt is empty \(no image files\), and .*train holds"):
        list_train(tiny_data_copy)


def test_many_unpaired_files_are_counted_past_the_first_twenty(tiny_data_copy: Path) -> None:
    mask = list_train(tiny_data_copy)[0].mask
    for k in range(25):
        shutil.copy(mask, tiny_data_copy / "train_gt" / f"{k:032x}.jpeg")
    with pytest.raises(DataError) as info:
        list_train(tiny_data_copy)
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + 20 + 1 and lines[-1].strip().startswith("... and 5 more")


def test_exif_orientation_is_ignored_so_sizes_agree_with_the_submission(tmp_path):
    from PIL import Image

    from data.submission import image_size

    path = tmp_path / "rotated.jpeg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (40, 20), (200, 50, 50)).save(path, exif=exif)
    assert load_image(path).shape[:2] == image_size(path) == (20, 40)


def test_mask_thresholds_from_config_must_be_integers():
    assert MaskThresholds.from_mapping({"red_s_min": 90.0}).red_s_min == 90
    for bad in ({"red_s_min": 7.5}, {"red_s_min": "abc"}, {"red_s_min": None}):
        with pytest.raises(ConfigError, match="red_s_min"):
            MaskThresholds.from_mapping(bad)


@pytest.mark.parametrize("damage", ["random", "zeroed"])
def test_damaged_bytes_inside_a_jpeg_are_an_error_naming_it(
    full_size_data: Path, tmp_path: Path, damage: str
):
    """Start and end markers intact, scan data of a 1280-wide frame damaged (200 random or
    400 zeroed bytes, the reliability sweep's cases): libjpeg would only warn, without the
    file name, and OpenCV would decode a garbled image."""
    import io

    from PIL import Image

    source = sorted((full_size_data / "train").iterdir())[0]
    good = source.read_bytes()
    for seed, where in enumerate((0.2, 0.4, 0.5, 0.6, 0.8)):
        data = bytearray(good)
        at, n = int(len(data) * where), 200 if damage == "random" else 400
        rng = np.random.default_rng(seed)
        data[at : at + n] = rng.bytes(n) if damage == "random" else bytes(n)
        broken = tmp_path / "broken.jpeg"
        broken.write_bytes(bytes(data))
        assert cv2.imread(str(broken)) is not None  # what OpenCV alone would train on
        with pytest.raises(DataError, match=r"broken\.jpeg: corrupt JPEG data \(libjpeg: "):
            load_image(broken)
    # Other encoders' valid files (progressive, optimised, grey, CMYK) still load.
    image = load_image(source)
    for name, mode, kwargs in (
        ("prog", "RGB", {"progressive": True}),
        ("opt", "RGB", {"optimize": True}),
        ("grey", "L", {}),
        ("cmyk", "CMYK", {}),
    ):
        buf = io.BytesIO()
        Image.fromarray(image).convert(mode).save(buf, "JPEG", **kwargs)
        (tmp_path / f"{name}.jpeg").write_bytes(buf.getvalue())
        assert load_image(tmp_path / f"{name}.jpeg").shape == image.shape


def test_a_dangling_symlink_among_the_images_is_named(tiny_data_copy: Path) -> None:
    link = tiny_data_copy / "train" / "0123456789abcdef0123456789abcdef.jpeg"
    link.symlink_to(tiny_data_copy / "nowhere.jpeg")
    with pytest.raises(DataError, match=r"0123456789abcdef0123456789abcdef\.jpeg: a broken"):
        list_train(tiny_data_copy)
