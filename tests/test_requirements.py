"""The declared ranges admit the pinned, tested versions.

`requirements*.txt` are what a Kaggle or Colab notebook installs (ranges, so a
preinstalled torch is kept); `constraints.txt` is what `make install` and CI install. If a
range and a pin drift apart, one of the two installs is no longer the tested one.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.trainkit import ROOT


def _lines(name: str) -> list[Requirement]:
    text = (ROOT / name).read_text().splitlines()
    return [Requirement(line) for line in (t.split("#")[0].strip() for t in text) if line]


def _pins() -> dict[str, str]:
    pins = {}
    for req in _lines("constraints.txt"):
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints.txt pins exactly, got {req}"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_every_range_admits_its_pinned_version() -> None:
    pins = _pins()
    for name in ("requirements.txt", "requirements-dev.txt"):
        for req in _lines(name):
            key = canonicalize_name(req.name)
            assert key in pins, f"{name}: {req.name} has no pin in constraints.txt"
            assert req.specifier.contains(pins[key]), f"{name}: {req} excludes {pins[key]}"


def test_torch_is_a_range_that_keeps_an_older_preinstalled_build() -> None:
    torch_req = {r.name: r for r in _lines("requirements.txt")}["torch"]
    assert torch_req.specifier.contains("2.5.1"), torch_req


def test_the_pins_are_the_installed_versions() -> None:
    for name, version in _pins().items():
        assert metadata.version(name) == version, f"{name}: installed {metadata.version(name)}"


def test_make_install_uses_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements.txt -r requirements-dev.txt -c constraints.txt" in makefile
