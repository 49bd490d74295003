"""Write the ImageNet encoders a config needs into one folder, for offline machines.

A Kaggle notebook with internet off (as submissions must be) cannot reach the hubs. On a
machine with network access:

    python -m models.weights --config configs/bkai.yaml --out encoders/

writes `encoders/<model>.safetensors` for every model of the config with
`pretrained: imagenet` (the encoder only, as timm/smp load it), and prints the files and
their sizes. Upload the folder (e.g. as a Kaggle dataset) and set `pretrained_dir` to it
(`--set pretrained_dir=/kaggle/input/<dataset>`): every such model then loads its file,
and its folds keep the identity of an `imagenet` run. `--random-init` writes randomly
initialised encoders instead, to rehearse the offline path without a network.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core.config import (
    ConfigError,
    encoder_file,
    load_config,
    model_entry,
    reports_environment_errors,
)
from core.settings import config_models
from models.inference import NUM_CLASSES
from models.pretrained import export_encoder
from models.registry import build_model


def imagenet_models(cfg: dict) -> list[str]:
    """The config's models whose encoder starts from ImageNet weights."""
    return [
        name
        for name in config_models(cfg)
        if str(model_entry(cfg, name).get("pretrained")).lower() == "imagenet"
    ]


def write_encoders(
    cfg: dict, names: Sequence[str], out: Path, random_init: bool = False
) -> list[Path]:
    """Each model's encoder as `<out>/<name>.safetensors`; the paths written."""
    written = []
    for name in names:
        entry = model_entry(cfg, name)
        model = build_model(
            entry["arch"],
            num_classes=NUM_CLASSES,
            pretrained=None if random_init else "imagenet",
            **entry["kwargs"],
        )
        written.append(export_encoder(model, encoder_file(out, name)))
    return written


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.weights",
        description="Write every ImageNet encoder a config's models need into one folder "
        "(for pretrained_dir on an offline machine).",
    )
    parser.add_argument("--config", default="configs/bkai.yaml", help="experiment YAML")
    parser.add_argument("--out", type=Path, required=True, help="folder for <model>.safetensors")
    parser.add_argument("--models", nargs="+", help="only these models (default: all imagenet)")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="write randomly initialised encoders (rehearse the offline path without network)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        names = args.models or imagenet_models(cfg)
        if not names:
            raise ConfigError(f"{args.config}: no model has pretrained: imagenet")
        for name in names:
            model_entry(cfg, name)  # an unknown name fails before any download
        paths = write_encoders(cfg, names, args.out, args.random_init)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = 0
    for path in paths:
        size = path.stat().st_size
        total += size
        print(f"{path}  {size / 1e6:.1f} MB")
    print(f"{len(paths)} encoders, {total / 1e6:.1f} MB; offline: --set pretrained_dir={args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
