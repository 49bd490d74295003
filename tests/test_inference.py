"""Checkpoints that cannot be ours are refused with the file's name, not a traceback."""

from __future__ import annotations

import pytest
import torch

from data.reader import DataError
from models.inference import load_checkpoint


def test_truncated_missing_or_foreign_checkpoints_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {}, "arch": "unet_mobilenetv3", "kwargs": {}}, good)
    assert load_checkpoint(good)["arch"] == "unet_mobilenetv3"

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match=r"truncated\.pt: unreadable checkpoint"):
        load_checkpoint(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(DataError, match=r"foreign\.pt: not a train\.py checkpoint"):
        load_checkpoint(foreign)

    with pytest.raises(DataError, match=r"absent\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


class _RunsCode:
    """Unpickling this calls `open(marker, "w")`: what a crafted shared checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "best.pt"
    torch.save(
        {"model": {}, "arch": "unet_mobilenetv3", "kwargs": {}, "x": _RunsCode(marker)}, crafted
    )
    with pytest.raises(DataError, match=r"best\.pt: refused.*could run code"):
        load_checkpoint(crafted)
    assert not marker.exists()
    # The loader that would have run it is the one every stage uses: prove the file works.
    torch.load(crafted, weights_only=False)
    assert marker.exists()
