"""train.py under torchrun: two gloo processes on CPU train one epoch of tiny data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.cache import load_item
from data.probstore import load_probs
from metrics import dice_scores
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
