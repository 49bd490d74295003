"""Finding, pairing and decoding the NeoPolyp image and mask files.

Images and masks are paired by file stem, never by two directory listings, because the
order of `os.listdir` is arbitrary and one missing file would silently shift every pair.
Both the flat layout (`train/`, `train_gt/`, `test/`) and the Kaggle-nested one
(`train/train/`, ...) are accepted.

Masks are JPEG RGB pictures (red = neoplastic, green = non-neoplastic, black =
background) carrying compression noise, so they are decoded with HSV thresholds
(`MaskThresholds`) rather than by exact colour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import simplejpeg

from core.config import ConfigError
from core.invocation import command_line

IMAGE_EXTS = (".jpeg", ".jpg", ".png")
FOLDERS = ("train", "train_gt", "test", "test_gt")

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


class DataError(ValueError):
    """Input data that cannot be used; the message names the offending file or folder."""


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class Pairing:
    """Result of matching two folders by stem, keeping what did not match for reporting."""

    samples: list[Sample]
    images_without_mask: list[Path]
    masks_without_image: list[Path]

    @property
    def problems(self) -> list[str]:
        """One line per unmatched file, naming it (the reader and data.check share them)."""
        return [f"image without mask: {p}" for p in self.images_without_mask] + [
            f"mask without image: {p}" for p in self.masks_without_image
        ]


@dataclass(frozen=True)
class MaskThresholds:
    """HSV thresholds that turn a noisy JPEG mask into class ids.

    Hue is in OpenCV's 0..179 scale, saturation and value in 0..255. The defaults are the
    ones most public NeoPolyp solutions use: red is hue 0..10 or 160..179 with S >= 100 and
    V >= 20; green is hue 36..70 with S >= 25 and V >= 25. Everything else is background.

    A pixel is *ambiguous* when it is clearly not black (V >= `ambiguous_v_min`) yet matches
    neither colour, or when it matches both (possible only with overlapping custom ranges).
    Such pixels become background, but they are counted so that a mask drawn in an
    unexpected colour, or thresholds that do not fit the data, show up in `data.check`.

    Before thresholding, the mask is median-filtered (`median_ksize`, odd; 0 or 1 turns it
    off). JPEG ringing leaves dark magenta specks along green edges (e.g. RGB (22, 0, 15):
    hue 160, S 255, V 22) that pass the red thresholds; at quality 75 they made about half
    of the synthetic green-only masks look like "both". A 5×5 median removes them while
    moving real boundaries by well under a pixel; polyps are never thinner than that.
    """

    red_hue_low_max: int = 10
    red_hue_high_min: int = 160
    red_s_min: int = 100
    red_v_min: int = 20
    green_hue_min: int = 36
    green_hue_max: int = 70
    green_s_min: int = 25
    green_v_min: int = 25
    ambiguous_v_min: int = 60
    median_ksize: int = 5

    def __post_init__(self) -> None:
        if self.median_ksize > 1 and self.median_ksize % 2 == 0:
            raise ConfigError(f"mask median_ksize must be odd, got {self.median_ksize}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> MaskThresholds:
        """Build from a config mapping (`data.mask`), rejecting unknown keys by name."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown mask threshold(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        out = {}
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
                raise ConfigError(f"mask threshold {k}={v!r} must be an integer")
            out[k] = int(v)
        return cls(**out)

    def key(self) -> str:
        """A stable text form, used in cache keys so changed thresholds re-decode masks."""
        return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


def _folder(data_dir: Path, name: str) -> Path | None:
    nested = data_dir / name / name
    if nested.is_dir():
        return nested
    flat = data_dir / name
    return flat if flat.is_dir() else None


def find_dirs(data_dir: str | Path) -> dict[str, Path | None]:
    """The image folders of a data dir, flat or Kaggle-nested; None for a missing one."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir not found: {data_dir}")
    return {name: _folder(data_dir, name) for name in FOLDERS}


def list_images(folder: Path) -> dict[str, Path]:
    """Image files of a folder keyed by stem; hidden and non-image files are ignored."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTS:
            continue
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path}: a broken symbolic link (to {path.readlink()})")
        if not path.is_file():
            continue
        if path.stem in found:
            raise DataError(f"two files with the same id {path.stem!r}: {found[path.stem]}, {path}")
        found[path.stem] = path
    return found


