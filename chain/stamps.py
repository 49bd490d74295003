"""Whether a stage must run again, decided by what its inputs hold, not by file times.

File times say nothing about which output was made from which input once a folder has
been restored from a backup, copied, or written by a machine whose clock runs ahead: with
outputs an hour "newer" than the clock, a changed TTA re-predicted every model but the
blend, refinement and tuning were skipped, and the submission kept the old blend. So the
pipeline records, for every stage it ran, the digest of each input that stage read
(`<exp>/stamps.json`: {stage: {input's name: digest}}); the stage runs again when one of
them changes, when one of its outputs is missing, or when the settings its artefacts
record differ from the config's. One digest per input, rather than one for them all, lets
the pipeline say which input changed ("train_gt/ab12.jpeg changed"), not only that one did.

Hashing costs about a second per GB; the inputs after training are checkpoints,
probability stores, images and masks, a few GB for the largest recipe: seconds against
hours. Each file is read once per check: the per-input digests and the combined one of a
record from before them come from the same pass. (Training itself is not a stamped stage:
a fold's identity, recipe.py, covers the bytes of the files it trained on, hashed as the
cache reads them.) A folder without `stamps.json` (made before it existed, or deleted)
reruns every stage after training once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.invocation import rerun_hint
from data.atomic import write_json
from data.reader import DataError

# What a record from before per-input digests (one digest for all) is called when it differs.
ONE_DIGEST = "its inputs (stamps.json recorded one digest for all)"


def _files(path: Path) -> list[tuple[str, Path]]:
    """(name, file) for a file, or for every file inside a folder (names relative to it)."""
    if path.is_dir():
        return [(str(f.relative_to(path)), f) for f in sorted(path.rglob("*")) if f.is_file()]
    return [(path.name, path)]


def _entries(path: Path) -> str:
    """What a digest hashes of one input: each file's name and sha256, a line each. A
    missing input raises DataError naming it."""
    if not path.exists():
        raise DataError(f"{path}: input not found")
    lines = []
    for name, file in _files(path):
        with file.open("rb") as fh:
            lines.append(f"{name}\0{hashlib.file_digest(fh, 'sha256').hexdigest()}\n")
    return "".join(lines)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def digest(paths: Iterable[Path]) -> str:
    """sha256 over each input's name and bytes, in the order given (folders: every file
    inside, sorted). A missing input raises DataError naming it."""
    return _sha256("".join(_entries(p) for p in paths))


@dataclass(frozen=True)
class Inputs:
    """The digests of a stage's inputs: `each` {name: digest([path])}, what stamps.json
    records, and `total`, digest() of them all in order, what it recorded before."""

    each: dict[str, str]
    total: str

    @classmethod
    def of(cls, named: Mapping[str, Path], read: dict[Path, str] | None = None) -> Inputs:
        """The digests of `named` {name: path}. `read`: what earlier checks of this call
        read, by path, to read each file once while nothing writes it (the caller empties
        it when a stage has run)."""
        read = {} if read is None else read
        entries = {}
        for name, path in named.items():
            if path not in read:
                read[path] = _entries(path)
            entries[name] = read[path]
        each = {name: _sha256(text) for name, text in entries.items()}
        return cls(each, _sha256("".join(entries.values())))


class Stamps:
    """The digests of the inputs each stage last ran on, in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recorded: dict[str, dict[str, str] | str] = {}
        if path.is_file():
            try:
                self.recorded = dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                raise DataError(
                    f"{path}: unreadable ({exc}); delete it (every stage after training then "
                    f"runs once more) and run again: {rerun_hint()}"
                ) from exc

    def changes(self, stage: str, inputs: Inputs) -> dict[str, str] | None:
        """Each input that differs from the stage's last run, by name: "changed", "new" or
        "gone"; {} when none does, None when the stage has no record. A record from before
        per-input digests names no input: {ONE_DIGEST: "changed"}."""
        recorded = self.recorded.get(stage)
        if recorded is None:
            return None
        if isinstance(recorded, str):
            return {} if recorded == inputs.total else {ONE_DIGEST: "changed"}
        now = inputs.each
        states = {}
        for name in sorted(recorded.keys() | now.keys()):
            if name not in now:
                states[name] = "gone"
            elif name not in recorded:
                states[name] = "new"
            elif recorded[name] != now[name]:
                states[name] = "changed"
        return states

    def record(self, stage: str, inputs: Inputs) -> None:
        """After the stage succeeded: it ran on `inputs` (digested before it started)."""
        self.recorded[stage] = dict(inputs.each)
        write_json(self.path, self.recorded)
