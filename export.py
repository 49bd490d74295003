"""Export a finished experiment's submission chain as one package (package.py).

    python export.py --config configs/bkai.yaml --out bkai_package [--half] [--onnx]

Reads what the stages decided (ensemble/weights.json, refine/, postprocess.json) and the
fold checkpoints of every model the blend uses, checks that they belong together (one
split, the working size, each checkpoint its fold's), and writes the package into a
temporary folder renamed into place, so an existing package is replaced only by a
complete one. Models the blend gives no weight are left out: they change nothing.
"""

from __future__ import annotations

import stages

if __name__ == "__main__":
    stages.exit_if_help("export")

import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from config import (
    ConfigError,
    config_hash,
    git_hash,
    model_entry,
    reports_environment_errors,
    resolve_cli_config,
    setup_logging,
)
from data.atomic import atomic_dir, atomic_write
from data.probstore import load_probs
from data.reader import DataError
from models.inference import load_checkpoint, model_from_checkpoint
from package import (
    CHAIN,
    CLASSES,
    REFINERS,
    Chain,
    Network,
    onnx_file,
    save_weights,
    weights_file,
    write_manifest,
    zip_folder,
)
from paths import Layout
from postprocessing import PostprocessParams
from recipe import check_fold_checkpoint
from settings import DataSettings, TrainSettings

log = logging.getLogger("export")

ONNX_OPSET = 17


def _read(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path} not found: run {stage} (or pipeline.py) before exporting")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc


def export_onnx(model: torch.nn.Module, path: Path, size: tuple[int, int]) -> None:
    """The network's logits as ONNX, batch, height and width dynamic. torch's TorchScript
    exporter: its dynamo exporter took 20x as long here (26 s against 1.3 s for the demo
    FPN) and needs onnxscript; both gave the same outputs to 1e-5."""
    example = torch.zeros(1, 3, *size)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the exporter's own deprecation notice, and the tracer's note on a size check
        # (group norm's "more than one value"), which the ONNX tests cover at other sizes
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model.float().eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": dynamic, "logits": dynamic},
        )


def blended_networks(cfg: dict[str, Any], layout: Layout) -> tuple[list[str], list[float]]:
    """The models the blend uses and their weights (the all-folds fit weights.json records,
    which made ensemble/test), checked against the blend's own record."""
    doc = _read(layout.weights, "ensemble.py")
    names, weights = list(doc["models"]), [float(w) for w in doc["weights"]]
    stored = load_probs(layout.blend("test")).meta
    if stored.get("models") != names or stored.get("weights") != weights:
        raise DataError(
            f"{layout.blend('test')} was blended from {stored.get('models')} with weights "
            f"{stored.get('weights')}, but {layout.weights} says {names} with {weights}: "
            "run ensemble.py (or pipeline.py) again"
        )
    used = [(n, w) for n, w in zip(names, weights, strict=True) if w > 0]
    return [n for n, _ in used], [w for _, w in used]


def refiner_record(layout: Layout, source: str) -> dict[str, Any] | None:
    """The refiner's part of the chain (copied into the package), None without one."""
    if not layout.refine_record.is_file():
        if source == "refined":
            raise DataError(f"{layout.postprocess} uses refined maps but refine.py never ran")
        return None
    doc = _read(layout.refine_record, "refine.py")
    if not layout.refiners.is_file():
        raise DataError(
            f"{layout.refiners} not found (refine.py of an older version kept its refiners in "
            "memory only): run refine.py (or pipeline.py) again"
        )
    return {"file": REFINERS, "settings": doc["settings"], "use_mask": doc["refined_mask"]["kept"]}


def write_package(
    cfg: dict[str, Any], root: Path, half: bool = False, onnx: bool = False
) -> dict[str, Any]:
    """Fill the empty folder `root` with the experiment's package; returns its manifest."""
    layout = Layout.of(cfg)
    if not layout.submission.is_file():
        raise DataError(f"{layout.submission} not found: finish the experiment first")
    tuned = _read(layout.postprocess, "tune.py")
    names, weights = blended_networks(cfg, layout)
    data, train = DataSettings.from_config(cfg), TrainSettings.from_config(cfg)
    size = list(data.img_size)
    split_id = load_probs(layout.blend("oof")).split_id
    networks = []
    for name in names:
        entry = model_entry(cfg, name)
        test_store = load_probs(layout.store(name, "test"))
        folds = test_store.meta.get("folds") or []
        if not folds:
            raise DataError(f"{test_store.where}: records no folds; run predict.py again")
        files, onnx_files = [], []
        for k in folds:
            run = layout.fold(name, int(k))
            ckpt = load_checkpoint(run.best)
            check_fold_checkpoint(ckpt, run, int(k), split_id, size, name, entry["arch"])
            files.append(weights_file(name, int(k)))
            save_weights(ckpt["model"], root / files[-1], half)
            if onnx:
                onnx_files.append(onnx_file(name, int(k)))
                model = model_from_checkpoint(ckpt, torch.device("cpu"))
                export_onnx(model, root / onnx_files[-1], data.img_size)
            log.info("%s fold %s: packed", name, k)
        networks.append(
            Network(
                name=name,
                arch=str(ckpt["arch"]),
                kwargs=dict(ckpt["kwargs"]),
                tta=str(test_store.meta.get("tta", "none")),
                folds=files,
                onnx=onnx_files or None,
            )
        )
    refiner = refiner_record(layout, str(tuned["source"]))
    if refiner is not None:
        shutil.copyfile(layout.refiners, root / REFINERS)
    chain = Chain(
        img_size=data.img_size,
        batch_size=int((cfg.get("predict") or {}).get("batch_size", 16)),
        precision=train.precision,
        channels_last=train.channels_last,
        cpu_threads=train.cpu_threads,
        networks=networks,
        weights=weights,
        source=str(tuned["source"]),
        refiner=refiner,
        postprocess=PostprocessParams.from_dict(tuned["params"]),
        classes=CLASSES,
    )
    (root / CHAIN).write_text(json.dumps(chain.to_dict(), indent=2) + "\n")
    chosen = str(tuned.get("chosen", ""))
    provenance = {
        "experiment": cfg["experiment"],
        "git": git_hash(),
        "config_hash": config_hash(cfg),
        "split_id": split_id,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "half": half,
        "onnx_opset": ONNX_OPSET if onnx else None,
        "chain": chosen,
        "oof_out_of_sample": (tuned.get("out_of_sample") or {}).get(chosen),
        "oof_in_sample": (tuned.get("scores") or {}).get("tuned"),
    }
    return write_manifest(root, provenance)


def export(cfg: dict[str, Any], out: Path, half: bool = False, onnx: bool = False) -> int:
    """Write the package at `out` (a folder, or a zip for a .zip name); returns its bytes."""
    if out.suffix.lower() != ".zip":
        with atomic_dir(out) as tmp:
            write_package(cfg, tmp, half, onnx)
        return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        root = Path(tmp) / out.stem
        root.mkdir()
        write_package(cfg, root, half, onnx)
        with atomic_write(out, "wb") as fh:
            zip_folder(root, fh)
    return out.stat().st_size


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("export").parse_args(argv)
    setup_logging()
    try:
        cfg = resolve_cli_config(args)
        size = export(cfg, args.out, args.half, args.onnx)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")
    print(f"apply it: python infer.py --package {args.out} --images DIR --out OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
