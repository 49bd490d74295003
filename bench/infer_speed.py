"""infer.py against the pipeline's own path on the same test images: images/s on this machine.

    python -m bench.infer_speed [--n-test 40] [--write]

Trains `configs/demo.yaml` for one epoch on full-size synthetic frames (speed does not
depend on how well the folds learned; the networks, working size, 3 folds and flip TTA
are the demo's), exports it, and then times, one after the other in this process:
- pipeline: the test images through the functions the stages call: the cache (decode,
  resize, write), every fold with TTA through the data loader (predict.py), the blend
  (ensemble.py), the refiner when the chain uses it (refine.py) and the post-processing
  with the checked submission (postprocess.py); OOF predictions, which infer.py never
  makes, are left out;
- infer.py: the package with torch and with onnxruntime, one thread for the networks
  (the experiment's setting, which reproduces the pipeline's bytes) and two.
Each also without TTA. Every run writes a submission of the same images.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import export
import infer
import pipeline
from bench.report import update_section
from chain.package import Chain
from chain.refinement import load_refiners, portable_numerics, refine_test
from core.config import load_config
from core.paths import InferFiles
from core.runtime import choose_precision, configure_cpu_threads
from core.settings import DataSettings, ExperimentSettings, RefineSettings, TrainSettings, layout_of
from data.augment import transforms_for
from data.cache import load_item, prepare_for_config
from data.dataset import SegDataset
from data.loader import config_loader
from data.probstore import ProbMaps, blend, quantise
from data.reader import list_image_tree, list_test
from data.synthetic import generate
from models.inference import (
    load_checkpoint,
    model_from_checkpoint,
    predict_probs,
    probability_model,
)
from postprocess import make_submission

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def build_experiment(work: Path, n_train: int, n_test: int) -> tuple[dict[str, Any], Path]:
    """The demo recipe for one epoch on fresh full-size data; (config, package)."""
    data = generate(work / "data", n_train, n_test, seed=0)
    demo = ROOT / "configs" / "demo.yaml"
    overrides = [
        f"data_dir={data}",
        f"out_dir={work / 'out'}",
        "train.epochs=1",
        "retry.attempts=0",
    ]
    cfg = load_config(demo, overrides)
    argv = ["--config", str(demo), "--data-dir", str(data), "--out-dir", str(work / "out")]
    sets = ["--set", "train.epochs=1", "--set", "retry.attempts=0"]
    if pipeline.main([*argv, *sets, "--parallel", "2"]) != 0:
        raise SystemExit("the bench experiment failed")
    package = work / "package"
    if export.export(cfg, package, onnx=True) <= 0:
        raise SystemExit("the export failed")
    return cfg, package


def pipeline_path(cfg: dict[str, Any], chain: Chain, out: Path, cache: Path) -> int:
    """The stages' test path from a cold cache; returns the images written."""
    layout = layout_of(cfg)
    cold = {**cfg, "out_dir": str(cache)}  # Layout.cache of a fresh folder
    items = prepare_for_config(cold, list_test(ExperimentSettings.from_config(cfg).data()))
    settings, train = DataSettings.from_config(cfg), TrainSettings.from_config(cfg)
    precision = choose_precision(CPU, train.precision, train.channels_last)
    loader = config_loader(
        cfg,
        SegDataset(items, transforms_for(settings, False)),
        chain.batch_size,
        CPU,
        None,
        name="t",
    )
    codes = []
    for net in chain.networks:
        total = np.zeros((len(items), 3, *settings.img_size), np.float32)
        for k in range(len(net.folds)):
            model = model_from_checkpoint(load_checkpoint(layout.fold(net.name, k).best), CPU)
            if precision.channels_last:
                model = model.to(memory_format=torch.channels_last)
            total += predict_probs(probability_model(model, net.tta), loader, CPU, precision)
        codes.append(quantise(total / len(net.folds)))
    maps = blend(codes, chain.weights)
    ids = [it.id for it in items]
    if chain.refines and chain.refiner is not None:
        refine = RefineSettings(**chain.refiner["settings"])
        images = [load_item(it)[0] for it in items]
        with portable_numerics(refine.cpu_threads):
            models = load_refiners(layout.refiners)
            maps = refine_test(models, ids, images, maps, refine, chain.refiner["use_mask"])
    store = ProbMaps(ids, [it.orig_size for it in items], {}, maps)
    problems = make_submission(
        store, chain.postprocess, ExperimentSettings.from_config(cfg).data(), out
    )
    if problems:
        raise SystemExit(f"the pipeline path wrote a bad submission: {problems[:3]}")
    return len(items)


def timed(run: Any) -> tuple[float, int]:
    start = time.perf_counter()
    n = run()
    return time.perf_counter() - start, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="infer-speed-"))
    try:
        cfg, package = build_experiment(work, args.n_train, args.n_test)
        chain = Chain.read(package)
        no_tta = dataclasses.replace(
            chain, networks=[dataclasses.replace(n, tta="none") for n in chain.networks]
        )
        images = list_image_tree(ExperimentSettings.from_config(cfg).data() / "test")
        rows = []
        for label, tta_chain in (("TTA " + chain.networks[0].tta, chain), ("no TTA", no_tta)):
            out = work / f"pipeline-{len(rows)}"
            configure_cpu_threads(chain.cpu_threads)
            seconds, n = timed(lambda c=tta_chain, o=out: pipeline_path(cfg, c, o / "s.csv", o))
            rows.append((f"pipeline (cache, predict, blend, post-processing), {label}", n, seconds))
            reference = (out / "s.csv").read_bytes()
            for runtime in ("torch", "onnx"):
                for threads in (chain.cpu_threads, 2):
                    dest = work / f"infer-{runtime}-{threads}-{len(rows)}"

                    def run(c=tta_chain, r=runtime, t=threads, d=dest) -> int:
                        kwargs = {"runtime": r, "threads": t}
                        return infer.run_chain(package, c, images, d, **kwargs).predicted

                    seconds, n = timed(run)
                    same = InferFiles(dest).submission.read_bytes() == reference
                    name = f"infer.py --runtime {runtime}, {threads} thread(s), {label}"
                    rows.append((f"{name}{' (same bytes)' if same else ''}", n, seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = [
        f"{args.n_test} full-size test frames (1280 wide), `configs/demo.yaml` networks "
        "(2 models x 3 folds at 256x320), cold start of each run included.",
        "",
        "| path | images | seconds | images/s |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {n} | {s:.1f} | {n / s:.2f} |" for name, n, s in rows),
    ]
    print("\n".join(table))
    if args.write:
        update_section("infer_speed", "\n".join(table))


if __name__ == "__main__":
    main()
