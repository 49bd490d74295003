"""Every stage on frames of the real set's size (1280 wide, 959-1024 high), few of them.

The other tests use small frames for speed; bugs that only full-size frames show (the
loader deadlock of OpenCV threads, resizing back to an original size, RLE of a 1280-wide
mask) need this size. Training and prediction with loader workers are covered by
tests/test_loader.py; here the whole pipeline runs in-process at a 64x64 working size.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import yaml

import pipeline
from data.probstore import load_probs
from data.reader import list_test, list_train
from data.submission import ROW_CLASSES, check_submission, image_size, rle_decode
from postprocess import class_maps, load_params
from tests.trainkit import write_config


def test_every_stage_runs_on_full_size_frames(full_size_data: Path, tmp_path: Path) -> None:
    sizes = {
        s.id: image_size(s.image) for s in [*list_train(full_size_data), *list_test(full_size_data)]
    }
    assert all(w == 1280 and 959 <= h <= 1024 for h, w in sizes.values()), sizes
    config = write_config(tmp_path, full_size_data, epochs=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["models"]["tiny2"] = dict(cfg["models"]["tiny"])
    cfg["ensemble"] = {"models": ["tiny", "tiny2"], "trials": 3}
    cfg["tune"] = {"trials": 3}
    config.write_text(yaml.safe_dump(cfg))

    assert pipeline.main(["--config", str(config)]) == 0
    exp = tmp_path / "out" / "tiny"
    for store in ("tiny/oof", "tiny2/test", "ensemble/oof", "ensemble/test"):
        maps = load_probs(exp / store)
        assert maps.size == (64, 64)
        assert [tuple(s) for s in maps.orig_sizes] == [sizes[i] for i in maps.ids], store
    assert json.loads((exp / "ensemble" / "weights.json").read_text())["trials"] == 3
    assert (exp / "postprocess.json").is_file()
    # the submission is the blend post-processed with the tuned parameters, at each
    # image's original size, row by row
    rows = dict(csv.reader((exp / "submission.csv").open()))
    assert check_submission(exp / "submission.csv", full_size_data) == []
    params = load_params(exp / "postprocess.json")
    test_ids = {s.id for s in list_test(full_size_data)}
    assert json.loads((exp / "postprocess.json").read_text())["source"] == "blend"
    blended = dict(class_maps(load_probs(exp / "ensemble" / "test"), params))
    assert set(blended) == test_ids
    for image_id, class_map in blended.items():
        assert class_map.shape == sizes[image_id]
        for suffix, cls in ROW_CLASSES.items():
            decoded = rle_decode(rows[f"{image_id}_{suffix}"], sizes[image_id])
            np.testing.assert_array_equal(decoded, class_map == cls)
    tables = json.loads((exp / "scores.json").read_text())["tables"]
    rows = tables["Test set (original size, test_gt/)"]
    assert {"blend, equal weights", "predict nothing"} <= {r["model"] for r in rows}
