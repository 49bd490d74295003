"""export.py and infer.py: a tiny experiment's package, alone, reproduces its submission."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import ensemble
import export
import infer
import postprocess
import tune
from chain.package import MANIFEST, Chain, open_package
from chain.records import BlendRecord
from core import ticker
from core.settings import layout_of
from data.probstore import align_stores, load_probs
from data.reader import list_test
from data.submission import check_rows, image_size, rle_decode


@pytest.fixture(scope="module")
def experiment(two_model_experiment: Path) -> Path:
    """A finished two-model experiment with flip TTA and a refiner (conftest.py)."""
    return two_model_experiment


def private_copy(experiment: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the experiment and its data, and the flags that point the stages at it."""
    root = Path(shutil.copytree(experiment, tmp_path / "experiment"))
    flags = [
        "--config",
        str(root / "tiny.yaml"),
        "--out-dir",
        str(root / "out"),
        "--data-dir",
        str(root / "data"),
    ]
    return root, flags


def blend_both(root: Path, flags: list[str]) -> None:
    """Blend both networks (0.4 / 0.6) whatever the decision was, through ensemble.py's
    own writer, tune on that blend and submit it: a current chain of two networks to
    reproduce (export refuses a chain tuned on another blend)."""
    cfg = yaml.safe_load((root / "tiny.yaml").read_text())
    cfg.update(out_dir=str(root / "out"), data_dir=str(root / "data"))
    layout = layout_of(cfg)
    record = BlendRecord.read(layout.weights)
    record = dataclasses.replace(
        record,
        weights=[0.4, 0.6],
        fold_weights={k: [0.4, 0.6] for k in record.fold_weights},
    )
    oof = align_stores([load_probs(layout.store(m, "oof")) for m in record.models])
    ensemble.write_blends(layout, record, oof, oof[0].meta["folds"], cfg)
    record.write(layout.weights)
    assert tune.main(flags) == 0
    assert postprocess.main(flags) == 0


