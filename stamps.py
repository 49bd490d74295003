"""Whether a stage must run again, decided by what its inputs hold, not by file times.

File times say nothing about which output was made from which input once a folder has
been restored from a backup, copied, or written by a machine whose clock runs ahead: with
outputs an hour "newer" than the clock, a changed TTA re-predicted every model but the
blend, refinement and tuning were skipped, and the submission kept the old blend. So the
pipeline records, for every stage it ran, a digest of the bytes that stage read
(`<exp>/stamps.json`); the stage runs again when that digest changes, when one of its
outputs is missing, or when the settings its artefacts record differ from the config's.

Hashing costs about a second per GB; the inputs after training are checkpoints,
probability stores, images and masks, a few GB for the largest recipe: seconds against
hours. (Training itself is not a stamped stage: a fold's identity, recipe.py, covers the
bytes of the files it trained on, hashed as the cache reads them.)
A folder without `stamps.json` (made before it existed, or deleted) reruns every stage
after training once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from data.atomic import write_json
from data.reader import DataError

_BLOCK = 1 << 20


def _files(path: Path) -> list[tuple[str, Path]]:
    """(name, file) for a file, or for every file inside a folder (names relative to it)."""
    if path.is_dir():
        return [(str(f.relative_to(path)), f) for f in sorted(path.rglob("*")) if f.is_file()]
    return [(path.name, path)]


def digest(paths: Iterable[Path]) -> str:
    """sha256 over each input's name and bytes, in the order given (folders: every file
    inside, sorted). A missing input raises DataError naming it."""
    total = hashlib.sha256()
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: input not found")
        for name, file in _files(path):
            with file.open("rb") as fh:
                inner = hashlib.file_digest(fh, "sha256").hexdigest()
            total.update(f"{name}\0{inner}\n".encode())
    return total.hexdigest()


class Stamps:
    """The digests of the inputs each stage last ran on, in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recorded: dict[str, str] = {}
        if path.is_file():
            try:
                self.recorded = dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                raise DataError(f"{path}: unreadable ({exc}); delete it to rerun") from exc

    def changed(self, stage: str, inputs: str, outputs: Sequence[Path]) -> bool:
        """True when an output is missing or the stage last ran on other inputs."""
        return not all(p.exists() for p in outputs) or self.recorded.get(stage) != inputs

    def record(self, stage: str, inputs: str) -> None:
        """After the stage succeeded: it ran on `inputs` (digested before it started)."""
        self.recorded[stage] = inputs
        write_json(self.path, self.recorded)