def list_image_tree(folder: str | Path) -> list[tuple[str, Path]]:
    """(id, file) of every image under `folder`, at any depth, sorted by id. The id is the
    path below `folder` without its extension ("a" for a.jpeg, "video1/0001" for
    video1/0001.png), so frames of two videos never collide; a flat folder gives the
    competition's ids. A folder holding only a folder of its own name (Kaggle's test/test/)
    is read as that one. Two files of one id, or no image at all, are errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    inner = folder / folder.name
    if inner.is_dir() and [p.name for p in folder.iterdir() if not p.name.startswith(".")] == [
        folder.name
    ]:
        folder = inner
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() not in IMAGE_EXTS or not (path.is_file() or path.is_symlink()):
            continue  # a broken link is kept: decoding it names it as a bad image
        image_id = relative.with_suffix("").as_posix()
        if image_id in found:
            raise DataError(f"two files with the same id {image_id!r}: {found[image_id]}, {path}")
        found[image_id] = path
    if not found:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) at any depth")
    return sorted(found.items())


def pair_folders(images_dir: Path, masks_dir: Path) -> Pairing:
    """Match images to masks by stem, returning the pairs and both kinds of leftovers."""
    images, masks = list_images(images_dir), list_images(masks_dir)
    common = sorted(images.keys() & masks.keys())
    return Pairing(
        samples=[Sample(i, images[i], masks[i]) for i in common],
        images_without_mask=[images[i] for i in sorted(images.keys() - masks.keys())],
        masks_without_image=[masks[i] for i in sorted(masks.keys() - images.keys())],
    )


def _require(dirs: dict[str, Path | None], name: str, data_dir: str | Path) -> Path:
    folder = dirs[name]
    if folder is None:
        raise DataError(f"{data_dir}: missing folder {name}/ (or {name}/{name}/)")
    return folder


_SHOWN = 20  # problems (unpaired files, shared ids) named in an error; the rest are counted


def _paired(data_dir: str | Path, image_key: str, mask_key: str) -> list[Sample]:
    dirs = find_dirs(data_dir)
    images_dir = _require(dirs, image_key, data_dir)
    masks_dir = _require(dirs, mask_key, data_dir)
    pairing = pair_folders(images_dir, masks_dir)
    if not pairing.samples:
        # one line per file of the other folder would bury the cause (a copy that failed)
        counts = {
            images_dir: len(pairing.images_without_mask),
            masks_dir: len(pairing.masks_without_image),
        }
        for folder, other in ((images_dir, masks_dir), (masks_dir, images_dir)):
            if not counts[folder]:
                raise DataError(
                    f"{folder} is empty (no image files), and {other} holds {counts[other]}"
                )
    if pairing.problems:
        raise DataError(_listing("unpaired files:", pairing.problems, data_dir))
    return pairing.samples


def _listing(header: str, problems: list[str], data_dir: str | Path) -> str:
    """`header` and the first _SHOWN problems, one a line; the rest counted, with the
    command that lists them all."""
    shown = problems[:_SHOWN]
    more = len(problems) - len(shown)
    every = command_line("data.check", "--data-dir", str(data_dir))
    tail = [f"... and {more} more (all of them: {every})"] if more else []
    return "\n  ".join([header, *shown, *tail])


def shared_ids(dirs: dict[str, Path | None]) -> list[str]:
    """One line per id that names both a training and a test image, naming both files.

    Every stage keys its cache entries and maps by id (`<out>/cache/<size>/<id>.*`), so a
    test image with a training image's id would overwrite that image's cached arrays
    between stages, and its out-of-fold map would be predicted from the test image.
    """
    train_dir, test_dir = (dirs[name] for name in ("train", "test"))
    if train_dir is None or test_dir is None:
        return []
    train, test = list_images(train_dir), list_images(test_dir)
    return [
        f"one id {i!r} for a training and a test image: {train[i]}, {test[i]}; "
        "the stages key their cache and maps by id: rename one of them"
        for i in sorted(train.keys() & test.keys())
    ]


def image_subfolders(folder: Path) -> list[str]:
    """One line per subfolder of `folder` holding images (at any depth), which infer.py
    reads (`list_image_tree`) and the stages would not: a test set has one level."""
    found = sorted({i.split("/")[0] for i, _ in list_image_tree(folder) if "/" in i})
    return [
        f"{folder / name}: a subfolder of test images; the stages read only the images "
        f"directly in {folder} (a submission names each image by its file name): move "
        "them up into it, or out of the data dir"
        for name in found
    ]


def _refuse(problems: list[str], data_dir: str | Path) -> None:
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(_listing(f"{len(problems)} problems in the data dir:", problems, data_dir))


def list_train(data_dir: str | Path) -> list[Sample]:
    """Training images with their masks, sorted by id; every unpaired file is an error,
    and so is an id that a test image has too."""
    samples = _paired(data_dir, "train", "train_gt")
    _refuse(shared_ids(find_dirs(data_dir)), data_dir)
    return samples


def list_test(data_dir: str | Path) -> list[Sample]:
    """Test images (no masks), sorted by id. Images in a subfolder, and an id that a
    training image has too, are errors naming the folder or both files."""
    dirs = find_dirs(data_dir)
    folder = _require(dirs, "test", data_dir)
    images = list_images(folder)
    if not images:
        raise DataError(f"no images in {folder}")
    _refuse(image_subfolders(folder) + shared_ids(dirs), data_dir)
    return [Sample(i, images[i], None) for i in sorted(images)]


def list_test_gt(data_dir: str | Path) -> list[Sample] | None:
    """Test images paired with ground truth, for scoring the demo; None when there is none."""
    if find_dirs(data_dir)["test_gt"] is None:
        return None
    return _paired(data_dir, "test", "test_gt")


def _check_complete(data: bytes, path: Path) -> None:
    """Reject truncated files, which OpenCV would otherwise decode into a partly grey image."""
    if not data:
        raise DataError(f"{path}: empty file")
    if data.startswith(_JPEG_SOI):
        if not data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
            raise DataError(f"{path}: truncated JPEG (no end-of-image marker)")
        _check_jpeg_data(data, path)
    elif data.startswith(_PNG_SIGNATURE) and not data.endswith(_PNG_IEND):
        raise DataError(f"{path}: truncated PNG (no IEND chunk)")


# simplejpeg's names of a JPEG's colour spaces -> the output it can decode them to
_JPEG_OUTPUT = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}


def _check_jpeg_data(data: bytes, path: Path) -> None:
    """Reject JPEGs whose compressed data libjpeg finds corrupt.

    Damaged bytes in the middle of a file (random or zeroed) keep its start and end
    markers; OpenCV then only prints libjpeg's "Corrupt JPEG data" warning, without the
    file name, and trains on an image garbled from that point on. A strict decode
    (libjpeg-turbo through simplejpeg, every warning an error) finds them; it costs a few
    milliseconds per 1280-wide frame.
    """
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, _JPEG_OUTPUT.get(colorspace, "RGB"), strict=True)
    except ValueError as exc:
        raise DataError(
            f"{path}: corrupt JPEG data (libjpeg: {exc}); it would decode partly garbled: "
            "replace it, or remove it"
        ) from exc


def check_image_file(path: str | Path) -> bytes:
    """The bytes of a readable, complete (not truncated) image file, not yet decoded.

    Cheap enough for a preflight over every test image before training starts.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    _check_complete(data, path)
    return data


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 HxWx3 RGB; unreadable or truncated files raise DataError."""
    path = Path(path)
    return decode_image(check_image_file(path), path)


def decode_image(data: bytes, path: Path) -> np.ndarray:
    """The bytes of `check_image_file(path)` as uint8 HxWx3 RGB (for a caller that also
    needs the bytes, e.g. to hash them)."""
    bgr = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    )
    if bgr is None:
        raise DataError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_mask(
    rgb: np.ndarray, thresholds: MaskThresholds | None = None
) -> tuple[np.ndarray, int]:
    """Class map (0 background, 1 red, 2 green) and the number of ambiguous pixels."""
    t = thresholds or MaskThresholds()
    if t.median_ksize > 1:
        rgb = cv2.medianBlur(np.ascontiguousarray(rgb), t.median_ksize)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    red = ((h <= t.red_hue_low_max) | (h >= t.red_hue_high_min)) & (s >= t.red_s_min)
    red &= v >= t.red_v_min
    green = (h >= t.green_hue_min) & (h <= t.green_hue_max) & (s >= t.green_s_min)
    green &= v >= t.green_v_min
    both = red & green
    ambiguous = both | ((v >= t.ambiguous_v_min) & ~red & ~green)
    class_map = np.zeros(rgb.shape[:2], np.uint8)
    class_map[red & ~both] = 1
    class_map[green & ~both] = 2
    return class_map, int(np.count_nonzero(ambiguous))


def load_mask(path: str | Path, thresholds: MaskThresholds | None = None) -> np.ndarray:
    """A mask file decoded into a uint8 class map."""
    return decode_mask(load_image(path), thresholds)[0]


def stratum(class_map: np.ndarray) -> str:
    """Which polyp classes a class map contains: "red", "green", "both" or "none"."""
    has_red, has_green = bool((class_map == 1).any()), bool((class_map == 2).any())
    if has_red and has_green:
        return "both"
    if has_red:
        return "red"
    return "green" if has_green else "none"
