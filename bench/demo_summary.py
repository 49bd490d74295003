"""The demo's scores over several runs (data seeds, ablations), as BENCHMARKS.md tables.

Each run is a `pipeline.py` output folder (`outputs/<exp>` of one `make demo`, e.g. with
`DEMO_SEED=1 DEMO_OUT=outputs/seed1`); this reads their `scores.json` and writes, per run,
the submission and the best simple chain on the test set and the submitted chain's
out-of-sample and in-sample OOF scores, then the mean over the runs and each run's gap to
its best simple chain, so a claim about the recipe rests on several data seeds, not one.
An ablation gives one run per seed, in the order of `--seeds`; its submission is set beside
the recipe's, seed by seed, with the mean.

    python -m bench.demo_summary --seeds outputs/seed0/demo outputs/seed1/demo outputs/seed2/demo \\
        --ablation "3 models=outputs/c3_s0/demo,outputs/c3_s1/demo,outputs/c3_s2/demo" \\
        --wall 455 470 480
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import update_section
from chain.evaluation import submission_gain
from core.paths import Layout

KEYS = ("competition", "dice_seg", "dice_neo", "dice_non")
TEST = "Test set (original size, test_gt/)"
OOF = "Out-of-fold (working resolution)"


def run_rows(run: Path) -> dict[str, dict[str, Any]]:
    """The rows of one run a reader compares: the submission and the best simple chain on
    the test set, and the submitted chain's out-of-sample and in-sample OOF scores."""
    tables = json.loads(Layout.at(run).scores.read_text())["tables"]
    test = tables[TEST]
    submitted = next(r for r in test if r.get("role") == "submission")
    simple = max((r for r in test if r.get("role") == "simple alternative"), key=_score)
    oof = tables[OOF]
    chain = next(r for r in oof if r["variant"] == "out of sample")
    tuned = next(r for r in oof if r["variant"].startswith("in-sample"))
    return {
        "predict nothing (test)": test[0],
        f"best simple chain (test): {simple['model']}, {simple['variant']}": simple,
        f"submission (test): {submitted['model']}, {submitted['variant']}": submitted,
        f"OOF out of sample: {chain['model']}": chain,
        f"OOF in sample: {tuned['model']}": tuned,
    }


def _score(row: dict[str, Any]) -> float:
    return float(row["competition"])


def table(runs: dict[str, Path]) -> list[str]:
    lines = [
        "| run | row | rows-Dice | Dice_seg | Dice_neo | Dice_non |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, run in runs.items():
        for name, r in run_rows(run).items():
            lines.append(f"| {label} | {name} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |")
    return lines


def submission_and_gap(run: Path) -> tuple[np.ndarray, str]:
    """The submission's test scores and its rows-Dice minus the best simple chain's, with
    the paired interval when the run recorded one."""
    rows = list(run_rows(run).values())
    gap = f"{_score(rows[2]) - _score(rows[1]):+.3f}"
    recorded = submission_gain(rows[1])
    if recorded is not None:
        gap += f" [{recorded[1]:+.3f}, {recorded[2]:+.3f}]"
    return np.array([rows[2][k] for k in KEYS]), gap


def ablation_table(variants: dict[str, list[Path]]) -> list[str]:
    """Each variant's submission per seed (test rows-Dice / Dice_non) and its submitted
    chain's out-of-sample OOF rows-Dice, with the means: the variants share the seeds, so
    the columns compare like with like."""
    n = len(next(iter(variants.values())))
    seeds = " | ".join(f"seed {i}" for i in range(n))
    lines = [
        f"| variant | {seeds} | mean | OOF out of sample, mean |",
        "|---|" + "---|" * n + "---|---:|",
    ]
    for label, runs in variants.items():
        rows = [list(run_rows(r).values()) for r in runs]
        test = np.array([[row[2]["competition"], row[2]["dice_non"]] for row in rows])
        oof = np.mean([row[3]["competition"] for row in rows])
        cells = " | ".join(f"{a:.3f} / {b:.3f}" for a, b in test)
        mean = f"{test[:, 0].mean():.3f} / {test[:, 1].mean():.3f}"
        lines.append(f"| {label} | {cells} | {mean} | {oof:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=Path, nargs="+", required=True, help="one run per data seed")
    p.add_argument("--wall", type=float, nargs="*", default=[], help="their wall times, s")
    p.add_argument(
        "--ablation",
        action="append",
        default=[],
        metavar="LABEL=RUN[,RUN...]",
        help="a variant: one run per seed, in the order of --seeds",
    )
    args = p.parse_args(argv)
    lines = ["Test set at original size, per data seed (`make demo DEMO_SEED=k`):", ""]
    lines += table({f"seed {i}": run for i, run in enumerate(args.seeds)})
    scored = [submission_and_gap(r) for r in args.seeds]
    values = np.array([v for v, _ in scored])
    gaps = [g for _, g in scored]
    lines += [
        "",
        "The submission over the seeds: "
        + ", ".join(
            f"{k} {m:.3f} (min {lo:.3f})"
            for k, m, lo in zip(KEYS, values.mean(0), values.min(0), strict=True)
        )
        + "; against the best simple chain on the test set (paired per-image interval at "
        + "decide.confidence, not widened for picking that chain on the test set): "
        + ", ".join(gaps)
        + ".",
    ]
    if args.wall:
        lines.append(
            f"Wall time of the whole pipeline (`--parallel 2`, cache included): "
            f"{', '.join(f'{w / 60:.1f}' for w in args.wall)} min."
        )
    if args.ablation:
        variants = {"recipe": list(args.seeds)}
        for label, runs in (a.split("=", 1) for a in args.ablation):
            variants[label] = [Path(r) for r in runs.split(",")]
            if len(variants[label]) != len(args.seeds):
                p.error(f"--ablation {label}: give one run per seed ({len(args.seeds)})")
        lines += [
            "",
            "Ablations on the same seeds: the submission's test rows-Dice / Dice_non per seed,",
            "and the submitted chain's out-of-sample OOF rows-Dice:",
            "",
        ]
        lines += ablation_table(variants)
    update_section("demo_summary", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
