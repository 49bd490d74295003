"""Issue 41 item 4: a stage is its script and one entry of the stage table, nothing more.

The fixture stage `rowtally` is added the way a new stage is: a script (written to a
temporary folder put on the path) and one `stages.Stage` (here, added to the table for the
test). With nothing else naming it, it answers --help and refuses a bad config before its
imports, its settings are checked by the pipeline before any fold trains, it runs in the
pipeline, is reused on the next call and reruns when its input changes; the layout and
lint checks accept its script at the root. No file of the project but this one names it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import pipeline
from core.config import ConfigError, resolve_cli_config
from core.paths import Layout
from tests.test_export import private_copy
from tests.test_layout import ROOT, command_problems, e402_flagged
from tests.test_rerun_reasons import _running, _table
from tests.trainkit import write_config
from workflow import cli, stages

NAME = "rowtally"
# The stage's script: the submission's rows and a notes file's lines, in its own folder.
SCRIPT = '''"""The submission's rows and the lines of a notes file, in one JSON file."""

from workflow import stages

if __name__ == "__main__":
    stages.preflight("rowtally")

import sys
from collections.abc import Sequence

from core.config import resolve_cli_config
from core.settings import layout_of
from data.atomic import write_json


def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("rowtally").parse_args(argv)
    layout = layout_of(resolve_cli_config(args))
    rows = len(layout.submission.read_text().splitlines()) - 1
    notes = len(args.notes.read_text().splitlines())
    write_json(layout.stage_dir("rowtally") / "rowtally.json", {"rows": rows, "notes": notes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def rowtally_parser() -> argparse.ArgumentParser:
    p = cli.config_parser("The submission's rows and the lines of a notes file.")
    p.add_argument("--notes", type=Path, required=True, help="the notes file to count")
    return p


def check_rowtally(cfg: dict[str, Any]) -> None:
    most = (cfg.get(NAME) or {}).get("most", 1)
    if most < 1:
        raise ConfigError(f"{NAME}.most must be at least 1, got {most}")


def entry(notes: Path) -> stages.Stage:
    """The stage's one entry: its parser and config, command line, inputs, outputs, check."""
    return stages.Stage(
        NAME,
        rowtally_parser,
        resolve_cli_config,
        argv=lambda plan, _: [*plan.common, "--notes", str(notes)],
        outputs=lambda plan, _: [plan.layout.stage_dir(NAME) / f"{NAME}.json"],
        inputs=lambda plan, _: [plan.layout.submission, notes],
        check=check_rowtally,
    )


@pytest.fixture
def rowtally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stage added by its script and its entry; the notes file it reads."""
    scripts, notes = tmp_path / "scripts", tmp_path / "notes.txt"
    scripts.mkdir()
    (scripts / f"{NAME}.py").write_text(SCRIPT)
    notes.write_text("one\ntwo\n")
    monkeypatch.syspath_prepend(str(scripts))
    monkeypatch.delitem(sys.modules, NAME, raising=False)
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, entry(notes)))
    return notes


def _call(flags: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """One pipeline call: its "Stages of this call" table and its `running (why)` lines."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert pipeline.main(flags) == 0, err.getvalue()
    return _table(out.getvalue()), _running(err.getvalue())


def test_a_stage_added_by_its_entry_runs_is_reused_and_reruns_when_its_input_changes(
    two_model_experiment: Path, rowtally: Path, tmp_path: Path
) -> None:
    root, flags = private_copy(two_model_experiment, tmp_path / "copy")
    layout = Layout.at(root / "out" / "tiny")
    made = layout.stage_dir(NAME) / f"{NAME}.json"
    rows = len(layout.submission.read_text().splitlines()) - 1

    table, running = _call(flags)
    assert running[NAME] == "first run" and table[NAME] != "reused"
    assert json.loads(made.read_text()) == {"rows": rows, "notes": 2}

    table, running = _call(flags)
    assert NAME not in running and table[NAME] == "reused", running
    assert set(table.values()) == {"reused"}

    rowtally.write_text("one\ntwo\nthree\n")
    table, running = _call(flags)
    assert running == {NAME: f"{rowtally} changed"}
    assert {stage for stage, ran in table.items() if ran != "reused"} == {NAME}
    assert json.loads(made.read_text()) == {"rows": rows, "notes": 3}
    assert NAME in json.loads(layout.timings.read_text())


def test_its_check_refuses_a_bad_setting_before_any_fold_trains(
    rowtally: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny_data)
    assert pipeline.main(["--config", str(config), "--set", f"+{NAME}.most=0"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {NAME}.most must be at least 1, got 0"
    assert not (tmp_path / "out").exists()


def test_its_command_line_answers_from_the_table_before_its_imports(
    rowtally: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(sys, "argv", [f"{NAME}.py", "--help"])
    with pytest.raises(SystemExit) as stop:
        stages.preflight(NAME)
    assert stop.value.code == 0 and "--notes" in capsys.readouterr().out
    config = str(write_config(tmp_path, tiny_data))
    monkeypatch.setattr(sys, "argv", [f"{NAME}.py", "--config", config, "--set", "train.epocs=3"])
    with pytest.raises(SystemExit) as stop:
        stages.preflight(NAME)
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: override 'train.epocs=3': no key")
    monkeypatch.setattr(sys, "argv", [f"{NAME}.py", "--config", config, "--notes", str(rowtally)])
    stages.preflight(NAME)  # a good command line goes through


def test_the_layout_and_lint_checks_take_its_script_at_the_root(
    rowtally: Path, tmp_path: Path
) -> None:
    """A copy of the root with the stage's script beside the others: the commands check
    (read from the table) and ruff (no exemption list) need no word about it."""
    copy = tmp_path / "root"
    copy.mkdir()
    for path in [*ROOT.glob("*.py"), ROOT / "pyproject.toml"]:
        shutil.copy(path, copy)
    shutil.copy(tmp_path / "scripts" / f"{NAME}.py", copy)
    assert command_problems(copy) == []
    assert e402_flagged(copy) == []
    (copy / f"{NAME}.py").unlink()
    assert command_problems(copy) == [f"{NAME}: an entry with no {NAME}.py at the root"]


# Not the project's files: environments, caches, run outputs.
SKIPPED = {".venv", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis", "__pycache__"}
SKIPPED |= {"outputs", "mutants"}


def test_no_file_but_this_one_names_the_stage() -> None:
    """What the stage needed is its script and its entry: no parser, path, lint list,
    layout set or pipeline check elsewhere names it."""
    naming = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED and not d.startswith("demo")]
        for path in (Path(folder) / name for name in files):
            if path != Path(__file__).resolve() and NAME.encode() in path.read_bytes():
                naming.append(path.relative_to(ROOT).as_posix())
    assert naming == []