def class_maps_of(submission: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Each image's class map decoded from a submission's two rows."""
    maps = {i: np.zeros(s, np.uint8) for i, s in sizes.items()}
    with submission.open(newline="") as fh:
        for row_id, runs in list(csv.reader(fh))[1:]:
            image_id, _, suffix = row_id.rpartition("_")
            maps[image_id][rle_decode(runs, sizes[image_id]) > 0] = 1 + int(suffix)
    return maps


def reproduce(root: Path, flags: list[str], tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """Export, keep the test images and the submission, delete the experiment folder and
    the data, then infer from the package alone; (expected, reproduced) submissions."""
    package = tmp_path / "package"
    assert export.main([*flags, "--out", str(package), *extra]) == 0
    images = Path(shutil.copytree(root / "data" / "test", tmp_path / "images"))
    expected = Path(shutil.copyfile(root / "out" / "tiny" / "submission.csv", tmp_path / "exp.csv"))
    shutil.rmtree(root)
    out = tmp_path / "predicted"
    argv = ["--package", str(package), "--images", str(images), "--out", str(out), "--masks"]
    assert infer.main(argv) == 0
    return expected, out


def test_a_package_alone_reproduces_the_submission_byte_for_byte(experiment, tmp_path, capsys):
    root, flags = private_copy(experiment, tmp_path)
    blend_both(root, flags)
    expected, out = reproduce(root, flags, tmp_path)
    assert (out / "submission.csv").read_bytes() == expected.read_bytes()
    printed = capsys.readouterr().out
    assert "MB)" in printed and "6 images predicted, 0 skipped" in printed
    # the PNG masks are the submitted classes, at each image's own size
    images = tmp_path / "images"
    sizes = {p.stem: image_size(p) for p in images.iterdir()}
    for image_id, truth in class_maps_of(expected, sizes).items():
        mask = cv2.imread(str(out / "masks" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and np.array_equal(mask, truth), image_id
    # the package: weights as safetensors, no pickle, every file in the manifest
    package = tmp_path / "package"
    manifest = json.loads((package / MANIFEST).read_text())
    files = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {MANIFEST}
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl"))]
    chain = Chain.read(package)
    assert [n.name for n in chain.networks] == ["tiny", "tiny2"] and chain.weights == [0.4, 0.6]
    assert all(n.tta == "hflip" and len(n.folds) == 2 for n in chain.networks)
    assert manifest["provenance"]["split_id"] and manifest["provenance"]["chain"]


def test_the_refined_chain_is_reproduced_too(experiment, tmp_path, monkeypatch):
    """A chain that submits the refined maps: the package carries the fold refiners.
    Streamed a batch at a time (two chunks here), it still gives the same bytes."""
    monkeypatch.setattr(infer, "CHUNK_IMAGES", 1)
    root, flags = private_copy(experiment, tmp_path)
    tuned = root / "out" / "tiny" / "postprocess.json"
    doc = json.loads(tuned.read_text())
    doc["source"] = "refined"
    tuned.write_text(json.dumps(doc))
    assert postprocess.main(flags) == 0
    blended = experiment / "out" / "tiny" / "submission.csv"
    expected, out = reproduce(root, flags, tmp_path, "--onnx")
    assert Chain.read(tmp_path / "package").refines
    assert (out / "submission.csv").read_bytes() == expected.read_bytes()
    assert expected.read_bytes() != blended.read_bytes()  # the refiner changed something
    # onnxruntime runs the same chain; its sums differ in the last bits
    onnx_out = tmp_path / "onnx"
    argv = ["--package", str(tmp_path / "package"), "--images", str(tmp_path / "images")]
    assert infer.main([*argv, "--out", str(onnx_out), "--runtime", "onnx"]) == 0
    sizes = {p.stem: image_size(p) for p in (tmp_path / "images").iterdir()}
    torch_maps = class_maps_of(expected, sizes)
    onnx_maps = class_maps_of(onnx_out / "submission.csv", sizes)
    differing = sum(int((torch_maps[i] != onnx_maps[i]).sum()) for i in sizes)
    assert differing <= 1e-3 * sum(h * w for h, w in sizes.values())


def test_a_zipped_package_works_and_a_changed_file_is_refused(experiment, tmp_path, capsys):
    root, flags = private_copy(experiment, tmp_path)
    archive = tmp_path / "package.zip"
    assert export.main([*flags, "--out", str(archive)]) == 0
    images = root / "data" / "test"
    run = ["--images", str(images), "--out", str(tmp_path / "out")]
    assert infer.main(["--package", str(archive), *run]) == 0
    assert (tmp_path / "out" / "submission.csv").read_bytes() == (
        root / "out" / "tiny" / "submission.csv"
    ).read_bytes()
    folder = tmp_path / "unpacked"
    with open_package(archive) as (unpacked, _):
        shutil.copytree(unpacked, folder)
    weights = folder / Chain.read(folder).networks[0].folds[-1]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert infer.main(["--package", str(folder), *run]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "sha256 differs" in err


def test_a_corrupt_image_is_skipped_and_counted_or_stops_the_run(
    experiment, tmp_path, capsys, caplog, monkeypatch
):
    monkeypatch.setattr(ticker, "PROGRESS_S", 0.01)  # progress lines as it runs
    caplog.set_level(logging.INFO, logger="infer")
    root, flags = private_copy(experiment, tmp_path)
    package = tmp_path / "package"
    assert export.main([*flags, "--out", str(package)]) == 0
    images = Path(shutil.copytree(root / "data" / "test", tmp_path / "images"))
    good = next(images.iterdir())
    bad = images / "broken.jpg"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    out = tmp_path / "out"
    base = ["--package", str(package), "--images", str(images), "--out", str(out)]
    assert infer.main(base) == 0
    printed = capsys.readouterr().out
    assert "6 images predicted, 1 skipped" in printed and str(bad) in printed
    assert re.search(r"infer: \d/7 images, [\d.]+ images/(s|min), ~[\d.]+ min left", caplog.text)
    assert re.search(r"infer: 7/7 images in [\d.]+ min", caplog.text)
    sizes = {p.stem: image_size(p) for p in images.iterdir() if p != bad}
    assert check_rows(out / "submission.csv", sizes) == []
    before = (out / "submission.csv").read_bytes()
    assert infer.main([*base, "--bad-images", "stop"]) == 1
    assert str(bad) in capsys.readouterr().err
    assert (out / "submission.csv").read_bytes() == before  # the earlier file is kept
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copyfile(bad, only_bad / "a.jpg")
    shutil.copyfile(bad, only_bad / "b.jpg")
    argv = ["--package", str(package), "--images", str(only_bad), "--out", str(tmp_path / "o")]
    assert infer.main(argv) == 1
    assert "none of the 2 images could be read" in capsys.readouterr().err


def test_nested_full_size_frames_keep_their_folders_and_sizes(experiment, tmp_path, full_size_data):
    _, flags = private_copy(experiment, tmp_path)
    package = tmp_path / "package"
    assert export.main([*flags, "--out", str(package)]) == 0
    images = tmp_path / "frames"
    frames = list_test(full_size_data)
    for video, sample in zip(("video1", "video2"), frames, strict=True):
        (images / video).mkdir(parents=True)
        shutil.copyfile(sample.image, images / video / f"0001{sample.image.suffix}")
    out = tmp_path / "out"
    argv = ["--package", str(package), "--images", str(images), "--out", str(out)]
    assert infer.main([*argv, "--masks", "--overlays"]) == 0
    for video, sample in zip(("video1", "video2"), frames, strict=True):
        h, w = image_size(sample.image)
        assert w == 1280
        mask = cv2.imread(str(out / "masks" / video / "0001.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1, 2}
        overlay = cv2.imread(str(out / "overlays" / video / "0001.jpg"))
        assert overlay.shape == (h, w, 3)
    rows = [r[0] for r in csv.reader((out / "submission.csv").open())][1:]
    assert rows == ["video1/0001_0", "video1/0001_1", "video2/0001_0", "video2/0001_1"]


def test_a_half_precision_package_is_half_the_size_and_still_predicts(experiment, tmp_path):
    _, flags = private_copy(experiment, tmp_path)
    sizes = {}
    for name, extra in (("full", []), ("half", ["--half"])):
        package = tmp_path / name
        assert export.main([*flags, "--out", str(package), *extra]) == 0
        sizes[name] = sum(p.stat().st_size for p in package.rglob("*.safetensors"))
    assert sizes["half"] < 0.55 * sizes["full"]
    images = experiment / "data" / "test"
    out = tmp_path / "out"
    argv = ["--package", str(tmp_path / "half"), "--images", str(images), "--out", str(out)]
    assert infer.main(argv) == 0
    assert (
        check_rows(
            out / "submission.csv",
            {s.id: image_size(s.image) for s in list_test(experiment / "data")},
        )
        == []
    )


def test_export_refuses_an_unfinished_experiment(experiment, tmp_path, capsys):
    root, flags = private_copy(experiment, tmp_path)
    (root / "out" / "tiny" / "submission.csv").unlink()
    assert export.main([*flags, "--out", str(tmp_path / "package")]) == 2
    assert "submission.csv not found" in capsys.readouterr().err
    assert not (tmp_path / "package").exists()
