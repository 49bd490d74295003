"""The README's commands keep working: every script it names exists and takes each flag.

A renamed flag or a moved script would otherwise leave a newcomer's first command broken
while every other test passes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache

import pytest

from tests.trainkit import ROOT

COMMAND = re.compile(r"python (-m )?([\w./]+)((?: +[^\s`#|]+)*)")


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script or module, its --flags) for every `python ...` command in the README."""
    found = []
    for match in COMMAND.finditer((ROOT / "README.md").read_text()):
        module, target, rest = match.group(1), match.group(2), match.group(3)
        target = target if module is None else target.replace(".", "/")
        flags = [t.split("=")[0] for t in rest.split() if t.startswith("--")]
        found.append((target, flags))
    return found


@cache
def help_text(target: str) -> str:
    script = target if target.endswith(".py") else f"-m {target.replace('/', '.')}"
    done = subprocess.run(
        [sys.executable, *script.split(), "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{target} --help failed: {done.stderr[-500:]}"
    return done.stdout


def test_the_readme_names_commands() -> None:
    targets = {t for t, _ in readme_commands()}
    assert {"train.py", "predict.py", "pipeline.py", "data/check"} <= targets


@pytest.mark.parametrize(("target", "flags"), readme_commands())
def test_every_readme_command_exists_with_its_flags(target: str, flags: list[str]) -> None:
    path = ROOT / target
    assert path.exists() or path.with_suffix(".py").exists() or (path / "__main__.py").exists()
    text = help_text(target)
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}\b", text), f"{target} has no {flag}"


def test_config_keys_named_in_the_readme_exist_in_a_shipped_config() -> None:
    from core.config import _dotted_keys, load_config

    keys = set()
    for name in ("bkai.yaml", "demo.yaml"):  # resolved: configs/defaults.yaml included
        keys |= set(_dotted_keys(load_config(ROOT / "configs" / name)))
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`((?:train|data|predict|ensemble|tune)\.[a-z_.]+)", text))
    named = {k for k in named if not k.endswith(".py")}
    missing = sorted(k for k in named if k.rstrip(".") not in keys)
    assert not missing, f"README names config keys no shipped config has: {missing}"
