"""Training throughput: train.py's own step against a plain fp32 loop, side by side.

Both loops train the same architecture on the same random batch, so the difference is
only what train.py adds to a step: autocast (bf16, else fp16 + GradScaler), channels_last
and optionally torch.compile on GPU; on CPU both run fp32 and the ratio should be ~1
(the CPU gain is in the thread setting and the cached loader, which this does not time).
Data loading is excluded: train.py's end-to-end rate is the `images_per_s` of its log.

    python -m bench.train_throughput                       # CPU: light model, ~1 min
    python -m bench.train_throughput --config configs/bkai.yaml \\
        --model deeplabv3plus_regnetx320 --img-size 352 --batch-size 16   # GPU
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bench.report import update_section
from core.config import ConfigError, apply_overrides, load_config, model_entry, parse_img_size
from core.runtime import Dist, Precision, configure_cpu_threads, init_dist
from core.settings import DataSettings, TrainSettings
from models import build_model
from models.inference import NUM_CLASSES
from models.losses import SegLoss
from training import engine

log = logging.getLogger("bench.train_throughput")
# H200 figures quoted in the issue, for comparison when no GPU is at hand.
REFERENCE = "H200 reference (issue): plain fp32 151 img/s, bf16 + channels_last 257 img/s."


def plain_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> torch.Tensor:
    """The textbook fp32 step the optimised one is compared with."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), masks)
    loss.backward()
    optimizer.step()
    return loss.detach()


def images_per_second(
    step: Callable[[], torch.Tensor], batch: int, steps: int, warmup: int, device: torch.device
) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)  # waits for the queued work
    return steps * batch / (time.perf_counter() - start)


def random_batch(
    batch: int, size: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=gen)
    masks = torch.randint(0, NUM_CLASSES, (batch, *size), generator=gen)
    return images.to(device), masks.to(device)


def time_train_py(
    cfg: dict[str, Any], entry: dict[str, Any], dist: Dist, steps: int, warmup: int
) -> tuple[float, Precision]:
    """img/s of the engine's `train_step` with the model, optimizer and precision it builds."""
    learner = engine.build_learner(cfg, entry, fold=0, dist=dist)
    learner.train_net.train()
    batch = TrainSettings.from_config(cfg).batch_size
    images, masks = random_batch(batch, DataSettings.from_config(cfg).img_size, dist.device)
    if learner.precision.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    rate = images_per_second(
        lambda: learner.step(images, masks)[1],
        batch,
        steps,
        warmup,
        dist.device,
    )
    return rate, learner.precision


def time_plain(
    cfg: dict[str, Any], entry: dict[str, Any], device: torch.device, steps: int, warmup: int
) -> float:
    model = build_model(entry["arch"], num_classes=NUM_CLASSES, **entry["kwargs"])
    model = model.to(device).train()
    train = TrainSettings.from_config(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    loss_fn = SegLoss(**train.loss).to(device)
    images, masks = random_batch(train.batch_size, DataSettings.from_config(cfg).img_size, device)
    return images_per_second(
        lambda: plain_step(model, images, masks, loss_fn, optimizer),
        train.batch_size,
        steps,
        warmup,
        device,
    )


def run(cfg: dict[str, Any], model_name: str, steps: int, warmup: int) -> dict[str, Any]:
    """img/s of both loops on this machine's device (GPU when there is one)."""
    dist = init_dist()
    configure_cpu_threads(TrainSettings.from_config(cfg).cpu_threads)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    entry = model_entry(cfg, model_name)
    fast, precision = time_train_py(cfg, entry, dist, steps, warmup)
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()
    plain = time_plain(cfg, entry, dist.device, steps, warmup)
    return {
        "model": model_name,
        "arch": entry["arch"],
        "batch": TrainSettings.from_config(cfg).batch_size,
        "size": list(DataSettings.from_config(cfg).img_size),
        "device": str(dist.device),
        "dtype": str(precision.dtype).replace("torch.", "") if precision.dtype else "float32",
        "channels_last": precision.channels_last,
        "compile": TrainSettings.from_config(cfg).compile,
        "plain": plain,
        "train_py": fast,
    }


def to_markdown(r: dict[str, Any]) -> str:
    h, w = r["size"]
    fast = f"{r['dtype']}" + (" + channels_last" if r["channels_last"] else "")
    fast += " + compile" if r["compile"] else ""
    lines = [
        f"Model `{r['model']}` ({r['arch']}), batch {r['batch']}, {h}x{w}, device {r['device']}; "
        "random data, steps only (no loader).",
        "",
        "| loop | precision | images/s |",
        "|---|---|---|",
        f"| plain fp32 | float32 | {r['plain']:.1f} |",
        f"| train.py `train_step` | {fast} | {r['train_py']:.1f} |",
        "",
        f"Ratio train.py / plain: **{r['train_py'] / r['plain']:.2f}x**.",
    ]
    if not r["device"].startswith("cuda"):
        lines += [
            "",
            "No GPU was lent for this task, so these are CPU figures (fp32 in both loops; "
            f"a ratio near 1 is expected). {REFERENCE} Target for train.py on GPU: "
            ">= 300 img/s end to end. Rerun on a GPU with `--config configs/bkai.yaml "
            "--model deeplabv3plus_regnetx320 --img-size 352 --batch-size 16`.",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="images/s of train.py's step versus a plain fp32 loop; writes BENCHMARKS.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default="configs/demo.yaml", help="experiment YAML file")
    p.add_argument("--model", default="unet_mobilenetv3", help="entry of the config's `models:`")
    p.add_argument("--img-size", help="N or HxW; overrides data.img_size")
    p.add_argument("--batch-size", type=int, help="overrides train.batch_size")
    p.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (cudnn autotune, compile)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile train.py's model")
    p.add_argument("--no-report", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        overrides = [f"train.compile={str(args.compile).lower()}"]
        if args.img_size:
            size = parse_img_size(args.img_size)
            overrides.append(f"data.img_size=[{size[0]}, {size[1]}]")
        if args.batch_size:
            overrides.append(f"train.batch_size={args.batch_size}")
        cfg = apply_overrides(cfg, overrides)
        result = run(cfg, args.model, args.steps, args.warmup)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    markdown = to_markdown(result)
    print(markdown)
    if not args.no_report:
        update_section("train_throughput", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
