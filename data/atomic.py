"""Atomic writes: a killed run must never leave a half-written artefact behind.

Every artefact (checkpoint, probability store, folds file, submission) is written to a
temporary name in the same folder and renamed into place, which POSIX makes atomic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create owner-only entries; artefacts should get the usual permissions.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(path: Path) -> None:
    """Delete the temporaries a killed writer of `path` left behind.

    A SIGKILL skips every cleanup, so a temporary file or folder would stay forever. Each
    temporary's name carries its writer's pid; those whose process is gone are removed,
    and a live writer's (another process writing the same artefact) are left alone.
    """
    for leftover in path.parent.glob(f".{path.name}.p*.*"):
        pid = leftover.name[len(path.name) + 3 :].split(".", 1)[0].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _prefix(path: Path, kind: str = "") -> str:
    return f".{path.name}.p{os.getpid()}{kind}."


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write names the artefact, not "a file"
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_yaml(path: str | Path, obj: Any) -> None:
    """Keys in their own order: a saved config reads like the file it came from."""
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def save_torch(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` as a whole.

    The old folder, if any, is moved aside first and deleted only after the new one is in
    place, so `path` never holds a mix of the two: it is the complete old or the complete
    new folder, or, for the instant between two renames, absent (a crash exactly there
    leaves the old one intact under `.<name>.old-*`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        old = None
        if path.exists():
            # a fresh name, so a leftover of a crashed run can never block the move
            old = Path(tempfile.mkdtemp(prefix=_prefix(path, "-old"), dir=path.parent))
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
