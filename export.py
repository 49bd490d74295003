"""Export a finished experiment's submission chain as one package (package.py).

    python export.py --config configs/bkai.yaml --out bkai_package [--half] [--onnx]

Reads what the stages decided (ensemble/weights.json, refine/, postprocess.json) and the
fold checkpoints of every model the blend uses, checks that they belong together (one
split, the working size, each checkpoint its fold's) and that the chain is current: every
artefact from the checkpoints to postprocess.json was made from the bytes its inputs hold
now (lineage.py), and submission.csv is what postprocess.json makes of the test maps, so
the package cannot disagree with the submission. The package is written into a temporary
folder renamed into place, so an existing package is replaced only by a complete one, and
only with --force: --out must be new, an empty folder, or a package (a folder holding
anything else is refused, never replaced). Models the blend gives no weight are left out:
they change nothing.
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("export")

import copy
import filecmp
import io
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chain import lineage
from chain.package import (
    CHAIN,
    CLASSES,
    REFINERS,
    Chain,
    Network,
    is_package,
    onnx_file,
    save_weights,
    weights_file,
    write_bytes,
    write_manifest,
    zip_folder,
)
from chain.postprocessing import class_maps
from chain.records import BlendRecord, PostprocessRecord, RefineRecord, input_store
from core.config import (
    ConfigError,
    config_hash,
    git_hash,
    model_entry,
    reports_environment_errors,
    setup_logging,
)
from core.invocation import command_hint, command_line
from core.paths import Layout
from core.settings import (
    DataSettings,
    ExperimentSettings,
    PredictSettings,
    TrainSettings,
    layout_of,
)
from data.atomic import atomic_dir, atomic_write, write_json
from data.probstore import load_probs
from data.reader import DataError
from data.submission import write_submission
from models.inference import load_checkpoint, model_from_checkpoint
from training.recipe import check_fold_checkpoint

log = logging.getLogger("export")

ONNX_OPSET = 17


class StaleChain(DataError):
    """An artefact of the submission chain made from other bytes than its inputs hold now:
    a package of the files on disk would not give submission.csv. `commands` are the
    commands (with their own flags) that bring it up to date, in order, named with the
    config flags the user gave."""

    def __init__(self, problem: str, commands: Sequence[Sequence[str]]) -> None:
        runs = [command_hint(c[0], *c[1:]) for c in commands]
        super().__init__(f"{problem}; bring it up to date: {', then '.join(runs)}")


def export_onnx(
    model: torch.nn.Module, path: Path, size: tuple[int, int], half: bool = False
) -> None:
    """The network's logits as ONNX, batch, height and width dynamic. torch's TorchScript
    exporter: its dynamo exporter took 20x as long here (26 s against 1.3 s for the demo
    FPN) and needs onnxscript; both gave the same outputs to 1e-5.

    `half` is --half's meaning for ONNX too: the weights are stored in fp16 (half the file)
    and computed with in fp32, each cast back in the graph, as a --half package's
    safetensors are loaded into fp32 networks. An fp16 graph would not do: most of
    onnxruntime's CPU kernels have no fp16 version.
    """
    model = copy.deepcopy(model).float().eval()
    if half:
        with torch.no_grad():  # round as save_weights does, before any exporter folding
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half())
    example = torch.zeros(1, 3, *size)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    graph = io.BytesIO()
    with warnings.catch_warnings():
        # the exporter's own deprecation notice, and the tracer's note on a size check
        # (group norm's "more than one value"), which the ONNX tests cover at other sizes
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            graph,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": dynamic, "logits": dynamic},
        )
    write_bytes(path, fp16_weights(graph.getvalue()) if half else graph.getvalue())


def fp16_weights(graph: bytes) -> bytes:
    """The ONNX graph with every fp32 initializer stored as fp16 and cast back to fp32
    where the graph reads it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(graph)
    casts = []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        name = init.name
        init.CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{name}.fp16")
        )
        casts.append(helper.make_node("Cast", [init.name], [name], to=TensorProto.FLOAT))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*casts, *nodes])
    return model.SerializeToString()


