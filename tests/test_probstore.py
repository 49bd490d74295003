import json

import numpy as np
import pytest

from data.probstore import concat, load_probs, quantise, save_probs
from data.reader import DataError


def softmax_maps(n, h=8, w=12, seed=0):
    logits = np.random.default_rng(seed).normal(size=(n, 3, h, w)).astype(np.float32)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def save(path, n=4, split_id="s1", seed=0, prefix="im", **meta):
    probs = softmax_maps(n, seed=seed)
    ids = [f"{prefix}{i}" for i in range(n)]
    sizes = [(100 + i, 200) for i in range(n)]
    meta = {"kind": "oof", "model": "unet", "split_id": split_id, **meta}
    save_probs(path, ids, probs, sizes, **meta)
    return ids, probs, sizes


def test_round_trip_within_half_a_quantisation_step(tmp_path):
    ids, probs, sizes = save(tmp_path / "s", folds=[0, 1, 0, 1], note="free field")
    store = load_probs(tmp_path / "s")
    assert isinstance(store.raw, np.memmap) and store.raw.dtype == np.uint8
    assert store.ids == ids and store.orig_sizes == sizes and store.size == (8, 12)
    assert np.abs(store.as_float() - probs).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(store.get(2), store.as_float()[2])
    assert store.meta["split_id"] == "s1" and store.meta["kind"] == "oof"
    assert store.meta["note"] == "free field" and store.meta["scale"] == pytest.approx(1 / 255)
    sub = store.subset(["im3", "im1"])
    assert sub.ids == ["im3", "im1"] and sub.orig_sizes == [sizes[3], sizes[1]]
    assert sub.meta["folds"] == [1, 1]
    np.testing.assert_array_equal(sub.raw[0], store.raw[3])
    with pytest.raises(DataError, match="not in the store"):
        store.subset(["nope"])


def test_quantise_rounds_and_clips():
    q = quantise(np.array([0.0, 1.0, 0.5, 1 / 255 * 0.49, 1.2, -0.1]))
    np.testing.assert_array_equal(q, [0, 255, 128, 0, 255, 0])


def test_corrupt_stores_are_refused_naming_the_folder(tmp_path):
    save(tmp_path / "s")
    (tmp_path / "s" / "meta.json").unlink()
    with pytest.raises(DataError, match=r"s: incomplete probability store \(no meta.json\)"):
        load_probs(tmp_path / "s")

    save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    meta["ids"].append("extra")
    meta["orig_sizes"].append([1, 1])
    (tmp_path / "t" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"t: 5 ids and 5 sizes in meta\.json but 4 maps"):
        load_probs(tmp_path / "t")

    save(tmp_path / "u")
    (tmp_path / "u" / "probs.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"u: unreadable probs\.npy"):
        load_probs(tmp_path / "u")

    with pytest.raises(DataError, match="not found"):
        load_probs(tmp_path / "absent")


def test_save_validates_arguments(tmp_path):
    probs = softmax_maps(2)
    with pytest.raises(ValueError, match="kind"):
        save_probs(tmp_path / "a", ["x", "y"], probs, [(1, 1)] * 2, kind="val", model="m")
    with pytest.raises(ValueError, match="disagree"):
        save_probs(tmp_path / "a", ["x"], probs, [(1, 1)] * 2, kind="oof", model="m")
    assert not (tmp_path / "a").exists()


def test_concat_joins_and_refuses_mixed_splits(tmp_path):
    save(tmp_path / "a", n=2, prefix="a", folds=[0, 0])
    save(tmp_path / "b", n=3, prefix="b", seed=1, folds=[1, 1, 1])
    save(tmp_path / "c", n=2, prefix="c", split_id="other")
    a, b = load_probs(tmp_path / "a"), load_probs(tmp_path / "b")
    joined = concat([a, b])
    assert joined.ids == joined.meta["ids"] == ["a0", "a1", "b0", "b1", "b2"]
    assert joined.orig_sizes == [(100, 200), (101, 200), (100, 200), (101, 200), (102, 200)]
    assert joined.meta["orig_sizes"] == [list(s) for s in joined.orig_sizes]
    assert joined.meta["folds"] == [0, 0, 1, 1, 1] and joined.split_id == "s1"
    np.testing.assert_array_equal(joined.raw[2:], b.raw)
    # a store without per-image folds: no fold list can line up with the joined ids
    save(tmp_path / "d", n=1, prefix="d")
    assert concat([a, load_probs(tmp_path / "d")]).meta["folds"] is None
    with pytest.raises(DataError, match="different fold splits cannot be joined"):
        concat([a, load_probs(tmp_path / "c")])
    with pytest.raises(DataError, match="duplicate ids"):
        concat([a, a])
    with pytest.raises(ValueError, match="concat needs at least one store"):
        concat([])


def test_failed_save_leaves_existing_store_untouched(tmp_path):
    ids, _, _ = save(tmp_path / "s")
    before = load_probs(tmp_path / "s").raw.copy()

    class Exploding(np.ndarray):
        def __getitem__(self, item):
            raise RuntimeError("killed mid-write")

    bad = softmax_maps(4, seed=5).view(Exploding)
    with pytest.raises(RuntimeError, match="killed"):
        save_probs(tmp_path / "s", ids, bad, [(1, 1)] * 4, kind="oof", model="m")
    store = load_probs(tmp_path / "s")
    np.testing.assert_array_equal(store.raw, before)
    assert store.meta["model"] == "unet"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
