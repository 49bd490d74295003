"""`python -m bench.model_sizes`: the zoo as a table of parameters and forward FLOPs.

Models are built on the `meta` device: parameter counts and FLOPs depend on shapes only,
so even the 109M DeepLabV3+ is measured in seconds with no memory and no weights.
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`, which reports
FLOPs = 2 × multiply-accumulates (papers often quote MACs as "FLOPs").
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from bench.report import update_section
from models.registry import ZOO, build_model

log = logging.getLogger("bench.model_sizes")


def measure(name: str, size: tuple[int, int] = (352, 352), num_classes: int = 3) -> dict:
    """Parameters (millions) and forward GFLOPs (2×MACs) of zoo model `name`."""
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes).eval()
        x = torch.empty(1, 3, *size)
    params = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return {
        "name": name,
        "params_m": params / 1e6,
        "encoder_m": encoder / 1e6,
        "gflops": counter.get_total_flops() / 1e9,
        "published_m": ZOO[name].published_m,
        "comparable_m": ZOO[name].comparable_m,
        "note": ZOO[name].note,
    }


def to_markdown(rows: list[dict], size: tuple[int, int]) -> str:
    lines = [
        f"Model zoo (3 classes). GFLOPs: one forward of a 1×3×{size[0]}×{size[1]} input, "
        "counted as 2×MACs (convolutions and matrix products) by torch's FlopCounterMode.",
        "",
        "Δ compares with the published count less parameters it counts that the model "
        "rightly lacks (see note).",
        "",
        "| model | params (M) | encoder (M) | decoder (M) | GFLOPs | published (M) | Δ | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        published, delta = "–", "–"
        if r["published_m"] is not None:
            published = f"{r['published_m']:.2f}"
            delta = f"{100 * (r['params_m'] / r['comparable_m'] - 1):+.1f}%"
        lines.append(
            f"| {r['name']} | {r['params_m']:.2f} | {r['encoder_m']:.2f} | "
            f"{r['params_m'] - r['encoder_m']:.2f} | {r['gflops']:.1f} | {published} | "
            f"{delta} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model_sizes", description=__doc__)
    parser.add_argument(
        "--names", nargs="+", choices=sorted(ZOO), default=list(ZOO),
        help="zoo models to measure (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--size", type=int, nargs=2, default=(352, 352), metavar=("H", "W"),
        help="input height and width for the FLOP count (default: 352 352, PraNet's size)",
    )  # fmt: skip
    parser.add_argument(
        "--update-benchmarks", action="store_true",
        help="also write the table into the 'models' section of BENCHMARKS.md",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    size = tuple(args.size)
    rows = [measure(name, size) for name in tqdm(args.names, desc="measuring")]
    markdown = to_markdown(rows, size)
    print(markdown)
    if args.update_benchmarks:
        update_section("models", markdown)
        log.info("wrote the 'models' section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
