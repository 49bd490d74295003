"""stamps.py: a stage is due when the bytes it reads change, never because of file times.
Kept apart from the pipeline's tests, which train, so that a mutation run of stamps.py
runs in seconds a mutant."""

import json
import os
import time

import pytest

from chain.stamps import ONE_DIGEST, Inputs, Stamps, digest
from data.reader import DataError


def test_a_stage_is_due_when_its_inputs_bytes_change_whatever_the_file_times(tmp_path):
    src, folder = tmp_path / "in", tmp_path / "store"
    folder.mkdir()
    (folder / "probs.npy").write_bytes(b"abc")
    src.write_text("a")
    named = {"in": src, "store": folder}
    stamps = Stamps(tmp_path / "stamps.json")
    assert stamps.changes("s", Inputs.of(named)) is None  # never ran
    stamps.record("s", Inputs.of(named))
    assert Stamps(tmp_path / "stamps.json").changes("s", Inputs.of(named)) == {}
    ahead = time.time() + 3600  # inputs "newer" than anything: only the bytes count
    os.utime(src, (ahead, ahead))
    assert stamps.changes("s", Inputs.of(named)) == {}
    src.write_text("A")
    assert stamps.changes("s", Inputs.of(named)) == {"in": "changed"}
    src.write_text("a")
    (folder / "probs.npy").write_bytes(b"abd")  # a file inside a folder input
    assert stamps.changes("s", Inputs.of(named)) == {"store": "changed"}
    (folder / "probs.npy").write_bytes(b"abc")
    assert Inputs.of(named).total == digest([src, folder]) != digest([folder, src])
    with pytest.raises(DataError, match="gone: input not found"):
        digest([tmp_path / "gone"])
    with pytest.raises(DataError, match="gone: input not found"):
        Inputs.of({"gone": tmp_path / "gone"})
    (tmp_path / "stamps.json").write_text("{")
    with pytest.raises(DataError, match=r"stamps\.json: unreadable"):
        Stamps(tmp_path / "stamps.json")


def test_changes_name_each_input_changed_new_or_gone(tmp_path):
    """stamps.json holds a digest per input, so the pipeline can say which one changed."""
    files = {name: tmp_path / name for name in ("a", "b", "c")}
    for name, path in files.items():
        path.write_text(name)
    stamps = Stamps(tmp_path / "stamps.json")
    stamps.record("s", Inputs.of({k: files[k] for k in ("a", "b")}))
    recorded = json.loads((tmp_path / "stamps.json").read_text())["s"]
    assert recorded == {k: digest([files[k]]) for k in ("a", "b")}  # lineage's digest too
    files["a"].write_text("A")
    assert stamps.changes("s", Inputs.of({k: files[k] for k in ("a", "c")})) == {
        "a": "changed",
        "b": "gone",
        "c": "new",
    }


def test_a_record_from_before_per_input_digests_still_counts(tmp_path):
    """An experiment whose stamps.json holds one digest per stage reruns nothing that did
    not change; one that did is said to have changed without a name to give."""
    src = tmp_path / "in"
    src.write_text("a")
    path = tmp_path / "stamps.json"
    path.write_text(json.dumps({"s": digest([src])}))
    stamps = Stamps(path)
    assert stamps.changes("s", Inputs.of({"in": src})) == {}
    src.write_text("b")
    assert stamps.changes("s", Inputs.of({"in": src})) == {ONE_DIGEST: "changed"}


def test_each_file_is_read_once_while_the_caller_keeps_what_was_read(tmp_path):
    src = tmp_path / "in"
    src.write_text("a")
    read: dict = {}
    first = Inputs.of({"in": src}, read)
    src.write_text("b")  # unseen until the caller forgets what it read (a stage ran)
    assert Inputs.of({"x": src}, read).each == {"x": first.each["in"]}
    read.clear()
    assert Inputs.of({"in": src}, read) != first


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


def test_records_keep_other_stages(tmp_path):
    src = tmp_path / "in"
    src.write_text("a")
    path = tmp_path / "stamps.json"
    stamps = Stamps(path)
    stamps.record("predict", Inputs.of({"in": src}))
    stamps.record("tune", Inputs.of({"other": src}))
    src.write_text("b")
    stamps.record("predict", Inputs.of({"in": src}))
    again = Stamps(path)
    assert set(json.loads(path.read_text())) == {"predict", "tune"}
    assert again.changes("predict", Inputs.of({"in": src})) == {}
    assert again.changes("tune", Inputs.of({"other": src})) == {"other": "changed"}
    assert Stamps(tmp_path / "none.json").recorded == {}
