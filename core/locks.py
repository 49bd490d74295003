"""One process at a time on an experiment folder, and on each fold.

Two `pipeline.py` runs on one out dir used to interleave: the second resumed a fold the
first was still training, and both wrote its checkpoints. An advisory `flock` on a small
file settles it: the kernel drops it when its holder exits, however it exits (SIGKILL
included), so no stale lock is ever left to clean up by hand. The file holds a line about
the holder, which the refused process prints. `pipeline.py` holds the experiment's lock;
`train.py` holds each fold's, so a `train.py` started by hand on a fold that a pipeline
(or its `--parallel` children) is training stops too.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InUse(Exception):
    """Another live process holds the lock: this command cannot run now (exit 2)."""


@contextmanager
def hold(path: Path, what: str) -> Iterator[None]:
    """Hold `path`'s lock for the block, or raise InUse at once naming the holder.

    Refusing rather than waiting: a pipeline that waits hours for another one to finish
    looks hung, and the user usually started the second by mistake.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise InUse(
                f"{what} is in use by {holder}; wait for it to end or stop it "
                f"(the lock is {path} and goes with that process)"
            ) from None
        fh.seek(0)
        fh.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} ({command}, since {started})\n")
        fh.flush()
        yield
