import os

import pytest

from data.atomic import atomic_dir, atomic_write, write_json, write_text


def test_failed_write_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_write(target, "w") as fh:
        fh.write('{"v": 2, "half')
        raise RuntimeError("killed")
    assert target.read_text().strip().startswith('{\n  "v": 1')
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "store"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "x").write_text("new")
        raise RuntimeError("killed")
    assert (target / "x").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "y").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_artefacts_get_ordinary_permissions(tmp_path):
    write_json(tmp_path / "a.json", {})
    with atomic_dir(tmp_path / "d"):
        pass
    assert (tmp_path / "a.json").stat().st_mode & 0o044 == 0o044
    assert (tmp_path / "d").stat().st_mode & 0o055 == 0o055


def test_atomic_dir_is_not_blocked_by_a_crashed_runs_leftover(tmp_path):
    target = tmp_path / "store"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("old")
    leftover = tmp_path / f".store.old-{os.getpid()}"
    leftover.mkdir()
    (leftover / "junk").write_text("from a crash")
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("new")
    assert (target / "x").read_text() == "new"


def test_a_killed_writers_temporaries_are_swept_and_a_live_ones_kept(tmp_path):
    """SIGKILL skips every cleanup: the next write of the same artefact removes them."""
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(gone.stdout)
    stale_dir = tmp_path / f".oof.p{dead}.abc123.tmp"
    stale_dir.mkdir()
    (stale_dir / "probs.npy").write_bytes(b"half")
    stale_file = tmp_path / f".oof.p{dead}.def456.tmp"
    stale_file.write_bytes(b"half")
    stale_old = tmp_path / f".oof.p{dead}-old.xyz"
    stale_old.mkdir()
    live = tmp_path / f".oof.p{os.getpid()}.live.tmp"
    live.mkdir()
    other = tmp_path / f".best.pt.p{dead}.zzz.tmp"
    other.write_bytes(b"another artefact's")
    with atomic_dir(tmp_path / "oof") as tmp:
        (tmp / "x").write_text("new")
    assert not stale_dir.exists() and not stale_file.exists() and not stale_old.exists()
    assert live.exists() and other.exists()
    write_text(tmp_path / "best.pt", "w")
    assert not other.exists()


def test_write_json_that_fails_half_way_keeps_the_old_file(tmp_path):
    """json.dump writes piece by piece: an error after the first pieces must not leave a
    truncated artefact where the complete old one was."""
    target = tmp_path / "weights.json"
    write_json(target, {"weights": [0.5, 0.5]})
    with pytest.raises(TypeError):
        write_json(target, {"weights": [0.3, 0.7], "study": object()})
    assert target.read_text() == '{\n  "weights": [\n    0.5,\n    0.5\n  ]\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["weights.json"]
