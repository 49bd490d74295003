"""stamps.py: a stage is due when the bytes it reads change, never because of file times.
Kept apart from the pipeline's tests, which train, so that a mutation run of stamps.py
runs in seconds a mutant."""

import json
import os
import time

import pytest

from data.reader import DataError
from stamps import Stamps, digest


def test_a_stage_is_due_when_its_inputs_bytes_change_whatever_the_file_times(tmp_path):
    src, dst, folder = tmp_path / "in", tmp_path / "out", tmp_path / "store"
    folder.mkdir()
    (folder / "probs.npy").write_bytes(b"abc")
    src.write_text("a")
    stamps = Stamps(tmp_path / "stamps.json")
    ident = digest([src, folder])
    assert stamps.changed("s", ident, [dst])  # no output yet
    dst.write_text("b")
    assert stamps.changed("s", ident, [dst])  # never ran
    stamps.record("s", ident)
    assert not Stamps(tmp_path / "stamps.json").changed("s", digest([src, folder]), [dst])
    ahead = time.time() + 3600  # outputs "newer" than anything: only the bytes count
    os.utime(dst, (ahead, ahead))
    src.write_text("A")
    assert stamps.changed("s", digest([src, folder]), [dst])
    src.write_text("a")
    (folder / "probs.npy").write_bytes(b"abd")
    assert stamps.changed("s", digest([src, folder]), [dst])
    (folder / "probs.npy").write_bytes(b"abc")
    os.utime(src, (ahead, ahead))  # a touched input with the same bytes changes nothing
    assert not stamps.changed("s", digest([src, folder]), [dst])
    assert digest([src, folder]) != digest([folder, src])
    with pytest.raises(DataError, match="gone: input not found"):
        digest([tmp_path / "gone"])
    (tmp_path / "stamps.json").write_text("{")
    with pytest.raises(DataError, match=r"stamps\.json: unreadable"):
        Stamps(tmp_path / "stamps.json")


def test_a_digest_covers_names_and_every_file_of_a_folder(tmp_path):
    folder = tmp_path / "store"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.npy").write_bytes(b"1")
    (folder / "sub" / "b.npy").write_bytes(b"2")
    before = digest([folder])
    assert len(before) == 64 and before == digest([folder])
    (folder / "sub" / "b.npy").write_bytes(b"3")  # a file one level down
    assert digest([folder]) != before
    (folder / "sub" / "b.npy").write_bytes(b"2")
    (folder / "a.npy").rename(folder / "c.npy")  # same bytes, another name
    assert digest([folder]) != before
    (folder / "c.npy").rename(folder / "a.npy")
    (folder / "d.npy").write_bytes(b"")  # an added empty file
    assert digest([folder]) != before
    (folder / "d.npy").unlink()
    assert digest([folder]) == before
    assert digest([]) != digest([folder])


def test_records_keep_other_stages_and_a_missing_output_makes_a_stage_due(tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    path = tmp_path / "stamps.json"
    stamps = Stamps(path)
    stamps.record("predict", "p1")
    stamps.record("tune", "t1")
    stamps.record("predict", "p2")
    assert json.loads(path.read_text()) == {"predict": "p2", "tune": "t1"}
    again = Stamps(path)
    assert not again.changed("tune", "t1", [out]) and not again.changed("predict", "p2", [out])
    assert again.changed("predict", "p1", [out])
    assert again.changed("tune", "t1", [out, tmp_path / "gone"])
    assert Stamps(tmp_path / "none.json").recorded == {}
