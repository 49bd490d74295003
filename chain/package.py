"""The exported package: a finished experiment's submission chain in one folder (or zip).

export.py writes it, infer.py applies it to any folder of images without the experiment
folder or the training data:

    PKG/
        manifest.json                       format, sha256 and size of every other file,
                                            provenance (git hash, config hash, split id,
                                            the chain's out-of-fold scores)
        chain.json                          what infer.py runs: working size, TTA, each
                                            network's entry and fold files, blend weights,
                                            refiner and whether it is used, post-processing,
                                            classes and their colours
        models/<model>/fold<k>.safetensors  weights only (as trained, or fp16 by --half)
        models/<model>/fold<k>.onnx         with export.py --onnx
        region_refiners.safetensors         the fold refiners, when refine.py ran

Nothing in it is a pickle: weights are safetensors, everything else JSON, so a package
from someone else cannot run code when opened. Every file is checked against the
manifest before any is used; a file that differs is named and refused. The manifest is
the whole package: its names are plain relative paths that stay inside the folder
(symlinks included), a file it does not list is refused, and chain.json may name only
files it lists, so nothing outside what was hashed is ever read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import safetensors.torch
import torch
from torch import nn

from chain.postprocessing import PostprocessParams
from data.atomic import atomic_write, write_json
from data.reader import DataError
from models.inference import NUM_CLASSES
from models.registry import build_model

FORMAT = 1
MANIFEST = "manifest.json"
CHAIN = "chain.json"
REFINERS = "region_refiners.safetensors"
# Class ids of the class maps and the colours of the competition's masks (NEOPOLYP.md).
CLASSES = {
    "0": {"name": "background", "colour": [0, 0, 0]},
    "1": {"name": "neoplastic", "colour": [255, 0, 0]},
    "2": {"name": "non-neoplastic", "colour": [0, 255, 0]},
}


class PackageError(DataError):
    """A package that is incomplete, altered, or of another format."""


def weights_file(model: str, fold: int) -> str:
    return f"models/{model}/fold{fold}.safetensors"


def onnx_file(model: str, fold: int) -> str:
    return f"models/{model}/fold{fold}.onnx"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(state: dict[str, torch.Tensor], path: Path, half: bool) -> None:
    """A state dict as safetensors; `half` stores floating tensors as fp16 (half the size;
    the network computes in its own dtype after loading, so results move by fp16 rounding
    of the weights and the submission is no longer byte-identical to the pipeline's)."""
    tensors = {
        name: (t.half() if half and t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in state.items()
    }
    # serialised here and written by Python, so a full disk or a file-size limit is an
    # OSError naming the file (safetensors' own writer raised its SafetensorError)
    write_bytes(path, safetensors.torch.save(tensors))


def write_bytes(path: Path, data: bytes) -> None:
    """A package file, through atomic_write: an OSError names `path`."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_manifest(root: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """manifest.json over every file under `root`: the last file written."""
    files = {
        p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT, "files": files, "provenance": provenance}
    write_json(root / MANIFEST, manifest)
    return manifest


def _inside(root: Path, name: Any, where: Path) -> Path:
    """`root / name` for a name that is a plain relative path staying inside `root` (no
    absolute path, no '..', no link leading out), else PackageError naming `where`."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise PackageError(f"{where}: refused, {name!r} is not a relative path inside the package")
    file = root / name
    if not file.resolve().is_relative_to(root.resolve()):
        raise PackageError(
            f"{where}: refused, {name!r} leads outside the package ({file.resolve()})"
        )
    return file


def read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json of the folder `root`, its names checked (`_inside`), not its files."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackageError(f"{path}: not a package manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise PackageError(
            f"{path}: package format {manifest.get('format')!r}; this code reads format "
            f"{FORMAT}: export it again with this version"
        )
    for name in files:
        _inside(root, name, path)
    return manifest


def unlisted(root: Path, listed: Collection[str]) -> list[Path]:
    """Files (and links) under `root` that are neither manifest.json nor listed."""
    names = {*listed, MANIFEST}
    return [
        p
        for p in sorted(root.rglob("*"))
        if (p.is_file() or p.is_symlink()) and p.relative_to(root).as_posix() not in names
    ]


def verify(root: Path) -> dict[str, Any]:
    """The manifest, once every file it lists is present with its size and sha256 and the
    folder holds nothing else."""
    manifest = read_manifest(root)
    files = manifest["files"]
    extra = unlisted(root, files)
    if extra:
        raise PackageError(
            f"{extra[0]}: not listed in {MANIFEST}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + ": a package holds only the files its manifest lists; remove it or export "
            "the package again"
        )
    path = root / MANIFEST
    for name, expected in files.items():
        file = root / name
        if not file.is_file():
            raise PackageError(f"{file}: listed in {MANIFEST} but missing")
        if not isinstance(expected, dict):
            raise PackageError(f"{path}: {name!r} has no sha256 and size")
        if file.stat().st_size != expected.get("bytes") or sha256(file) != expected.get("sha256"):
            raise PackageError(
                f"{file}: its sha256 differs from {MANIFEST}: the file was changed or "
                "damaged after export; export the package again"
            )
    if CHAIN not in files:
        raise PackageError(f"{path}: lists no {CHAIN}")
    return manifest


def is_package(path: Path) -> bool:
    """Whether `path` is a package folder (its manifest lists every file in it) or a zip
    holding one: what export.py --force may replace, and nothing else."""
    if path.is_dir():
        try:
            return not unlisted(path, read_manifest(path)["files"])
        except PackageError:
            return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    tops = {name.split("/", 1)[0] for name in names}
    return len(tops) == 1 and {f"{t}/{MANIFEST}" for t in tops} <= set(names)


def _extract(archive: Path, into: Path) -> Path:
    """A zipped package's files under `into`, refusing names that would land outside it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                target = (into / name).resolve()
                if not target.is_relative_to(into.resolve()):
                    raise PackageError(f"{archive}: refused, {name!r} would unpack outside")
            zf.extractall(into)
    except zipfile.BadZipFile as exc:
        raise PackageError(f"{archive}: not a readable zip ({exc})") from exc
    roots = {p.parent for p in into.rglob(MANIFEST)}
    if len(roots) != 1:
        raise PackageError(f"{archive}: holds {len(roots)} {MANIFEST} files, not one")
    return roots.pop()


@contextmanager
def open_package(path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(folder, manifest) of a verified package folder or zip (unpacked to a temporary
    folder for the duration)."""
    if path.is_dir():
        yield path, verify(path)
        return
    if not path.is_file():
        raise PackageError(f"{path}: no package here (a folder or zip from export.py)")
    tmp = Path(tempfile.mkdtemp(prefix="neopolyp-package-"))
    try:
        root = _extract(path, tmp)
        yield root, verify(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def zip_folder(root: Path, fh: IO[bytes]) -> None:
    """The package folder as a zip, its files under the folder's name (stored, not
    deflated: weights barely compress)."""
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, (Path(root.name) / p.relative_to(root)).as_posix())


@dataclass(frozen=True)
class Network:
    """One blended model: how to build it, its TTA and its fold files."""

    name: str
    arch: str
    kwargs: dict[str, Any]
    tta: str
    folds: list[str]
    onnx: list[str] | None

    def build(self, root: Path, fold: int, device: torch.device) -> nn.Module:
        """The fold's network in eval mode, weights from the package (never a hub)."""
        model = build_model(self.arch, num_classes=NUM_CLASSES, pretrained=None, **self.kwargs)
        path = root / self.folds[fold]
        try:
            model.load_state_dict(safetensors.torch.load_file(str(path)))
        except (OSError, RuntimeError, ValueError) as exc:
            raise PackageError(f"{path}: weights do not fit {self.arch} ({exc})") from exc
        return model.to(device).eval()


@dataclass(frozen=True)
class Chain:
    """chain.json: everything between an image file and its class map."""

    img_size: tuple[int, int]
    batch_size: int
    precision: str
    channels_last: bool
    cpu_threads: int
    networks: list[Network]
    weights: list[float]
    source: str  # "blend" or "refined": which maps the post-processing reads
    refiner: dict[str, Any] | None  # {"file", "settings", "use_mask"}
    postprocess: PostprocessParams
    classes: dict[str, Any]

    @classmethod
    def read(cls, root: Path) -> Chain:
        """chain.json of a package folder, every file it names listed in the manifest."""
        path = root / CHAIN
        try:
            doc = json.loads(path.read_text())
            networks = [Network(**n) for n in doc["networks"]]
            chain = cls(
                img_size=(int(doc["img_size"][0]), int(doc["img_size"][1])),
                batch_size=int(doc["batch_size"]),
                precision=str(doc["precision"]),
                channels_last=bool(doc["channels_last"]),
                cpu_threads=int(doc["cpu_threads"]),
                networks=networks,
                weights=[float(w) for w in doc["weights"]],
                source=str(doc["source"]),
                refiner=doc.get("refiner"),
                postprocess=PostprocessParams.from_dict(doc["postprocess"]),
                classes=doc["classes"],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PackageError(f"{path}: unreadable chain ({exc})") from exc
        if len(chain.weights) != len(networks) or not networks:
            raise PackageError(f"{path}: {len(networks)} networks, {len(chain.weights)} weights")
        if chain.source == "refined" and not chain.refiner:
            raise PackageError(f"{path}: the chain uses refined maps but holds no refiner")
        for net in networks:
            if net.onnx is not None and len(net.onnx) != len(net.folds):
                raise PackageError(
                    f"{path}: {net.name} has {len(net.onnx)} ONNX files for {len(net.folds)} folds"
                )
        listed = read_manifest(root)["files"]
        for name in chain.files():
            if not isinstance(name, str) or name not in listed:
                raise PackageError(
                    f"{path}: refused, it names {name!r}, which {MANIFEST} does not list: "
                    "a chain reads only the package's own hashed files"
                )
        return chain

    def files(self) -> list[Any]:
        """Every package file the chain reads: fold weights, ONNX files, the refiner."""
        names = [f for n in self.networks for f in [*n.folds, *(n.onnx or [])]]
        return names + ([self.refiner.get("file")] if isinstance(self.refiner, dict) else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "img_size": list(self.img_size),
            "batch_size": self.batch_size,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "cpu_threads": self.cpu_threads,
            "networks": [vars(n) for n in self.networks],
            "weights": self.weights,
            "source": self.source,
            "refiner": self.refiner,
            "postprocess": self.postprocess.to_dict(),
            "classes": self.classes,
        }

    @property
    def refines(self) -> bool:
        return self.source == "refined"
