"""SIGKILL at the worst moments, then a rerun: the same submission as a run never killed.

The kills come from a hook inside the code (`runtime.kill_point`, set by NEOPOLYP_KILL_AT),
not from a timer, so each lands exactly where it is meant to: just after an epoch's
checkpoint, after a probability store's content is written but before it is renamed into
place, and between two folds of predict.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.runtime import KILL_POINTS
from tests.trainkit import ROOT, write_config

LIMIT_S = 600  # generous: a run takes ~15 s; the limit only turns a hang into a failure


def _config(root: Path, data: Path) -> Path:
    path = write_config(root, data, epochs=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["ensemble"] = {"models": ["tiny"], "trials": 2, "objective": "competition"}
    cfg["tune"] = {"trials": 3, "objective": "competition"}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pipeline(config: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NEOPOLYP_KILL_AT"}
    if kill_at:
        env["NEOPOLYP_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "pipeline.py", "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> str:
    root = tmp_path_factory.mktemp("straight")
    done = _pipeline(_config(root, tiny_data))
    assert done.returncode == 0, done.stderr[-2000:]
    return (root / "out" / "tiny" / "submission.csv").read_text()


@pytest.mark.slow(30)
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_then_a_rerun_gives_the_uninterrupted_submission(
    point: str, uninterrupted: str, tmp_path: Path, tiny_data: Path
) -> None:
    config = _config(tmp_path, tiny_data)
    killed = _pipeline(config, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "out" / "tiny"
    assert not (out / "submission.csv").exists()
    done = _pipeline(config)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "submission.csv").read_text() == uninterrupted
    leftovers = [p for p in out.rglob(".*") if p.name.endswith(".tmp") or "-old" in p.name]
    assert leftovers == []
