"""A training run's epoch log and a fold's record of failed attempts: written by the
training loop, read by the verdicts, the pipeline and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.invocation import retrain_hint
from core.paths import RunFiles
from data.atomic import write_text
from data.reader import DataError


def read_log(path: Path) -> list[dict[str, Any]]:
    """The run's log records; DataError naming the file when a line is not a record."""
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise DataError(f"{path}: damaged log ({exc})") from exc


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(rec) + "\n" for rec in history))


def failed_attempts(run: RunFiles) -> list[dict[str, Any]]:
    """The fold's failed attempts so far (its `retries.json`); the next attempt's number
    is their count."""
    path = run.retries
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["failed"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: unreadable ({exc}); retrain the fold: {retrain_hint(run.dir)}"
        ) from exc
