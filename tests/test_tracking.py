"""W&B tracking on tiny data, offline: what an unsynced run folder holds.

The runs are read back from their `.wandb` files (W&B's record log: 32 KiB blocks of
records framed as in LevelDB's log format, each a `wandb_internal_pb2.Record`), so the
test checks what `wandb sync` would upload, not that some call was made.
"""

from __future__ import annotations

import json
from pathlib import Path

import wandb
import yaml
from wandb.proto import wandb_internal_pb2 as pb

import pipeline
from tests.trainkit import write_config

BLOCK, HEADER = 32768, 7


def run_records(path: Path) -> list[pb.Record]:
    """Every record of a `.wandb` file, reassembled across block boundaries."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    i, parts, out = HEADER, b"", []
    while i + HEADER <= len(data):
        left = BLOCK - i % BLOCK
        if left < HEADER:  # a block's tail too short for a header is zero padding
            i += left
            continue
        length, kind = int.from_bytes(data[i + 4 : i + 6], "little"), data[i + 6]
        parts += data[i + HEADER : i + HEADER + length]
        i += HEADER + length
        if kind in (1, 4):  # FULL or LAST: the record is complete
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def offline_runs(folder: Path) -> dict[str, tuple[Path, list[pb.Record]]]:
    """display name -> (run folder, records)."""
    runs = {}
    for log in folder.glob("offline-run-*/run-*.wandb"):
        records = run_records(log)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        runs[run.display_name] = (log.parent, records)
    return runs


def test_pipeline_wandb_runs_hold_images_tables_and_artefacts(tmp_path, tiny_data, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = write_config(tmp_path, tiny_data, epochs=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["ensemble"] = {"models": ["tiny"], "trials": 2, "objective": "competition"}
    cfg["tune"] = {"trials": 2, "objective": "competition"}
    path.write_text(yaml.safe_dump(cfg))
    assert pipeline.main(["--config", str(path), "--wandb"]) == 0
    wandb.teardown()  # W&B's service writes the run logs asynchronously; wait for it
    exp = tmp_path / "out" / "tiny"
    runs = offline_runs(exp / "wandb")
    assert set(runs) == {"tiny-fold0", "tiny-fold1", "summary"}

    for fold in (0, 1):
        folder, records = runs[f"tiny-fold{fold}"]
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_group, run.job_type) == ("tiny/tiny", "train")
        # the last epoch logs validation overlays: 4 images, each with prediction and
        # ground-truth masks, every file in the run folder
        (overlays,) = [
            json.loads(item.value_json)
            for r in records
            if r.WhichOneof("record_type") == "history"
            for item in r.history.item
            if list(item.nested_key) == ["val_overlays", "all_masks"]
        ]
        assert len(overlays) == 4
        assert all(set(masks) == {"prediction", "ground_truth"} for masks in overlays)
        for path in [m["path"] for masks in overlays for m in masks.values()]:
            assert (folder / "files" / path).is_file(), path
        assert len(list((folder / "files" / "media" / "images").glob("val_overlays_*.png"))) == 4

    folder, records = runs["summary"]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type) == ("tiny", "summary")
    artifacts = {
        r.artifact.name: sorted(c.path for c in r.artifact.manifest.contents)
        for r in records
        if r.WhichOneof("record_type") == "artifact"
    }
    assert artifacts["tiny-results"] == ["report.html", "submission.csv"]
    for name in ("report.html", "submission.csv"):
        assert (folder / "files" / name).read_bytes() == (exp / name).read_bytes()
    tables = {p.name.split("_")[0] for p in (folder / "files" / "media" / "table").glob("*")}
    assert {"Out-of-fold (working resolution)", "blend weights", "post-processing ablation"} <= (
        tables
    )
    summary = "".join(str(r.summary) for r in records if r.WhichOneof("record_type") == "summary")
    assert "blend_weights" in summary and "postprocess" in summary


def test_force_retraining_keeps_unsynced_runs(tmp_path, tiny_data, monkeypatch) -> None:
    import train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = write_config(tmp_path, tiny_data, epochs=1)
    argv = ["--config", str(config), "--model", "tiny", "--fold", "1", "--wandb"]
    assert train.main(argv) == 0
    assert train.main([*argv, "--force"]) == 0
    runs = list((tmp_path / "out" / "tiny" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert not (tmp_path / "out" / "tiny" / "tiny" / "fold1" / "wandb").exists()
