"""train.py on tiny synthetic data: artefacts, resume (exact and after SIGKILL), folds,
and guard rails (wandb: test_tracking.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data.dataset
import data.paste
import train
from core.config import ConfigError, load_config, parse_img_size
from core.settings import DataSettings
from data.cache import CachedItem, load_item
from data.dataset import to_tensor
from data.loader import SeededSampler
from data.paste import PolypPaste
from data.probstore import load_probs
from data.reader import list_train, load_image
from models.inference import load_checkpoint, model_from_checkpoint
from models.losses import SegLoss
from tests.trainkit import (
    ROOT,
    best_only_at,
    fold_path,
    history,
    run_main,
    split_of,
    train_items,
    write_config,
)
from training import engine
from training.recipe import parse_folds

# Generous: a killed run takes seconds; the limit only turns a hang into a failure.
HANG_LIMIT_S = 600

CHECKPOINT_KEYS = {
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "epoch",
    "best_score",
    "model_name",
    "arch",
    "kwargs",
    "split_id",
    "fold",
    "config",
    "provenance",
}


def softmax_of(ckpt: dict, items: dict, ids: list[str]) -> np.ndarray:
    """A checkpoint's class probabilities for cached items, as the OOF maps store them."""
    net = model_from_checkpoint(ckpt, torch.device("cpu"))
    batch = torch.stack([to_tensor(load_item(items[i])[0]) for i in ids])
    with torch.no_grad():
        return torch.softmax(net(batch), 1).numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """One 2-epoch run of fold 0, shared by the tests that only read its artefacts."""
    root = tmp_path_factory.mktemp("trained")
    assert run_main(write_config(root, tiny_data), "--fold", "0") == 0
    return root


