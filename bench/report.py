"""Write one benchmark's figures into its own section of BENCHMARKS.md.

Each script owns the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, so
scripts can be rerun independently without clobbering each other's numbers.
"""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Figures written by the scripts in `bench/`; rerun a script to refresh its section.\n"
)


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU only, {torch.get_num_threads()} torch threads"
    return f"{platform.machine()}, {device}, torch {torch.__version__}"


def update_section(name: str, markdown: str, path: Path = BENCHMARKS) -> None:
    from data.atomic import write_text

    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = f"_Measured {time.strftime('%Y-%m-%d')} on {machine()}._\n\n"
    block = f"{start}\n{stamp}{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    write_text(path, text)
