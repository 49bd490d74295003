"""What each artefact of the submission chain was made from, recorded in the artefact itself.

`stamps.json` tells the pipeline which stage to rerun, but only the pipeline writes it: a
fold retrained by hand after the submission, or a store predicted again without blending
again, leaves it as it was. export.py must know whether the files on disk still belong
together, whoever made them, or it packs new weights beside a submission made with old
ones (the package's infer.py output would then differ from submission.csv). So each stage
that derives an artefact from others records the digest of each input in it, under
`made_from` ({path below the experiment folder: stamps.digest}), and `changed` compares
them with the bytes on disk now. Digests cost about a second per GB (stamps.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from chain.stamps import digest

KEY = "made_from"


def made_from(root: Path, inputs: Sequence[Path]) -> dict[str, str]:
    """{input's path below the experiment folder `root`: digest of its bytes}."""
    return {p.relative_to(root).as_posix(): digest([p]) for p in inputs}


def changed(root: Path, record: Mapping[str, str]) -> list[str]:
    """The recorded inputs whose bytes differ now, or that are gone."""
    return [
        name
        for name, recorded in record.items()
        if not (root / name).exists() or digest([root / name]) != recorded
    ]
