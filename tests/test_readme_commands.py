"""Every fenced command of the README runs (issue 21): a newcomer's first commands must work.

The README's `bash` blocks are run in order, as a user would type them, in a workspace
that stands in for theirs: the repository's code, tiny full-size data where the README
puts the real data (`data/bkai`), and `configs/bkai.yaml` and `configs/demo.yaml`
replaced by the same files with a tiny recipe on top (64 x 64, two folds, one epoch,
lighter encoder for the 145M-parameter RegNetX-320, encoders read offline from
`pretrained_dir`). What is changed in a command, and what is not run, is listed below
with the reason; a command that matches neither runs exactly as printed.

Slow (minutes: every model of the shipped recipe, several pipeline runs), so it is not
part of `make test` (its marker is deselected there): `make doctest` runs it, and so does
CI (`.ci/run`). The parser's own test is fast and runs with the others.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.trainkit import ROOT

# Not run here, and why. A fenced command that matches one of these is skipped; the test
# checks that each is still in the README, so the list cannot go stale.
SKIPPED = {
    r"^make install\b": "creates the environment these tests run in",
    r"^make test\b": "runs the tests this one is part of",
    r"^make demo\b": "the half-hour demo; its config's pipeline runs below (demo_ema)",
    r"^kaggle ": "the Kaggle API: an account and network",
    r"^pip install\b": "the environment is installed",
    r"--storage postgresql://": "a PostgreSQL server: tests/test_postgres_studies.py runs one",
}

# Where the README names the user's machine, the workspace's stand-in; and the search
# sizes, which are the shipped recipe's (hours), cut to a few trials of one epoch.
REPLACED = [
    # the workspace has no environment of its own: make uses the one these tests run in
    (re.compile(r"^make smoke\b"), f"make smoke VENV={Path(sys.executable).parent.parent}"),
    ("/kaggle/input/bkai-igh-neopolyp", "data/bkai"),
    ("/kaggle/input/neopolyp-encoders", "encoders"),
    ("/kaggle/working/outputs", "kaggle_outputs"),
    ("demo_data_seed0", "data/bkai"),
    ("new_frames/", "data/bkai/test/"),
    # experiments the README's examples assume a user has made: two that exist here
    ("outputs/demo outputs/demo_epochs32 outputs/demo_3models", "outputs/bkai kaggle_outputs/bkai"),
    ("outputs/bkai_adamw", "kaggle_outputs/bkai"),
    (re.compile(r"--trials \d+"), "--trials 3"),
    (re.compile(r"--epochs \d+"), "--epochs 1"),
]

TINY = {
    "data_dir": "data/bkai",
    "pretrained_dir": "encoders",
    "data": {"img_size": [64, 64], "n_folds": 2, "num_workers": 0},
    "train": {"epochs": 1, "batch_size": 2, "cpu_threads": 1},
    "predict": {"batch_size": 4},
    "ensemble": {"trials": 3},
    "tune": {"trials": 3},
    "refine": {"epochs": 1},
    "hpo": {"epochs": 1, "trials": 2},
    # one-epoch models seldom beat predicting nothing; when one fold does by a few lucky
    # pixels, its siblings would be retrained (test_retry.py): not here
    "retry": {"attempts": 0},
}
LIGHTER = {"deeplabv3plus_regnetx320": {"encoder_name": "tu-regnetx_002"}}
COMMAND_TIMEOUT_S = 1200


def readme_commands(text: str) -> list[str]:
    """The commands of the README's bash blocks in order: continuation lines joined,
    comments dropped, a `for ... done` loop kept as one command."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = block.replace("\\\n", " ")
        loop: list[str] = []
        for raw in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", raw).strip()
            if not line:
                continue
            if loop or line.startswith("for "):
                loop.append(line)
                if line == "done":
                    commands.append("\n".join(loop))
                    loop = []
                continue
            commands.append(re.sub(r"\s+", " ", line))
    return commands


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED.items() if re.search(pattern, command)), None)


def as_run_here(command: str) -> str:
    for old, new in REPLACED:
        command = (
            old.sub(new, command) if isinstance(old, re.Pattern) else command.replace(old, new)
        )
    return command


def tiny_config(real: Path, out: Path, lighter: bool) -> None:
    doc = {"base": str(real), **TINY}
    if lighter:
        doc["models"] = {name: {"kwargs": kwargs} for name, kwargs in LIGHTER.items()}
    out.write_text(yaml.safe_dump(doc, sort_keys=False))


def workspace(root: Path) -> Path:
    """The user's folder: the code (linked), configs (copied, two made tiny), data/bkai."""
    for entry in ROOT.iterdir():
        if entry.name in {"configs", "data", ".git", ".venv", "outputs"} or entry.name.startswith(
            ("demo_data", ".")
        ):
            continue
        (root / entry.name).symlink_to(entry)
    (root / "data").mkdir()
    for entry in (ROOT / "data").iterdir():
        if entry.name != "__pycache__":
            (root / "data" / entry.name).symlink_to(entry)
    (root / "configs").mkdir()
    for entry in (ROOT / "configs").glob("*.yaml"):
        shutil.copyfile(entry, root / "configs" / entry.name)
    tiny_config(ROOT / "configs" / "bkai.yaml", root / "configs" / "bkai.yaml", lighter=True)
    tiny_config(ROOT / "configs" / "demo.yaml", root / "configs" / "demo.yaml", lighter=False)
    return root


def run(command: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert done.returncode == 0, (
        f"README command failed (exit {done.returncode}): {command}\n"
        f"{(done.stdout + done.stderr)[-3000:]}"
    )


def test_the_readme_parser_reads_blocks_loops_and_continuations() -> None:
    text = (
        "```bash\npython a.py --x 1   # note\n\n# a comment\npython b.py \\\n    --y 2\n"
        "for m in a b; do\n  python c.py --model $m\ndone   # all\n```\n"
        "```yaml\nnot: run\n```\n"
    )
    assert readme_commands(text) == [
        "python a.py --x 1",
        "python b.py --y 2",
        "for m in a b; do\npython c.py --model $m\ndone",
    ]
    assert as_run_here("hpo.py --trials 30 --epochs 10") == "hpo.py --trials 3 --epochs 1"


@pytest.mark.readme_commands
def test_every_fenced_readme_command_runs(tmp_path: Path) -> None:
    commands = readme_commands((ROOT / "README.md").read_text())
    skipped = {p for p in SKIPPED if any(re.search(p, c) for c in commands)}
    assert skipped == set(SKIPPED), (
        f"SKIPPED names commands the README no longer has: {set(SKIPPED) - skipped}"
    )
    root = workspace(tmp_path)
    # The data and the offline encoders, as the README's prose has the user make them
    # (`--random-init`: there is no hub here to fetch ImageNet weights from).
    run("python -m data.synthetic --out data/bkai --n-train 16 --n-test 4 --seed 0 --nested", root)
    run("python -m models.weights --config configs/bkai.yaml --out encoders/ --random-init", root)
    ran = []
    for command in commands:
        if skip_reason(command) is None:
            run(as_run_here(command), root)
            ran.append(command)
    assert any(c.startswith("python pipeline.py") for c in ran) and len(ran) >= 20
    assert (root / "outputs" / "bkai" / "submission.csv").is_file()
    assert (root / "predictions" / "submission.csv").is_file()
