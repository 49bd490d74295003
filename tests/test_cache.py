"""Preprocessed cache: right sizes and values, reuse, and per-item invalidation."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import data.cache as cache
from data.cache import UNKNOWN, load_item, prepare
from data.reader import (
    DataError,
    MaskThresholds,
    list_test,
    list_train,
    load_image,
    load_mask,
    stratum,
)

SIZE = (64, 96)


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """Ids that `prepare` actually (re)processes."""
    seen: list[str] = []
    original = cache._process

    def wrapper(sample, *args):
        seen.append(sample.id)
        return original(sample, *args)

    monkeypatch.setattr(cache, "_process", wrapper)
    return seen


def test_items_match_the_source_files(tiny_data: Path, tmp_path: Path) -> None:
    samples = list_train(tiny_data)[:8] + list_test(tiny_data)[:2]
    items = prepare(samples, SIZE, tmp_path, workers=2)
    assert [i.id for i in items] == [s.id for s in samples]
    for sample, item in zip(samples, items, strict=True):
        image, mask = load_item(item)
        source = load_image(sample.image)
        assert item.orig_size == source.shape[:2] == (128, 160)
        assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
        expected = cv2.resize(source, SIZE[::-1], interpolation=cv2.INTER_AREA)
        assert np.array_equal(image, expected)
        if sample.mask is None:
            assert mask is None and item.classes == UNKNOWN
            continue
        full = load_mask(sample.mask)
        assert item.classes == stratum(full)
        assert np.array_equal(mask, cv2.resize(full, SIZE[::-1], interpolation=cv2.INTER_NEAREST))
        assert set(np.unique(mask)) <= {0, 1, 2}


def test_reuse_and_invalidation_of_one_changed_file(
    tiny_data_copy: Path, tmp_path: Path, counted: list[str]
) -> None:
    samples = list_train(tiny_data_copy)[:6]
    first = prepare(samples, SIZE, tmp_path / "cache", workers=1)
    assert sorted(counted) == sorted(s.id for s in samples)
    counted.clear()
    assert prepare(samples, SIZE, tmp_path / "cache", workers=1) == first
    assert counted == []

    # Rewrite one mask with another sample's content: only that item is redone.
    donor = next(
        s for s in list_train(tiny_data_copy) if stratum(load_mask(s.mask)) != first[0].classes
    )
    shutil.copy(donor.mask, samples[0].mask)
    again = prepare(samples, SIZE, tmp_path / "cache", workers=1)
    assert counted == [samples[0].id]
    assert again[0].classes == stratum(load_mask(donor.mask)) != first[0].classes
    assert again[1:] == first[1:]

    # A touch (same bytes, new mtime) also counts as a change.
    counted.clear()
    st = samples[3].image.stat()
    os.utime(samples[3].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    prepare(samples, SIZE, tmp_path / "cache", workers=1)
    assert counted == [samples[3].id]

    # Another file of the same byte size under the same modification time (`cp -p` of a
    # backup): redone, as its change time is new.
    counted.clear()
    png = samples[4].image.with_suffix(".png")
    for value in (50, 200):  # uncompressed PNGs of one size have one byte length
        cv2.imwrite(
            str(png), np.full((128, 160, 3), value, np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 0]
        )
        os.utime(png, ns=(0, 10**18))
        [item] = prepare([replace(samples[4], image=png)], SIZE, tmp_path / "cache", workers=1)
        assert load_item(item)[0][0, 0, 0] == value
    assert counted == [samples[4].id] * 2

    # Another working size or other mask thresholds re-process the items.
    counted.clear()
    prepare(samples[:2], (32, 32), tmp_path / "cache", workers=1)
    assert counted == [s.id for s in samples[:2]]
    counted.clear()
    prepare(samples[:2], SIZE, tmp_path / "cache", MaskThresholds(red_s_min=90), workers=1)
    assert counted == [s.id for s in samples[:2]]


def test_bad_files_are_all_named(tiny_data_copy: Path, tmp_path: Path) -> None:
    samples = list_train(tiny_data_copy)[:5]
    samples[1].image.write_bytes(b"broken")
    mask = cv2.imread(str(samples[2].mask))
    cv2.imwrite(str(samples[2].mask), mask[:100])
    with pytest.raises(DataError) as info:
        prepare(samples, SIZE, tmp_path, workers=2)
    text = str(info.value)
    assert samples[1].image.name in text and str(samples[2].mask) in text and "size" in text
