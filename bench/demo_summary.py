"""The demo's scores over several runs (data seeds, ablations), as BENCHMARKS.md tables.

Each run is a `pipeline.py` output folder (`outputs/<exp>` of one `make demo`, e.g. with
`DEMO_SEED=1 DEMO_OUT=outputs/seed1`); this reads their `scores.json` and writes the test
rows of the blend after post-processing, with the mean and spread over the runs of each
group, so a claim about the recipe rests on several data seeds, not one.

    python -m bench.demo_summary --seeds outputs/seed0/demo outputs/seed1/demo outputs/seed2/demo \\
        --ablation "no sampling/paste=outputs/abl_nominority/demo" --wall 455 470 480
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.report import update_section

KEYS = ("competition", "dice_seg", "dice_neo", "dice_non")
TEST = "Test set (original size, test_gt/)"
OOF = "Out-of-fold (working resolution)"
SUBMITTED, TUNED_OOF = "submitted", "tuned OOF"  # placeholders resolved per run


def blend_rows(run: Path) -> dict[str, dict[str, float]]:
    """The test rows of one run by "model variant", and its OOF rows by model."""
    tables = json.loads((run / "scores.json").read_text())["tables"]
    rows = {f"{r['model']} {r['variant']}": r for r in tables[TEST]}
    rows.update({f"OOF {r['model']}": r for r in tables[OOF]})
    return rows


def submitted(rows: dict[str, dict[str, float]]) -> str:
    """The test row of what the submission holds: the refined maps when refine.py was kept
    (the OOF table then tunes "refined + post-processing"), else the blend."""
    refined = any(k.startswith("OOF refined + post-processing") for k in rows)
    return "refined post-processed" if refined else "blend post-processed"


def tuned_oof(rows: dict[str, dict[str, float]]) -> str:
    return next(k for k in rows if k.startswith("OOF") and "+ post-processing" in k)


def table(runs: dict[str, Path], row_keys: list[str]) -> list[str]:
    lines = [
        "| run | row | rows-Dice | Dice_seg | Dice_neo | Dice_non |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, run in runs.items():
        rows = blend_rows(run)
        keys = [submitted(rows) if k == SUBMITTED else k for k in row_keys]
        keys = [tuned_oof(rows) if k == TUNED_OOF else k for k in keys]
        for key in dict.fromkeys(keys):
            r = rows[key]
            lines.append(f"| {label} | {key} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=Path, nargs="+", required=True, help="one run per data seed")
    p.add_argument("--wall", type=float, nargs="*", default=[], help="their wall times, s")
    p.add_argument(
        "--ablation", action="append", default=[], metavar="LABEL=RUN", help="seed-0 variants"
    )
    args = p.parse_args(argv)
    main_rows = ["predict nothing baseline", "blend argmax", "blend post-processed", SUBMITTED]
    lines = ["Test set at original size, per data seed (`make demo DEMO_SEED=k`):", ""]
    lines += table({f"seed {i}": run for i, run in enumerate(args.seeds)}, main_rows)
    chosen = [blend_rows(r) for r in args.seeds]
    values = np.array([[rows[submitted(rows)][k] for k in KEYS] for rows in chosen])
    mean, spread = values.mean(0), values.max(0) - values.min(0)
    lines += [
        "",
        "The submission (refined or blend, post-processed) over the seeds: "
        + ", ".join(
            f"{k} {m:.3f} (min {lo:.3f}, range {s:.3f})"
            for k, m, lo, s in zip(KEYS, mean, values.min(0), spread, strict=True)
        )
        + ".",
    ]
    if args.wall:
        lines.append(
            f"Wall time of the whole pipeline (`--parallel 2`, cache included): "
            f"{', '.join(f'{w / 60:.1f}' for w in args.wall)} min."
        )
    if args.ablation:
        runs = {"recipe (seed 0)": args.seeds[0]}
        runs.update({k: Path(v) for k, v in (a.split("=", 1) for a in args.ablation)})
        lines += ["", "Other runs on seed 0 (ablations, earlier commits), side by side:", ""]
        lines += table(runs, [SUBMITTED, TUNED_OOF])
    update_section("demo_summary", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