def test_two_epochs_write_every_artefact(trained: Path, tiny_data: Path) -> None:
    out = fold_path(trained)
    records = history(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    for r in records:
        for key in ("val_loss", "competition", "dice_seg", "dice_neo", "dice_non"):
            assert np.isfinite(r[key]), key
        assert r["images_per_s"] > 0 and r["epoch_time_s"] > 0
    assert records[1]["lr"] == pytest.approx(records[0]["lr"] * 0.5)

    last = load_checkpoint(out / "last.pt")
    assert set(last) >= CHECKPOINT_KEYS
    assert last["epoch"] == 2 and last["fold"] == 0 and last["model_name"] == "tiny"
    assert last["best_score"] == pytest.approx(max(r["competition"] for r in records))
    assert last["history"] == records
    assert last["provenance"]["config_hash"]
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == max(records, key=lambda r: r["competition"])["epoch"]
    model = model_from_checkpoint(best, torch.device("cpu"))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    assert load_config(out / "config.yaml")["train"]["epochs"] == 2

    fold_of = split_of(trained)
    oof = load_probs(out / "oof")
    assert oof.meta["kind"] == "oof" and oof.meta["model"] == "tiny"
    assert oof.split_id == last["split_id"] == best["split_id"]
    assert oof.ids == sorted(i for i, k in fold_of.items() if k == 0)
    assert oof.size == (64, 64)
    assert np.allclose(oof.as_float().sum(axis=1), 1.0, atol=0.02)
    assert oof.meta["folds"] == [0] * len(oof)
    orig = {s.id: load_image(s.image).shape[:2] for s in list_train(tiny_data)}
    assert oof.orig_sizes == [orig[i] for i in oof.ids]

    # The maps are best.pt's softmax of the fold's validation images.
    items = train_items(write_config(trained, tiny_data))
    assert np.abs(oof.as_float() - softmax_of(best, items, oof.ids)).max() < 1.5 / 255


def test_oof_maps_come_from_best_pt_not_from_the_last_epoch(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The best epoch is forced to be the first, so that best.pt and last.pt differ on
    every run (the check used to apply only when the scores happened to fall that way)."""
    monkeypatch.setattr(train, "fit", best_only_at(1))
    config = write_config(tmp_path, tiny_data)
    assert run_main(config, "--fold", "0") == 0
    out = fold_path(tmp_path)
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert (best["epoch"], last["epoch"]) == (1, 2)
    oof = load_probs(out / "oof")
    items = train_items(config)
    assert np.abs(oof.as_float() - softmax_of(best, items, oof.ids)).max() < 1.5 / 255
    assert np.abs(oof.as_float() - softmax_of(last, items, oof.ids)).max() > 0.05


def test_complete_fold_is_skipped(trained: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    last = fold_path(trained) / "last.pt"
    before = last.stat().st_mtime_ns
    assert run_main(trained / "tiny.yaml", "--fold", "0") == 0
    assert "already complete" in caplog.text
    assert last.stat().st_mtime_ns == before


def test_nan_guard_then_resume_reproduces_the_uninterrupted_run(
    trained: Path, tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    config = write_config(tmp_path, tiny_data)
    out = fold_path(tmp_path)
    assert run_main(config, "--fold", "0", "--epochs", "1") == 0

    assert run_main(config, "--fold", "0") == 2  # unfinished run, no --resume
    assert "--resume" in capsys.readouterr().err

    class NanLoss(SegLoss):
        def terms(self, output, mask):
            main, total = super().terms(output, mask)
            return main, total * float("nan")

    monkeypatch.setattr(engine, "SegLoss", NanLoss)
    assert run_main(config, "--fold", "0", "--resume") == 1
    assert "non-finite" in capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in history(out)] == [1]
    monkeypatch.undo()

    assert run_main(config, "--fold", "0", "--resume") == 0
    resumed, straight = history(out), history(fold_path(trained))
    for a, b in zip(resumed, straight, strict=True):
        for key in ("epoch", "train_loss", "val_loss", "competition", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    weights = load_checkpoint(out / "last.pt")["model"]
    reference = load_checkpoint(fold_path(trained) / "last.pt")["model"]
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5)


def test_sigkill_then_resume_finishes_with_each_epoch_once(tmp_path: Path, tiny_data: Path) -> None:
    config = write_config(tmp_path, tiny_data, epochs=3)
    out = fold_path(tmp_path)
    cmd = [sys.executable, "train.py", "--config", str(config), "--model", "tiny", "--fold", "0"]
    # killed by the code's own hook right after epoch 1's checkpoint: no timer, no race
    env = {**os.environ, "NEOPOLYP_KILL_AT": "epoch-saved"}
    killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=HANG_LIMIT_S)
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "last.pt")["epoch"] == 1

    assert run_main(config, "--fold", "0", "--resume") == 0
    assert [r["epoch"] for r in history(out)] == [1, 2, 3]
    assert load_checkpoint(out / "last.pt")["epoch"] == 3
    assert load_probs(out / "oof").ids == sorted(i for i, k in split_of(tmp_path).items() if k == 0)


def test_fold_all_oof_covers_every_train_image_once(tmp_path: Path, tiny_data: Path) -> None:
    config = write_config(tmp_path, tiny_data, epochs=1)
    assert run_main(config, "--fold", "all") == 0
    ids = [i for k in (0, 1) for i in load_probs(fold_path(tmp_path, k) / "oof").ids]
    assert sorted(ids) == sorted(s.id for s in list_train(tiny_data))


def test_the_training_loop_never_sees_its_folds_validation_images(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The split as the loop reads it, not as folds.json writes it: a leak here would make
    every OOF score and every decision judged on them meaningless. Pasted polyps count."""
    config = write_config(tmp_path, tiny_data, epochs=1)
    phase = ["setup"]
    loaded: dict[str, set[str]] = {"train": set(), "validate": set()}

    def recording(load):
        def load_recorded(item):
            loaded.setdefault(phase[0], set()).add(item.id)
            return load(item)

        return load_recorded

    def in_phase(name, run):
        def run_in_phase(*args, **kwargs):
            phase[0] = name
            try:
                return run(*args, **kwargs)
            finally:
                phase[0] = "setup"

        return run_in_phase

    pasted: set[str] = set()

    def recording_paste(load):
        def load_pasted(item):
            pasted.add(item.id)
            return load(item)

        return recording(load_pasted)

    monkeypatch.setattr(data.dataset, "load_item", recording(data.dataset.load_item))
    monkeypatch.setattr(data.paste, "load_item", recording_paste(data.paste.load_item))
    monkeypatch.setattr(engine, "train_epoch", in_phase("train", engine.train_epoch))
    monkeypatch.setattr(engine, "evaluate", in_phase("validate", engine.evaluate))
    paste = "data.paste={p: 1.0, classes: [1, 2]}"
    assert run_main(config, "--fold", "0", "--set", paste) == 0
    split = split_of(tmp_path)
    assert loaded["validate"] == {i for i, k in split.items() if k == 0}
    assert loaded["train"] and loaded["train"] <= {i for i, k in split.items() if k != 0}
    assert pasted and pasted <= loaded["train"]  # p = 1: every training sample got a paste


def test_a_folds_loaders_take_the_configured_augmentation_sampling_and_batches(
    tmp_path: Path, tiny_data: Path
) -> None:
    """What reaches the loop besides the ids: the training transform with the config's
    augmentation (validation without), the sampling weights, the seed, whole batches."""
    import albumentations as A

    from core.runtime import Dist
    from data.augment import build_transforms, transforms_for
    from data.loader import stratum_weights
    from data.prepare import prepare_train_data

    augment = "data.augment={vflip: false, affine: {p: 0.9}}"
    sampling = "data.sampling={green: 3, both: 2}"
    cfg = load_config(write_config(tmp_path, tiny_data), [augment, sampling, "seed=7"])
    dist = Dist(rank=0, world_size=1, device=torch.device("cpu"))
    data = prepare_train_data(cfg, dist)
    loaders = engine.build_loaders(cfg, data, 1, dist)
    train_set = loaders.train.dataset.dataset
    expected = build_transforms((64, 64), True, vflip=False, affine={"p": 0.9})
    assert A.to_dict(train_set.transform) == A.to_dict(expected)
    validation = transforms_for(DataSettings.from_config(cfg), train=False)
    assert A.to_dict(loaders.val.dataset.transform) == A.to_dict(validation)
    weights = stratum_weights([it.classes for it in train_set.items], {"green": 3, "both": 2})
    assert loaders.sampler.weights.tolist() == weights and len(set(weights)) > 1
    assert loaders.sampler.seed == 7
    assert loaders.train.drop_last and loaders.train.name == "tiny fold 1 training"
    assert loaders.val.name == "tiny fold 1 validation"
    too_big = {**cfg, "train": {**cfg["train"], "batch_size": len(train_set.items) + 1}}
    with pytest.raises(ConfigError, match=r"exceeds the \d+ training images of fold 1"):
        engine.build_loaders(too_big, data, 1, dist)


def test_the_paste_settings_reach_the_pasting() -> None:
    """`data.paste`'s p and classes, and their defaults (p 0.5, the rare class 2)."""
    items = [
        CachedItem(name, (10, 10), classes, Path(name), Path(name))
        for name, classes in (("a", "red"), ("b", "green"), ("c", "both"), ("d", "none"))
    ]

    def paste(section: dict | None) -> PolypPaste | None:
        return engine.paste_for(DataSettings.from_config({"data": {"paste": section}}), items)

    chosen = paste({"p": 0.3, "classes": [1]})
    assert (chosen.p, chosen.classes, [d.id for d in chosen.donors]) == (0.3, (1,), ["a", "c"])
    default = paste({"classes": [1, 2]})
    assert (default.p, [d.id for d in default.donors]) == (0.5, ["a", "b", "c"])
    rare = paste({"p": 1.0})
    assert (rare.classes, [d.id for d in rare.donors]) == ((2,), ["b", "c"])
    assert paste({}) is None
    assert paste(None) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope", "--fold", "0"], "unknown model 'nope'"),
        (["--model", "tiny", "--fold", "2"], "out of range"),
        (["--model", "tiny", "--fold", "one"], "expected 'all'"),
        (["--model", "tiny", "--fold", "0", "--img-size", "100"], "multiples of 32"),
        (["--model", "tiny", "--fold", "0", "--pretrained", "/no/such.pth"], "not found"),
    ],
)
def test_bad_arguments_exit_2_before_writing(
    tmp_path: Path, tiny_data: Path, capsys, args: list[str], message: str
) -> None:
    config = write_config(tmp_path, tiny_data)
    assert train.main(["--config", str(config), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_seeded_sampler_shards_and_reproduces() -> None:
    shards = [SeededSampler(10, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(4)
    drawn = [list(s) for s in shards]
    indices = [i for d in drawn for i, _ in d]
    assert sorted(indices) == list(range(10))
    again = SeededSampler(10, seed=3, rank=0, world_size=2)
    again.set_epoch(4)
    assert list(again) == drawn[0]
    again.set_epoch(5)
    assert list(again) != drawn[0]


def test_cli_parsers() -> None:
    assert parse_img_size("352") == [352, 352]
    assert parse_img_size("352x416") == [352, 416]
    assert parse_folds("all", 3) == [0, 1, 2]
    assert parse_folds("2,0,2", 3) == [2, 0]


def test_a_changed_recipe_is_refused_with_its_keys_then_force_retrains(
    trained: Path, tmp_path: Path, tiny_data: Path, capsys
) -> None:
    import shutil

    shutil.copytree(trained / "out", tmp_path / "out")
    config = write_config(tmp_path, tiny_data)
    out = fold_path(tmp_path)
    before = (out / "best.pt").stat().st_mtime_ns
    for extra in (["--set", "train.lr=0.001"], ["--resume", "--set", "train.lr=0.001"]):
        assert run_main(config, "--fold", "0", *extra) == 2
        err = capsys.readouterr().err
        assert "train.lr: 0.003 -> 0.001" in err and "--force" in err and "experiment=" in err
    assert (out / "best.pt").stat().st_mtime_ns == before
    # Loader settings do not count: the fold is still complete and skipped.
    assert run_main(config, "--fold", "0", "--workers", "1", "--set", "train.cpu_threads=2") == 0
    assert "skipped (complete)" in capsys.readouterr().out
    assert run_main(config, "--fold", "0", "--force", "--set", "train.lr=0.001") == 0
    assert (out / "best.pt").stat().st_mtime_ns != before
    assert load_checkpoint(out / "last.pt")["config"]["train"]["lr"] == 0.001


def test_a_finished_folds_lost_best_pt_names_the_retrain_command(
    trained: Path, tmp_path: Path, tiny_data: Path, capsys
) -> None:
    """It said "checkpoint not found" on every rerun: last.pt cannot stand in for the
    best epoch's weights, so the only remedy is to retrain that fold."""
    import shutil

    shutil.copytree(trained / "out", tmp_path / "out")
    config = write_config(tmp_path, tiny_data)
    out = fold_path(tmp_path)
    (out / "best.pt").unlink()
    last = (out / "last.pt").stat().st_mtime_ns
    assert run_main(config, "--fold", "0", "--resume") == 2
    err = capsys.readouterr().err
    assert f"{out / 'best.pt'} is missing, but {out / 'last.pt'} has 2 epochs" in err
    assert f"python train.py --config {config} --model tiny --fold 0 --force" in err
    assert (out / "last.pt").stat().st_mtime_ns == last
    assert run_main(config, "--fold", "0", "--force") == 0
    assert load_checkpoint(out / "best.pt")["fold"] == 0


def test_a_new_split_refuses_folds_of_the_old_one(
    trained: Path, tmp_path: Path, tiny_data_copy: Path, capsys
) -> None:
    import json
    import shutil

    shutil.copytree(trained / "out", tmp_path / "out")
    config = write_config(tmp_path, tiny_data_copy)
    victim = sorted((tiny_data_copy / "train").iterdir())[0]
    victim.unlink()
    (tiny_data_copy / "train_gt" / victim.name).unlink()
    folds_file = tmp_path / "out" / "tiny" / "folds.json"
    old_split = json.loads(folds_file.read_text())["split_id"]
    folds_file.unlink()  # as the data-change error advises
    assert run_main(config, "--fold", "0") == 2
    err = capsys.readouterr().err
    new_split = json.loads(folds_file.read_text())["split_id"]
    assert f'split_id: "{old_split}" -> "{new_split}"' in err
    assert run_main(config, "--fold", "0", "--force") == 0
    assert load_checkpoint(fold_path(tmp_path) / "best.pt")["split_id"] == new_split


def test_masks_without_polyps_or_of_unknown_colour_stop_training(
    tmp_path: Path, tiny_data_copy: Path, capsys
) -> None:
    import cv2

    masks = sorted((tiny_data_copy / "train_gt").iterdir())
    h, w = cv2.imread(str(masks[0])).shape[:2]
    cv2.imwrite(str(masks[0]), np.zeros((h, w, 3), np.uint8))
    blue = np.zeros((h, w, 3), np.uint8)
    blue[:, : w // 2] = (255, 0, 0)  # BGR: blue, neither class
    blue[h // 3 : h // 2, w // 2 + 5 : w // 2 + 30] = (0, 0, 255)  # a red polyp
    cv2.imwrite(str(masks[1]), blue)
    config = write_config(tmp_path, tiny_data_copy)
    assert run_main(config, "--fold", "0") == 2
    err = capsys.readouterr().err
    assert f"{masks[0].name}: no red or green polyp pixels" in err
    assert f"{masks[1].name}: " in err and "neither black, red nor green" in err
    assert not fold_path(tmp_path).exists()
    accept = ["--set", "+data.allow_empty_masks=true", "--set", "+data.max_ambiguous_frac=0.9"]
    assert run_main(config, "--fold", "0", "--epochs", "1", *accept) == 0


def test_an_unwritable_out_dir_is_one_line_naming_it_and_exit_1(
    tmp_path: Path, tiny_data: Path, capsys
) -> None:
    import errno

    from core.config import environment_error

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path, tiny_data)
    assert run_main(config, "--fold", "0", "--out-dir", str(blocker / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a_file" in err[0] and err[0].startswith("error: cannot write")
    # A full disk reaches us wrapped by torch.save; the chain is searched.
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/best.pt")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file") from inner
    except RuntimeError as outer:
        assert environment_error(outer) == "cannot write /runs/best.pt: No space left on device"
    assert environment_error(ValueError("a bug")) is None


def test_a_damaged_log_or_cache_array_is_repaired_by_a_rerun(
    trained: Path, tmp_path: Path, tiny_data: Path
) -> None:
    import shutil

    shutil.copytree(trained / "out", tmp_path / "out")
    config = write_config(tmp_path, tiny_data)
    out = fold_path(tmp_path)
    records = history(out)
    log_file = out / "log.jsonl"
    log_file.write_text(log_file.read_text()[:-40])  # cut inside the last record
    arrays = sorted((tmp_path / "out" / "cache").rglob("*.image.npy"))
    arrays[0].write_bytes(arrays[0].read_bytes()[:100])
    assert run_main(config, "--fold", "0", "--resume") == 0
    assert history(out) == records
    assert np.load(arrays[0]).shape[:2] == (64, 64)


def test_a_complete_fold_drops_its_optimizer_state_and_half_best_halves_its_weights(
    tmp_path: Path, tiny_data: Path, trained: Path, caplog
) -> None:
    """The defaults of a Kaggle-sized disk: no last.pt once a fold is complete; with
    `half_best` the same weights, rounded to fp16, and the OOF maps made from them."""
    config = write_config(tmp_path, tiny_data, keep_last=False, half_best=True)
    assert run_main(config, "--fold", "0") == 0
    out = fold_path(tmp_path)
    assert not (out / "last.pt").exists()
    best = load_checkpoint(out / "best.pt")
    full = fold_path(trained) / "best.pt"
    reference = load_checkpoint(full)["model"]
    assert best["model"].keys() == reference.keys()
    for key, value in best["model"].items():
        if value.is_floating_point():
            assert value.dtype == torch.float16 and torch.equal(value, reference[key].half()), key
    assert (out / "best.pt").stat().st_size < 0.6 * full.stat().st_size
    oof = load_probs(out / "oof")
    expected = softmax_of(best, train_items(config), oof.ids)
    assert np.abs(oof.as_float() - expected).max() < 1.5 / 255
    # complete without last.pt; extending it is a fresh start, said so
    assert run_main(config, "--fold", "0", "--resume") == 0
    assert [r["epoch"] for r in history(out)] == [1, 2]
    assert run_main(config, "--fold", "0", "--resume", "--epochs", "3") == 0
    assert "removed when the fold completed" in caplog.text
    assert [r["epoch"] for r in history(out)] == [1, 2, 3]
    assert not (out / "last.pt").exists()
