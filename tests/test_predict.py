"""predict.py: OOF and test stores from fold checkpoints, with and without TTA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import predict
from core.config import load_config
from data.cache import load_item
from data.dataset import to_tensor
from data.probstore import load_probs
from data.reader import list_test, list_train, load_image
from models import inference
from models.inference import Probabilities, load_checkpoint, model_from_checkpoint
from tests.trainkit import fold_path, run_main, split_of, train_items, write_config

CPU = torch.device("cpu")
# One uint8 quantisation step of the stores, plus float noise.
STEP = 1.5 / 255


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """Both folds of the tiny experiment, one epoch each."""
    root = tmp_path_factory.mktemp("predict")
    assert run_main(write_config(root, tiny_data, epochs=1), "--fold", "all") == 0
    return root


def fold_model(root: Path, fold: int) -> nn.Module:
    return model_from_checkpoint(load_checkpoint(fold_path(root, fold) / "best.pt"), CPU)


def softmax(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        batch = torch.stack([to_tensor(im) for im in images])
        return torch.softmax(model(batch), 1).numpy()


def test_no_tta_reuses_fold_oof_and_averages_folds_on_test(trained: Path, tiny_data: Path) -> None:
    config = trained / "tiny.yaml"
    assert predict.main(["--config", str(config), "--model", "tiny", "--tta", "none"]) == 0
    model_dir = trained / "out" / "tiny" / "tiny"

    oof = load_probs(model_dir / "oof")
    fold_of = split_of(trained)
    assert oof.ids == sorted(s.id for s in list_train(tiny_data))
    assert oof.meta["folds"] == [fold_of[i] for i in oof.ids]
    assert oof.meta["kind"] == "oof" and oof.meta["tta"] == "none" and oof.meta["model"] == "tiny"
    assert oof.split_id == load_checkpoint(fold_path(trained, 0) / "best.pt")["split_id"]
    for k in (0, 1):
        part = load_probs(fold_path(trained, k) / "oof")
        np.testing.assert_array_equal(oof.subset(part.ids).raw, part.raw)

    test = load_probs(model_dir / "test")
    samples = list_test(tiny_data)
    assert test.ids == [s.id for s in samples]
    assert test.orig_sizes == [load_image(s.image).shape[:2] for s in samples]
    assert test.meta["kind"] == "test" and test.meta["folds"] == [0, 1]
    assert test.split_id == oof.split_id and test.size == (64, 64)
    cache = trained / "out" / "cache"
    images = np.stack([load_item(it)[0] for it in _test_items(config, cache)])
    expected = (
        softmax(fold_model(trained, 0), images) + softmax(fold_model(trained, 1), images)
    ) / 2
    np.testing.assert_allclose(test.as_float(), expected, atol=STEP)


def _test_items(config: Path, cache: Path):
    items = predict.prepare_test_items(load_config(config))
    assert all(cache in it.image_file.parents for it in items)
    return items


def test_flip_tta_averages_probabilities_of_the_four_flips(trained: Path) -> None:
    config = trained / "tiny.yaml"
    assert predict.main(["--config", str(config), "--model", "tiny", "--tta", "flip"]) == 0
    oof = load_probs(trained / "out" / "tiny" / "tiny" / "oof")
    assert oof.meta["tta"] == "flip"

    fold0 = load_probs(fold_path(trained, 0) / "oof")
    images = np.stack([load_item(train_items(config)[i])[0] for i in fold0.ids])
    model = fold_model(trained, 0)
    views = []
    for flip_h in (False, True):
        for flip_v in (False, True):
            axes = [a for a, on in ((2, flip_h), (1, flip_v)) if on]
            flipped = np.flip(images, axes) if axes else images
            probs = softmax(model, np.ascontiguousarray(flipped))
            back = [a + 1 for a in axes]  # (N, C, H, W): image axis 2 -> 3, 1 -> 2
            views.append(np.flip(probs, back) if back else probs)
    expected = np.mean(views, axis=0)
    got = oof.subset(fold0.ids).as_float()
    np.testing.assert_allclose(got, expected, atol=STEP)
    assert np.abs(got - fold0.as_float()).max() > 2 * STEP  # TTA changed the maps


class Counting(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize(("tta", "passes"), [("hflip", 2), ("flip", 4), ("d4", 8)])
def test_tta_of_a_flip_equivariant_model_changes_nothing(tta: str, passes: int) -> None:
    torch.manual_seed(0)
    pointwise = Counting(nn.Conv2d(3, 3, kernel_size=1))
    images = torch.randn(2, 3, 64, 96)  # non-square: d4's 90° views are 96x64
    with torch.no_grad():
        plain = Probabilities(pointwise)(images)
        pointwise.calls = 0
        merged = inference.probability_model(pointwise, tta)(images)
    assert pointwise.calls == passes == inference.tta_views(tta)  # what --plan counts
    torch.testing.assert_close(merged, plain)

    spatial = nn.Conv2d(3, 3, kernel_size=3, padding=1)  # not flip-equivariant
    with torch.no_grad():
        changed = inference.probability_model(spatial, tta)(images)
        assert not torch.allclose(changed, Probabilities(spatial)(images), atol=1e-3)
    torch.testing.assert_close(changed.sum(1), torch.ones(2, 64, 96))


def test_missing_fold_checkpoint_is_a_clear_error(tmp_path: Path, tiny_data: Path, capsys) -> None:
    config = write_config(tmp_path, tiny_data, epochs=1)
    assert run_main(config, "--fold", "0") == 0
    assert predict.main(["--config", str(config), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "no trained model for 1 of 2 folds" in err and "fold1" in err
    assert not (tmp_path / "out" / "tiny" / "tiny" / "oof").exists()


def test_fold_oof_is_reused_only_for_the_best_pt_that_made_it(trained: Path) -> None:
    fold = fold_path(trained, 0)
    store = load_probs(fold / "oof")
    epoch = load_checkpoint(fold / "best.pt")["epoch"]
    assert store.meta["best_epoch"] == epoch
    items = train_items(trained / "tiny.yaml")
    args = (fold / "oof", "none", store.split_id, [items[i] for i in store.ids], list(store.size))
    assert predict.reusable_oof(*args, best_epoch=epoch) is not None
    # best.pt rewritten by a resumed run that has not written its OOF maps yet
    assert predict.reusable_oof(*args, best_epoch=epoch + 1) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("split_id", "0123456789ab", "was trained on split 0123456789ab"),
        ("model_name", "other", "is a checkpoint of other"),
        ("arch", "smp.FPN", "(smp.FPN), not of tiny"),
        ("config.data.img_size", [96, 96], "was trained at [96, 96]"),
        ("fold", 0, "was trained as fold 0, not fold 1: it has seen this fold's validation"),
        ("recipe_hash", "0123456789abcdef", "was trained with another recipe than"),
    ],
)
def test_a_checkpoint_of_another_split_size_or_model_is_refused(
    trained: Path, tmp_path: Path, tiny_data: Path, field: str, value, message: str, capsys
) -> None:
    """OOF maps from a model that saw its validation images, or maps under the wrong name
    or size, would all flow silently into the blend and the submission."""
    import shutil

    shutil.copytree(trained / "out", tmp_path / "out")
    for store in ("oof", "test"):
        shutil.rmtree(tmp_path / "out" / "tiny" / "tiny" / store, ignore_errors=True)
    config = write_config(tmp_path, tiny_data, epochs=1)
    path = fold_path(tmp_path, 1) / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    node, *keys = field.split(".")
    if keys:
        target = ckpt[node]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    else:
        ckpt[node] = value
    torch.save(ckpt, path)
    assert predict.main(["--config", str(config), "--model", "tiny"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny" / "tiny" / "test").exists()


def test_shards_predicted_apart_merge_into_the_stores_of_one_call(
    trained: Path, tmp_path: Path
) -> None:
    """`--num-parts 3 --part-id i` on three "machines", then `--merge-parts 3`: the stores
    of one unsharded call (images within one quantisation step: other batch shapes), every
    image once, in its order; a missing share or a share of another TTA is refused."""
    config = trained / "tiny.yaml"
    base = ["--config", str(config), "--model", "tiny", "--tta", "hflip"]
    model_dir = trained / "out" / "tiny" / "tiny"
    assert predict.main(base) == 0
    whole = {kind: load_probs(model_dir / kind) for kind in ("oof", "test")}
    for i in (0, 1):
        assert predict.main([*base, "--num-parts", "3", "--part-id", str(i)]) == 0
    assert predict.main([*base, "--merge-parts", "3"]) == 2  # share 2 is missing
    assert predict.main([*base, "--num-parts", "3", "--part-id", "2"]) == 0
    shares = [load_probs(model_dir / "parts" / f"test-{i}of3") for i in range(3)]
    assert sum(len(s) for s in shares) == len(whole["test"]) and all(len(s) for s in shares)
    assert predict.main([*base, "--merge-parts", "3"]) == 0
    for kind, reference in whole.items():
        merged = load_probs(model_dir / kind)
        assert merged.ids == reference.ids and merged.orig_sizes == reference.orig_sizes
        assert merged.meta["folds"] == reference.meta["folds"], kind
        assert merged.meta["tta"] == "hflip" and merged.split_id == reference.split_id
        assert np.abs(merged.as_float() - reference.as_float()).max() <= STEP, kind
    other = ["--config", str(config), "--model", "tiny", "--tta", "none"]
    assert predict.main([*other, "--num-parts", "3", "--part-id", "1"]) == 0
    assert predict.main([*base, "--merge-parts", "3"]) == 2
    assert predict.main([*base, "--num-parts", "3", "--part-id", "3"]) == 2
