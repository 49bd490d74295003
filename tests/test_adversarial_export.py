"""export.py, package.py and infer.py against a user's mistakes and a hostile package.

Issue 39 ("Trust, round two"): export replaced whatever folder --out named, packed weights
retrained after the submission was made, infer replaced its outputs with a failed run's,
read its own outputs as images, and loaded files the manifest did not vouch for.
"""

from __future__ import annotations

import json
import resource
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export
import infer
import pipeline
import postprocess
import predict
import train
from chain.lineage import KEY
from chain.package import CHAIN, MANIFEST, Chain, sha256
from core import locks
from core.paths import InferFiles
from data.probstore import META_FILE
from data.submission import image_size
from models import build_model
from models.inference import Probabilities
from tests.test_export import class_maps_of, private_copy
from tests.test_onnx import TOLERANCE
from tests.trainkit import ROOT, demo_model


@pytest.fixture(scope="module")
def experiment(two_model_experiment: Path) -> Path:
    """test_export's finished two-model experiment (conftest.py). Read-only."""
    return two_model_experiment


@pytest.fixture(scope="module")
def package(experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The experiment's package (export only reads the experiment). Read-only."""
    out = tmp_path_factory.mktemp("package") / "package"
    assert export.main(["--config", str(experiment / "tiny.yaml"), "--out", str(out)]) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes, but infer's lock (each run writes its pid)."""
    lock = InferFiles(folder).lock
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p != lock
    }


def run_infer(package: Path, images: Path, out: Path, *extra: str) -> int:
    return infer.main(
        ["--package", str(package), "--images", str(images), "--out", str(out), *extra]
    )


def hints(err: str) -> list[list[str]]:
    """The commands a refusal names after 'bring it up to date: ', each as argv."""
    commands = err.strip().splitlines()[-1].split("bring it up to date: ", 1)[1]
    return [shlex.split(command) for command in commands.split(", then ")]


def hint(err: str) -> list[str]:
    """The one command a refusal names."""
    (command,) = hints(err)
    return command


def rewrite_manifest(root: Path, edit) -> None:
    """Apply `edit` to the manifest's files, each remaining entry's hash made true again."""
    path = root / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest["files"])
    for name in manifest["files"]:
        file = root / name
        if file.is_file():
            manifest["files"][name] = {"sha256": sha256(file), "bytes": file.stat().st_size}
    path.write_text(json.dumps(manifest))


# export --out: nothing but a package is replaced, and a package only with --force