def blended_networks(cfg: dict[str, Any], layout: Layout) -> tuple[list[str], list[float]]:
    """The models the blend uses and their weights (the all-folds fit weights.json records,
    which made ensemble/test), checked against the blend's own record."""
    blend = BlendRecord.read(layout.weights)
    blend.need("models", "weights")
    names, weights = list(blend.models), [float(w) for w in blend.weights]
    stored = load_probs(layout.blend("test")).meta
    if stored.get("models") != names or stored.get("weights") != weights:
        raise StaleChain(
            f"{layout.blend('test')} was blended from {stored.get('models')} with weights "
            f"{stored.get('weights')}, but {layout.weights} says {names} with {weights}",
            [["ensemble"], ["pipeline"]],
        )
    used = [(n, w) for n, w in zip(names, weights, strict=True) if w > 0]
    return [n for n, _ in used], [w for _, w in used]


def check_current(cfg: dict[str, Any], layout: Layout, tuned: PostprocessRecord) -> None:
    """StaleChain unless every artefact from the fold checkpoints to submission.csv was
    made from the inputs on disk now. Upstream first, so the first named is the cause.

    A blended model's stores name its fold checkpoints, the blends the models' stores,
    the refined stores the blends, postprocess.json the OOF stores it tuned on; then the
    submission must be byte for byte what postprocess.json makes of the test store it
    reads (a few seconds: post-processing runs at about 70 images/s).
    """
    models = list(BlendRecord.read(layout.weights).models)
    links = [
        (layout.store(m, kind), ["predict", "--model", m])
        for m in models
        for kind in ("oof", "test")
    ]
    links += [(layout.blend(kind), ["ensemble"]) for kind in ("oof", "test")]
    refined = layout.refined("oof").relative_to(layout.root).as_posix()
    if tuned.source == "refined" or refined in tuned.made_from:
        links += [(layout.refined(kind), ["refine"]) for kind in ("oof", "test")]
    links.append((layout.postprocess, ["tune"]))
    where = f"{layout.root}: the submission chain is out of date"
    for artefact, command in links:
        name = artefact.relative_to(layout.root).as_posix()
        if artefact == layout.postprocess:
            record = tuned.made_from if tuned.holds(lineage.KEY) else None
        else:
            record = load_probs(artefact).meta.get(lineage.KEY)
        if record is None:
            raise StaleChain(
                f"{where}: {name} records no inputs (made by an older version)",
                [command, ["pipeline"]],
            )
        changed = lineage.changed(layout.root, record)
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise StaleChain(
                f"{where}: {changed[0]}{more} changed since {command[0]}.py made {name}",
                [["pipeline"]],
            )
    store, _ = input_store(cfg, "test")
    params = tuned.params
    with tempfile.TemporaryDirectory(prefix="neopolyp-export-") as tmp:
        again = Path(tmp) / layout.submission.name
        with closing(class_maps(load_probs(store), params)) as maps:
            write_submission(again, maps)
        if not filecmp.cmp(again, layout.submission, shallow=False):
            made = store.relative_to(layout.root).as_posix()
            raise StaleChain(
                f"{where}: {layout.submission.name} is not what postprocess.json makes of "
                f"{made} (written by another postprocess.py run, or changed since)",
                [["postprocess"]],
            )


def refiner_record(layout: Layout, source: str) -> dict[str, Any] | None:
    """The refiner's part of the chain (copied into the package), None without one."""
    if not layout.refine_record.is_file():
        if source == "refined":
            raise StaleChain(
                f"{layout.postprocess} uses refined maps but refine.py never ran",
                [["refine"], ["pipeline"]],
            )
        return None
    refined = RefineRecord.read(layout.refine_record)
    refined.need("settings", "refined_mask")
    if not layout.refiners.is_file():
        raise StaleChain(
            f"{layout.refiners} not found (refine.py of an older version kept its refiners in "
            "memory only)",
            [["refine"], ["pipeline"]],
        )
    return {"file": REFINERS, "settings": refined.settings, "use_mask": refined.refined_mask.kept}


