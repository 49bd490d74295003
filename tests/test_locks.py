"""locks.py and its users: one pipeline per experiment, one process per fold, and no
`--parallel` child left training after its pipeline was killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import locks
from tests.trainkit import ROOT, write_config

LIMIT_S = 300  # only turns a hang into a failure; the waits below end on events


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path: Path) -> None:
    path = tmp_path / "exp" / ".lock"
    held = rf"experiment exp is in use by pid {os.getpid()} "
    with (
        locks.hold(path, "experiment exp"),
        pytest.raises(locks.InUse, match=held),
        locks.hold(path, "experiment exp"),
    ):
        pass
    with locks.hold(path, "experiment exp"):  # released with its block
        pass


def _alive(pid: int) -> bool:
    """Running, not a zombie that no one has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _free(path: Path) -> bool:
    try:
        with locks.hold(path, str(path)):
            return True
    except locks.InUse as exc:
        print(exc)
        return False


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not condition():
        assert time.monotonic() < deadline, f"waited {LIMIT_S} s for {what}"
        time.sleep(0.2)


@pytest.mark.slow(51)
def test_a_second_run_is_refused_and_a_killed_pipeline_takes_its_children_along(
    tmp_path: Path, tiny_data: Path
) -> None:
    config = write_config(tmp_path, tiny_data, epochs=500)  # still training when killed
    exp = tmp_path / "out" / "tiny"
    fold_locks = [exp / "tiny" / f".fold{k}.lock" for k in range(2)]
    cmd = [sys.executable, "pipeline.py", "--config", str(config), "--parallel", "2"]
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    children: list[int] = []
    try:

        def both_folds_held() -> bool:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            return all(p.is_file() and "train.py" in p.read_text() for p in fold_locks)

        _wait_for(both_folds_held, "both folds to start training")
        children = [int(re.search(r"pid (\d+)", p.read_text())[1]) for p in fold_locks]
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"experiment {exp} is in use by pid {first.pid} " in second.stderr
        by_hand = [sys.executable, "train.py", "--config", str(config), "--model", "tiny"]
        by_hand += ["--fold", "0", "--resume"]
        hand = subprocess.run(by_hand, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
        assert hand.returncode == 2, hand.stderr[-2000:]
        assert f"tiny fold 0 is in use by pid {children[0]} " in hand.stderr

        first.kill()  # SIGKILL: no cleanup runs in the pipeline
        first.wait()
        _wait_for(lambda: not any(map(_alive, children)), "the children to end")
        # the kernel releases every lock once no process holds its file open (a child's
        # subprocess between fork and exec may for a moment)
        _wait_for(lambda: all(map(_free, [exp / ".lock", *fold_locks])), "the locks")
    finally:
        first.kill()
        for pid in filter(_alive, children):
            os.kill(pid, signal.SIGKILL)