@pytest.mark.parametrize("target", ["foreign", "experiment", "data"])
def test_export_refuses_a_folder_that_is_not_a_package_and_leaves_it_whole(
    experiment,
    tmp_path,
    capsys,
    target,
):
    root, flags = private_copy(experiment, tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("four years of work\n")
    out = {"foreign": docs, "experiment": root / "out" / "tiny", "data": root / "data"}[target]
    before = snapshot(out)
    for force in ([], ["--force"]):
        assert export.main([*flags, "--out", str(out), *force]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: a folder that is not a package" in err
        assert len(err.strip().splitlines()) == 1
        assert snapshot(out) == before


def test_export_writes_an_empty_folder_and_replaces_a_package_only_with_force(
    experiment,
    tmp_path,
    capsys,
):
    _, flags = private_copy(experiment, tmp_path)
    out = tmp_path / "pkg"
    out.mkdir()
    assert export.main([*flags, "--out", str(out)]) == 0
    first = snapshot(out)
    capsys.readouterr()
    assert export.main([*flags, "--out", str(out)]) == 2
    assert f"--out {out}: a package is there already; add --force" in capsys.readouterr().err
    assert snapshot(out) == first
    assert export.main([*flags, "--out", str(out), "--force"]) == 0
    assert set(snapshot(out)) == set(first)
    # a package with a stranger's file inside is not export's alone: refused even so
    (out / "notes.txt").write_text("mine\n")
    assert export.main([*flags, "--out", str(out), "--force"]) == 2
    assert (out / "notes.txt").read_text() == "mine\n"
    # a zip name: a file that is not a package zip is never replaced
    archive = tmp_path / "thesis.zip"
    archive.write_bytes(b"not a zip")
    assert export.main([*flags, "--out", str(archive), "--force"]) == 2
    assert "not a package" in capsys.readouterr().err
    assert archive.read_bytes() == b"not a zip"


# export checks the submission chain is current


def test_export_refuses_weights_retrained_after_the_submission_until_the_chain_is_redone(
    experiment,
    tmp_path,
    capsys,
):
    """The issue's command: a fold retrained by hand after the submission was made (with
    the config's own learning rate, so the hint's pipeline accepts the fold). Its best.pt
    is other bytes: only predicting again could tell whether it predicts the same."""
    root, flags = private_copy(experiment, tmp_path)
    out = tmp_path / "package"
    retrain = ["--model", "tiny", "--fold", "0", "--force", "--set", "train.lr=0.003"]
    assert train.main([*flags, *retrain]) == 0
    capsys.readouterr()
    assert export.main([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tiny/fold0/best.pt changed since predict.py made tiny/oof" in err
    command = hint(err)
    assert command[:2] == ["python", "pipeline.py"] and set(flags) <= set(command)
    assert not out.exists()
    assert pipeline.main(command[2:]) == 0
    assert export.main([*flags, "--out", str(out)]) == 0
    images = root / "data" / "test"
    assert run_infer(out, images, tmp_path / "predicted") == 0
    submission = root / "out" / "tiny" / "submission.csv"
    assert (tmp_path / "predicted" / "submission.csv").read_bytes() == submission.read_bytes()


def test_export_refuses_a_blend_made_before_a_model_was_predicted_again(
    experiment,
    tmp_path,
    capsys,
):
    """tiny2 predicted again with another TTA: the blend, the tuning and the submission
    still hold the old maps, and the package would record the new TTA."""
    _, flags = private_copy(experiment, tmp_path)
    assert predict.main([*flags, "--model", "tiny2", "--tta", "none"]) == 0
    capsys.readouterr()
    assert export.main([*flags, "--out", str(tmp_path / "package")]) == 2
    err = capsys.readouterr().err
    assert "tiny2/oof changed since ensemble.py made ensemble/oof" in err
    assert hint(err)[:2] == ["python", "pipeline.py"]
    assert not (tmp_path / "package").exists()


def test_export_refuses_a_submission_not_made_by_postprocess_json(
    experiment,
    tmp_path,
    capsys,
):
    """submission.csv written with other parameters (postprocess.py --params): the package
    would carry postprocess.json's. The hint's postprocess.py mends it."""
    _, flags = private_copy(experiment, tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"params": {"fg_threshold": 0.02}}))
    assert postprocess.main([*flags, "--params", str(other)]) == 0
    capsys.readouterr()
    assert export.main([*flags, "--out", str(tmp_path / "package")]) == 2
    err = capsys.readouterr().err
    assert "submission.csv is not what postprocess.json makes of" in err
    command = hint(err)
    assert command[:2] == ["python", "postprocess.py"]
    assert postprocess.main(command[2:]) == 0
    assert export.main([*flags, "--out", str(tmp_path / "package")]) == 0


def test_export_refuses_stores_that_record_no_inputs_naming_the_stage_to_run(
    experiment,
    tmp_path,
    capsys,
):
    """A store of an older predict.py says nothing of its checkpoints: the pipeline alone
    would not predict it again (its stamps are current), so the hint starts with predict."""
    root, flags = private_copy(experiment, tmp_path)
    meta_file = root / "out" / "tiny" / "tiny" / "test" / META_FILE
    meta = json.loads(meta_file.read_text())
    del meta[KEY]
    meta_file.write_text(json.dumps(meta))
    assert export.main([*flags, "--out", str(tmp_path / "package")]) == 2
    err = capsys.readouterr().err
    assert "tiny/test records no inputs" in err
    first, then = hints(err)
    assert first[:2] == ["python", "predict.py"] and first[-2:] == ["--model", "tiny"]
    assert then == ["python", "pipeline.py", *first[2:-2]] and set(flags) <= set(then)
    assert predict.main(first[2:]) == 0  # runs as printed; the blend is now the stale link
    assert export.main([*flags, "--out", str(tmp_path / "package")]) == 2
    assert "changed since ensemble.py made ensemble/oof" in capsys.readouterr().err


# infer: outputs replaced only by a successful run, and only its own


def test_a_run_that_reads_no_image_keeps_the_previous_outputs(
    package, experiment, tmp_path, capsys
):
    out = tmp_path / "out"
    images = experiment / "data" / "test"
    assert run_infer(package, images, out, "--masks", "--overlays") == 0
    before = snapshot(out)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (broken / name).write_bytes(b"\xff\xd8 not a jpeg")
    assert run_infer(package, broken, out, "--masks") == 1
    assert "none of the 2 images could be read" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_run_stopped_by_a_bad_image_keeps_the_previous_masks(
    package,
    experiment,
    tmp_path,
    monkeypatch,
):
    """The first chunk's masks were written before the bad image of the second stopped
    the run: masks/ mixed two runs."""
    monkeypatch.setattr(infer, "CHUNK_IMAGES", 1)  # chunks of one batch (4 images)
    test_images = sorted((experiment / "data" / "test").iterdir())
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    shutil.copyfile(test_images[0], first / test_images[0].name)
    for image in test_images[1:]:
        shutil.copyfile(image, second / image.name)
    (second / "zzz.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    assert run_infer(package, first, out, "--masks") == 0
    before = snapshot(out)
    assert run_infer(package, second, out, "--masks", "--bad-images", "stop") == 1
    assert snapshot(out) == before


def test_a_new_run_leaves_no_masks_of_the_previous_one(package, experiment, tmp_path):
    images = sorted((experiment / "data" / "test").iterdir())
    some = tmp_path / "some"
    some.mkdir()
    for image in images[:2]:
        shutil.copyfile(image, some / image.name)
    out = tmp_path / "out"
    assert run_infer(package, experiment / "data" / "test", out, "--masks", "--overlays") == 0
    assert len(list((out / "masks").iterdir())) == len(images)
    assert run_infer(package, some, out, "--masks") == 0
    assert sorted(p.stem for p in (out / "masks").iterdir()) == sorted(p.stem for p in images[:2])
    assert not (out / "overlays").exists()  # this run made none: the old ones are gone
    rows = (out / "submission.csv").read_text().splitlines()[1:]
    assert len(rows) == 4
    assert not list(out.glob(".staging-*"))


def test_infer_refuses_an_out_inside_images_and_images_inside_out(
    package,
    experiment,
    tmp_path,
    capsys,
):
    images = Path(shutil.copytree(experiment / "data" / "test", tmp_path / "images"))
    before = snapshot(images)
    assert run_infer(package, images, images / "predictions", "--masks") == 2
    err = capsys.readouterr().err
    assert f"--out {images / 'predictions'} is inside --images {images}" in err
    assert snapshot(images) == before and not (images / "predictions").exists()
    assert run_infer(package, images, tmp_path, "--masks") == 2
    assert f"--images {images} is inside --out {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "masks").exists() and not (tmp_path / "submission.csv").exists()


def test_a_second_infer_on_the_same_out_is_refused_while_the_first_runs(
    package,
    experiment,
    tmp_path,
    capsys,
):
    out = tmp_path / "out"
    images = experiment / "data" / "test"
    assert run_infer(package, images, out) == 0
    before = snapshot(out)
    capsys.readouterr()
    with locks.hold(InferFiles(out).lock, f"--out {out}"):  # as a running infer.py holds it
        assert run_infer(package, images, out, "--masks") == 2
    err = capsys.readouterr().err
    assert f"--out {out} is in use by pid" in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before
    assert run_infer(package, images, out) == 0  # released with its holder


def test_infer_refuses_to_replace_outputs_it_did_not_write(
    package,
    experiment,
    tmp_path,
    capsys,
):
    out = tmp_path / "results"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "hand_drawn.png").write_bytes(b"a person's work")
    (out / "notes.txt").write_text("kept\n")
    before = snapshot(out)
    assert run_infer(package, experiment / "data" / "test", out, "--masks") == 2
    assert f"--out {out}: holds masks, which infer.py did not write" in capsys.readouterr().err
    assert snapshot(out) == before
    (out / "masks" / "hand_drawn.png").unlink()
    (out / "masks").rmdir()
    assert run_infer(package, experiment / "data" / "test", out, "--masks") == 0
    assert (out / "notes.txt").read_text() == "kept\n"  # a folder of other files is fine


# the manifest is the package: nothing it does not list, nothing outside


def test_a_file_the_manifest_does_not_list_is_refused(package, experiment, tmp_path, capsys):
    """The issue's case: a fold's entry removed from the manifest and its file replaced."""
    copy = Path(shutil.copytree(package, tmp_path / "package"))
    fold = Chain.read(copy).networks[0].folds[0]
    other = Chain.read(copy).networks[0].folds[1]
    rewrite_manifest(copy, lambda files: files.pop(fold))
    shutil.copyfile(copy / other, copy / fold)
    assert run_infer(copy, experiment / "data" / "test", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{copy / fold}: not listed in {MANIFEST}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_chain_paths_outside_the_package_are_refused(
    package,
    experiment,
    tmp_path,
    capsys,
    where,
):
    """chain.json pointing a fold at weights outside the package, its hash made true."""
    copy = Path(shutil.copytree(package, tmp_path / "package"))
    doc = json.loads((copy / CHAIN).read_text())
    fold = doc["networks"][0]["folds"][0]
    shutil.copyfile(copy / doc["networks"][0]["folds"][1], tmp_path / "outside.safetensors")
    named = {"absolute": str(tmp_path / "outside.safetensors"), "parent": "../outside.safetensors"}
    doc["networks"][0]["folds"][0] = named[where]
    (copy / CHAIN).write_text(json.dumps(doc))
    rewrite_manifest(copy, lambda files: None)
    assert fold in json.loads((copy / MANIFEST).read_text())["files"]
    assert run_infer(copy, experiment / "data" / "test", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"refused, it names {named[where]!r}, which {MANIFEST} does not list" in err


@pytest.mark.parametrize("entry", ["parent", "absolute", "symlink"])
def test_manifest_entries_leading_outside_the_package_are_refused(
    package,
    experiment,
    tmp_path,
    capsys,
    entry,
):
    copy = Path(shutil.copytree(package, tmp_path / "package"))
    outside = tmp_path / "outside.safetensors"
    chain = Chain.read(copy)
    shutil.copyfile(copy / chain.networks[0].folds[1], outside)
    fold = chain.networks[0].folds[0]
    if entry == "symlink":  # the fold's file is a link out of the package, hashed as its target
        (copy / fold).unlink()
        (copy / fold).symlink_to(outside)
        rewrite_manifest(copy, lambda files: None)
        named = fold
    else:
        named = "../outside.safetensors" if entry == "parent" else str(outside)
        rewrite_manifest(copy, lambda files: files.update({named: {}}))
    assert run_infer(copy, experiment / "data" / "test", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{MANIFEST}: refused, {named!r}" in err
    assert not (tmp_path / "out").exists()


# one line, not a traceback


def test_export_under_a_file_size_limit_is_one_line_and_leaves_nothing(
    experiment,
    tmp_path,
):
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "package"
    cmd = [sys.executable, "export.py", "--config", str(experiment / "tiny.yaml")]
    for target, named in ((out, out / "models" / "tiny"), (tmp_path / "p.zip", tmp_path)):
        done = subprocess.run(
            [*cmd, "--out", str(target)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            preexec_fn=small_files,
        )
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot write {named}") and "File too large" in last
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--jobs", "0"], "--jobs 0: give N >= 1, or -1 for all cores"),
        (["--jobs", "2", "--threads", "2"], "--threads is the deprecated name of --jobs"),
    ],
)
def test_infer_refuses_bad_thread_and_job_counts_in_one_line(
    package,
    experiment,
    tmp_path,
    capsys,
    flag,
    message,
):
    assert run_infer(package, experiment / "data" / "test", tmp_path / "out", *flag) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}" or err.strip().startswith(f"error: {message}")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --half --onnx: the ONNX files are halved too, and still agree


def test_a_half_onnx_network_stores_fp16_and_matches_torch_on_the_same_weights(tmp_path):
    entry = demo_model("fpn_mobilenetv3")
    torch.manual_seed(0)
    model = build_model(entry["arch"], num_classes=3, **entry["kwargs"]).eval()
    export.export_onnx(model, tmp_path / "full.onnx", (64, 96))
    export.export_onnx(model, tmp_path / "half.onnx", (64, 96), half=True)
    assert (tmp_path / "half.onnx").stat().st_size < 0.55 * (tmp_path / "full.onnx").stat().st_size
    rounded = build_model(entry["arch"], num_classes=3, **entry["kwargs"]).eval()
    rounded.load_state_dict(
        {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    )
    onnx = infer.OnnxNetwork(tmp_path / "half.onnx", threads=1, device=torch.device("cpu"))
    for shape in [(1, 3, 64, 96), (3, 3, 96, 128)]:
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = Probabilities(rounded)(images)
            got = Probabilities(onnx)(images)
        assert (got - expected).abs().max().item() < TOLERANCE, shape


def test_a_half_onnx_package_halves_its_onnx_files_and_infers_like_its_weights(
    experiment,
    tmp_path,
):
    flags = ["--config", str(experiment / "tiny.yaml"), "--onnx"]
    sizes = {}
    for name, extra in (("full", []), ("half", ["--half"])):
        assert export.main([*flags, "--out", str(tmp_path / name), *extra]) == 0
        sizes[name] = sum(p.stat().st_size for p in (tmp_path / name).rglob("*.onnx"))
    assert sizes["half"] < 0.55 * sizes["full"]
    images = experiment / "data" / "test"
    maps = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / runtime
        assert run_infer(tmp_path / "half", images, out, "--runtime", runtime) == 0
        sizes = {p.stem: image_size(p) for p in images.iterdir()}
        maps[runtime] = class_maps_of(out / "submission.csv", sizes)
    differing = sum(int((maps["torch"][i] != maps["onnx"][i]).sum()) for i in sizes)
    assert differing <= 1e-3 * sum(h * w for h, w in sizes.values())