def write_package(
    cfg: dict[str, Any], root: Path, half: bool = False, onnx: bool = False
) -> dict[str, Any]:
    """Fill the empty folder `root` with the experiment's package; returns its manifest."""
    layout = layout_of(cfg)
    tuned = PostprocessRecord.read(layout.postprocess)
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
            raise StaleChain(
                f"{test_store.where}: records no folds",
                [["predict", "--model", name], ["pipeline"]],
            )
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
                export_onnx(model, root / onnx_files[-1], data.img_size, half)
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
    refiner = refiner_record(layout, tuned.source)
    if refiner is not None:
        write_bytes(root / REFINERS, layout.refiners.read_bytes())
    chain = Chain(
        img_size=data.img_size,
        batch_size=PredictSettings.from_config(cfg).batch_size,
        precision=train.precision,
        channels_last=train.channels_last,
        cpu_threads=train.cpu_threads,
        networks=networks,
        weights=weights,
        source=tuned.source,
        refiner=refiner,
        postprocess=tuned.params,
        classes=CLASSES,
    )
    write_json(root / CHAIN, chain.to_dict())
    chosen = tuned.chosen
    provenance = {
        "experiment": ExperimentSettings.from_config(cfg).experiment,
        "git": git_hash(),
        "config_hash": config_hash(cfg),
        "split_id": split_id,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "half": half,
        "onnx_opset": ONNX_OPSET if onnx else None,
        "chain": chosen,
        "oof_out_of_sample": tuned.out_of_sample.get(chosen),
        "oof_in_sample": tuned.scores.get("tuned"),
    }
    return write_manifest(root, provenance)


def check_out(out: Path, force: bool) -> None:
    """DataError unless `out` is free to write: absent, an empty folder, or a package
    (export's own, nothing else in it) with `force`. Anything else is never replaced."""
    if not out.exists() and not out.is_symlink():
        return
    zipped = out.suffix.lower() == ".zip"
    if zipped and not out.is_file():
        raise DataError(f"--out {out}: exists and is not a file; choose another --out")
    if not zipped and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder; choose another --out")
    if not zipped and not any(out.iterdir()):
        return
    if zipped and not is_package(out):
        raise DataError(f"--out {out}: a file that is not a package zip; choose another --out")
    if not zipped and not is_package(out):
        example = sorted(p.name for p in out.iterdir())[0]
        raise DataError(
            f"--out {out}: a folder that is not a package (it holds {example!r}, ...); export "
            "writes only a new or empty folder, or replaces a package with --force: choose "
            "another --out"
        )
    if not force:
        raise DataError(f"--out {out}: a package is there already; add --force to replace it")


@contextmanager
def named_as(tmp: Path, out: Path) -> Iterator[None]:
    """An OSError on a file of the temporary folder names the file it was to become."""
    try:
        yield
    except OSError as exc:
        written = Path(str(exc.filename or ""))
        if written.is_relative_to(tmp):
            exc.filename = str(out / written.relative_to(tmp))
        raise


def export(
    cfg: dict[str, Any],
    out: Path,
    half: bool = False,
    onnx: bool = False,
    force: bool = False,
) -> int:
    """Write the package at `out` (a folder, or a zip for a .zip name); returns its bytes.
    `out` and the chain are checked before anything is written."""
    check_out(out, force)
    layout = layout_of(cfg)
    if not layout.submission.is_file():
        raise DataError(
            f"{layout.submission} not found: finish the experiment first: "
            + command_hint("pipeline")
        )
    check_current(cfg, layout, PostprocessRecord.read(layout.postprocess))
    if out.suffix.lower() != ".zip":
        with atomic_dir(out) as tmp, named_as(tmp, out):
            write_package(cfg, tmp, half, onnx)
        return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        root = Path(tmp) / out.stem
        root.mkdir()
        with named_as(root, out):
            write_package(cfg, root, half, onnx)
        with atomic_write(out, "wb") as fh:
            zip_folder(root, fh)
    return out.stat().st_size


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("export").parse_args(argv)
    setup_logging()
    try:
        cfg = cli.stage_config(args)
        size = export(cfg, args.out, args.half, args.onnx, args.force)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")
    apply = command_line("infer", "--package", str(args.out), "--images", "DIR", "--out", "OUT")
    print(f"apply it: {apply}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
