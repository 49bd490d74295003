"""The submission stage: tuned post-processing of the blended test maps → submission.csv.

It applies `postprocess.json` (tune.py) with the operations of `postprocessing.py` to the
blended test probabilities (the refined ones when tune.py chose them out of sample: the
store `records.input_store` reads from postprocess.json), and writes
`submission.csv` only once it passes its check.
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("postprocess")


import logging
import os
import sys
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

from tqdm import tqdm

from chain.postprocessing import PostprocessParams, class_maps
from chain.records import input_store, load_params
from core.config import (
    ConfigError,
    reports_environment_errors,
    setup_logging,
)
from core.settings import ExperimentSettings, layout_of
from core.ticker import Ticker
from data.probstore import ProbMaps, load_probs
from data.reader import DataError, list_test
from data.submission import check_submission, image_size, write_submission

log = logging.getLogger("postprocess")


def check_store_matches_test(store: ProbMaps, data_dir: Path) -> None:
    """The store must hold exactly the test images, each at its true size, before writing."""
    samples = {s.id: s for s in list_test(data_dir)}
    missing = sorted(samples.keys() - set(store.ids))
    extra = sorted(set(store.ids) - samples.keys())
    if missing or extra:
        raise DataError(
            f"{store.where}: ids differ from the test images in {data_dir} "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} extra, e.g. {extra[:1]})"
        )
    for image_id, size in zip(store.ids, store.orig_sizes, strict=True):
        true = image_size(samples[image_id].image)
        if tuple(size) != true:
            raise DataError(f"{store.where}: {image_id} recorded at {size}, image is {true}")


def make_submission(
    store: ProbMaps, params: PostprocessParams, data_dir: Path, out: Path, n_jobs: int = -1
) -> list[str]:
    """Write `out` only if it passes `check_submission`; returns the problems otherwise."""
    check_store_matches_test(store, data_dir)
    tmp = out.with_name(f".{out.name}.unchecked")
    with (
        closing(class_maps(store, params, n_jobs)) as maps,
        Ticker("post-process", len(store), "images", logger=log) as ticker,
    ):
        bar = tqdm(maps, total=len(store), desc="post-process", disable=None)
        write_submission(tmp, ticker.track(bar))
    problems = check_submission(tmp, data_dir)
    if problems:
        tmp.unlink()
        return problems
    os.replace(tmp, out)
    return []


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("postprocess").parse_args(argv)
    setup_logging()
    try:
        cfg = cli.stage_config(args)
        layout = layout_of(cfg)
        data_dir = ExperimentSettings.from_config(cfg).data()
        store = load_probs(args.probs or input_store(cfg, "test")[0])
        params = load_params(args.params or layout.postprocess)
        out = layout.submission
        problems = make_submission(store, params, data_dir, out, args.jobs)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"error: the submission failed its check; {out} not written", file=sys.stderr)
        return 1
    steps = ", ".join(params.active_steps()) or "plain argmax"
    message = args.message or f"{layout.root.name}: {store.meta.get('model', '?')}, {steps}"
    print(f"wrote {out} ({len(store)} images; post-processing: {steps})")
    print(f'kaggle competitions submit -c bkai-igh-neopolyp -f {out} -m "{message}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
