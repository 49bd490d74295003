"""train.py under torchrun: two gloo processes on CPU train one epoch of tiny data."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.metrics import dice_scores
from data.cache import load_item
from data.probstore import load_probs
from models.inference import load_checkpoint
from tests.trainkit import ROOT, fold_path, history, split_of, train_items, write_config


def test_two_gloo_processes_train_one_epoch(tmp_path: Path, tiny_data: Path) -> None:
    config = write_config(tmp_path, tiny_data, epochs=1)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "train.py", "--config", str(config), "--model", "tiny", "--fold", "0",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    out = fold_path(tmp_path)
    (record,) = history(out)
    assert record["epoch"] == 1 and np.isfinite(record["train_loss"])
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert (out / "best.pt").is_file() and (out / "config.yaml").is_file()

    # The all-reduced validation score of the (only) epoch must equal the score of rank 0's
    # OOF maps from that same model over the whole fold: no image lost or counted twice.
    oof = load_probs(out / "oof")
    assert oof.ids == sorted(i for i, k in split_of(tmp_path).items() if k == 0)
    items = train_items(config)
    target = np.stack([load_item(items[i])[1] for i in oof.ids])
    scores = dice_scores(oof.as_float().argmax(1), target)
    for key in ("competition", "dice_seg", "dice_neo", "dice_non"):
        assert scores[key] == pytest.approx(record[key], abs=0.01), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_a_fold_as_one_process_does_with_the_same_global_batch(
    tmp_path: Path, tiny_data: Path
) -> None:
    """Two torchrun launchers (one process each, as on two machines) meet through c10d
    rendezvous and train one fold: rank 0 alone writes the fold, and the epoch matches a
    single process with the same global batch (2 x 2 = 4) within 2% on the losses (the
    ranks' own BatchNorm statistics and Dice terms are what differ; SyncBatchNorm is CUDA
    only)."""
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = write_config(tmp_path / "two", tiny_data, epochs=1, batch_size=2)
    one = write_config(tmp_path / "one", tiny_data, epochs=1, batch_size=4)
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "--rdzv-id", "fold0",
    ]  # fmt: skip
    fold = ["train.py", "--config", str(two), "--model", "tiny", "--fold", "0"]
    nodes = [
        subprocess.Popen([*launcher, *fold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out[-3000:]
    single = ["train.py", "--config", str(one), "--model", "tiny", "--fold", "0"]
    done = subprocess.run([sys.executable, *single], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    shared, alone = fold_path(tmp_path / "two"), fold_path(tmp_path / "one")
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in alone.iterdir())
    (record,), (reference,) = history(shared), history(alone)
    for key in ("train_loss", "val_loss"):
        assert record[key] == pytest.approx(reference[key], rel=0.02), key
    assert load_probs(shared / "oof").ids == load_probs(alone / "oof").ids
