"""One fast, even command line (issue 40 item 8): a bad config is refused before torch is
imported, by every command that reads one, in the words the command itself uses; a flag
means one thing in every command; compare needs two experiments."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import compare
import export
import infer
from core.config import ConfigError
from tests.trainkit import ROOT, write_config
from workflow import cli, stages

BAD_KEY = "train.epocs=3"
# Imported by a command's work, never by its refusal of a config (stages.preflight).
HEAVY = ("torch", "optuna", "albumentations", "timm", "segmentation_models_pytorch")
# Runs a command as `python <script> ...` does, then says which heavy modules it imported.
RUNNER = f"""
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("imported:", *sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def run_early(*argv: str) -> subprocess.CompletedProcess[str]:
    """`python <script> <args>` through RUNNER: what it printed, and its heavy imports."""
    return subprocess.run(
        [sys.executable, "-c", RUNNER, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def required(name: str, tmp_path: Path) -> list[str]:
    """The flags command `name` cannot run without, for the tiny config's model."""
    flags = {
        "train": ["--model", "tiny", "--fold", "0"],
        "predict": ["--model", "tiny"],
        "hpo": ["--model", "tiny"],
        "export": ["--out", str(tmp_path / "package")],
    }
    return flags.get(name, [])


def reads_a_config(name: str) -> bool:
    return any("--config" in a.option_strings for a in stages.parser(name)._actions)


# Every command whose table entry says how it resolves its config.
CONFIGS = sorted(name for name, command in stages.commands().items() if command.config)


def test_every_command_that_reads_a_config_says_how_it_resolves_it() -> None:
    assert set(CONFIGS) == {name for name in stages.commands() if reads_a_config(name)}


def test_a_bad_key_is_named_before_the_commands_required_flags() -> None:
    """The issue's own command: `train.py --set train.epocs=3`, no --model or --fold."""
    done = run_early("train.py", "--set", BAD_KEY)
    assert done.returncode == 2 and done.stdout.strip() == "imported:", done
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: override {BAD_KEY!r}: no key 'train.epocs'"), line


@pytest.mark.parametrize("name", CONFIGS)
def test_a_bad_key_is_refused_before_torch_in_the_commands_own_words(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(write_config(tmp_path, tmp_path)), *required(name, tmp_path)]
    argv += ["--set", BAD_KEY]
    done = run_early(f"{name}.py", *argv)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == "imported:", f"{name}.py imported {done.stdout}"
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: override {BAD_KEY!r}: no key 'train.epocs'"), line
    assert "did you mean 'train.epochs'?" in line
    # the refusal the command itself makes, once it has imported everything, is the same
    assert importlib.import_module(name).main(argv) == 2
    assert capsys.readouterr().err.strip() == line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_early_check_lets_a_good_command_line_through(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It refuses what the command would refuse, and nothing more: the flags each command
    gives the config (--img-size, --tta, --workers, --epochs...) resolve as they do later."""
    argv = ["--config", str(write_config(tmp_path, tmp_path)), *required(name, tmp_path)]
    extra = {
        "train": ["--img-size", "64x96", "--epochs", "1", "--workers", "1", "--no-amp"],
        "predict": ["--tta", "flip", "--batch-size", "2"],
        "hpo": ["--precision", "fp32"],
        "pipeline": ["--set", "data.img_size=64x96"],
    }
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv, *extra.get(name, [])])
    stages.preflight(name)  # returns: no SystemExit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_a_bad_img_size_flag_is_refused_early_by_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path, tmp_path))
    argv = ["train.py", "--config", config, "--model", "tiny", "--fold", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--img-size", "64by96"])
    with pytest.raises(SystemExit) as stop:
        stages.preflight("train")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --img-size '64by96': expected N or HxW, e.g. 352 or 352x416"
    )


def test_compare_refuses_a_single_experiment_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed two empty tables and exited 0."""
    assert compare.main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "error: compare.py takes two experiment folders or more (<out_dir>/<experiment>, the "
        f"first the base); got one: {tmp_path}"
    ]


# infer.py: one thread flag, --jobs; --threads is its deprecated name


def infer_args(*flags: str) -> object:
    return stages.parser("infer").parse_args(
        ["--package", "p", "--images", "i", "--out", "o", *flags]
    )


def test_infer_has_one_thread_flag_and_its_old_name_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.jobs_given(infer_args()) is None  # the experiment's threads, all cores for the rest
    assert cli.jobs_given(infer_args("--jobs", "-2")) == -2
    assert capsys.readouterr().err == ""
    assert cli.jobs_given(infer_args("--threads", "3")) == 3
    assert capsys.readouterr().err == (
        "warning: --threads is deprecated: it is --jobs now (the same count)\n"
    )
    with pytest.raises(ConfigError, match=r"^--threads 0: give N >= 1, or -1 for all"):
        cli.jobs_given(infer_args("--threads", "0"))
    with pytest.raises(ConfigError, match="deprecated name of --jobs: give --jobs alone"):
        cli.jobs_given(infer_args("--threads", "2", "--jobs", "2"))
    assert "--jobs" in stages.parser("infer").format_help()


@pytest.fixture(scope="module")
def package(two_model_experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The finished two-model experiment exported (conftest.py)."""
    root = two_model_experiment
    out = tmp_path_factory.mktemp("cli") / "package"
    flags = ["--config", str(root / "tiny.yaml"), "--out-dir", str(root / "out")]
    assert export.main([*flags, "--data-dir", str(root / "data"), "--out", str(out)]) == 0
    return out


class Started(Exception):
    """Stops infer.py once it has set its threads."""


@pytest.mark.parametrize(
    ("flags", "threads", "pool"),
    [
        ([], 1, "all"),
        (["--jobs", "2"], 2, 2),
        (["--threads", "2"], 2, 2),
        (["--jobs", "-1"], "all", "all"),
    ],
)
def test_infer_jobs_sets_the_networks_threads_and_the_pools(
    package: Path,
    two_model_experiment: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    threads: int | str,
    pool: int | str,
) -> None:
    """Without --jobs the networks run on the experiment's train.cpu_threads (1), which
    reproduces its bytes, and decoding uses every core; --jobs N is both."""
    cores = infer.effective_n_jobs(-1)
    seen: dict[str, int] = {}

    def configure(n: int) -> None:
        seen["threads"] = n

    def pooled(n: int, **_: object) -> None:
        seen["pool"] = n
        raise Started

    monkeypatch.setattr(infer, "configure_cpu_threads", configure)
    monkeypatch.setattr(infer, "ThreadPoolExecutor", pooled)
    images = two_model_experiment / "data" / "test"
    argv = ["--package", str(package), "--images", str(images), "--out", str(tmp_path / "o")]
    with pytest.raises(Started):
        infer.main([*argv, *flags])
    assert seen == {
        "threads": cores if threads == "all" else threads,
        "pool": cores if pool == "all" else pool,
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_a_bad_value_in_a_section_the_command_does_not_read_is_refused_at_its_start(
    name: str, tmp_path: Path
) -> None:
    """Every section is built where a command starts (cli.checked): `decide.n_boot=null`
    reached train.py nowhere, and the stage that reads it ended in a TypeError traceback."""
    argv = ["--config", str(write_config(tmp_path, tmp_path)), *required(name, tmp_path)]
    done = run_early(f"{name}.py", *argv, "--set", "decide.n_boot=null")
    assert done.returncode == 2 and done.stdout.strip() == "imported:", done
    (line,) = done.stderr.strip().splitlines()
    said = "a value of the wrong type (decide.n_boot: null is not a value here)"
    assert line == f"error: decide settings: {said}"
