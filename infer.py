"""Apply an exported package (export.py) to any folder of images.

    python infer.py --package bkai_package --images frames/ --out predictions/ [--masks]

Runs exactly the chain the experiment submitted, with the same functions the stages use:
each image decoded and resized to the working size as the cache does, every fold network
with the model's TTA, the fold mean quantised as a probability store is, the blend, the
refiner when the chain uses it, and the tuned post-processing at the image's own size.
With the experiment's thread setting (the default) a package reproduces the pipeline's
`submission.csv` byte for byte.

Images stream through in chunks of a few batches (a multiple of the experiment's
predict batch size, so each batch holds the images the pipeline's did): memory holds one
chunk and a few post-processed maps, whatever the folder's size. A line every
`ticker.PROGRESS_S` seconds gives images/s and the time left.

A run writes into a staging folder inside --out and moves its outputs (submission.csv,
masks/, overlays/) into place only once it succeeded, replacing the previous run's as a
whole: a failed run leaves them untouched, a successful one leaves no mask of another
run. It holds --out's lock meanwhile (a second run on the same folder is refused), and
replaces only outputs that infer.py wrote there (the lock file marks them).
"""

from __future__ import annotations

from workflow import cli, stages

if __name__ == "__main__":
    stages.preflight("infer")

import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from joblib import effective_n_jobs
from torch import nn

from chain.package import Chain, Network, PackageError, open_package
from chain.postprocessing import class_maps
from chain.refinement import load_refiners, portable_numerics, refine_test
from core import locks
from core.config import ConfigError, reports_environment_errors, setup_logging
from core.paths import InferFiles
from core.runtime import Precision, choose_precision, configure_cpu_threads, configure_determinism
from core.settings import RefineSettings
from core.ticker import Ticker
from data.atomic import atomic_write
from data.augment import build_transforms
from data.cache import resize_pair
from data.dataset import chw_uint8, images_to_device
from data.probstore import ProbMaps, blend_rows, normalised, quantise
from data.reader import DataError, list_image_tree, load_image
from data.submission import check_rows, write_submission
from models.inference import probability_model

log = logging.getLogger("infer")

# Images predicted together: a few batches (two chunks in memory: the next one decodes
# while the networks run), so memory stays bounded whatever the folder holds.
CHUNK_IMAGES = 64
OVERLAY_ALPHA = 0.45


class OnnxNetwork(nn.Module):
    """An ONNX network behind torch's interface, so TTA (ttach) and the chain stay the
    torch runtime's: only the forward pass changes."""

    def __init__(self, path: Path, threads: int, device: torch.device) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise PackageError(f"{path}: onnxruntime cannot load it ({exc})") from exc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().float().cpu().contiguous().numpy()
        logits = self.session.run(None, {"images": array})[0]
        return torch.from_numpy(logits).to(images.device)


@dataclass
class Decoded:
    """One image ready for the networks: its working-size pixels and original size."""

    id: str
    path: Path
    orig_size: tuple[int, int]
    small: np.ndarray  # uint8 (h, w, 3) at the working size, as the cache stores it


@dataclass
class Counts:
    """What a run did, for its last line."""

    predicted: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


class BadImage(DataError):
    """An image that cannot be read, with --bad-images stop (exit 1)."""


class NothingRead(DataError):
    """Not one image could be read: there is no submission to write (exit 1)."""


def fold_networks(
    root: Path,
    chain: Chain,
    runtime: str,
    device: torch.device,
    precision: Precision,
    threads: int,
) -> list[list[nn.Module]]:
    """For each network of the chain, its folds as probability models (with its TTA)."""
    models = []
    for net in chain.networks:
        models.append(
            [
                probability_model(
                    _network(root, net, k, runtime, device, precision, threads), net.tta
                )
                for k in range(len(net.folds))
            ]
        )
    return models


def _network(
    root: Path,
    net: Network,
    fold: int,
    runtime: str,
    device: torch.device,
    precision: Precision,
    threads: int,
) -> nn.Module:
    if runtime == "onnx":
        if not net.onnx:
            raise PackageError(
                f"{root}: {net.name} has no ONNX files; export the package with --onnx"
            )
        return OnnxNetwork(root / net.onnx[fold], threads, device)
    model = net.build(root, fold, device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def decode(image_id: str, path: Path, size: tuple[int, int]) -> Decoded | DataError:
    """The image at the working size (INTER_AREA, as data.cache), or the error naming it."""
    try:
        image = load_image(path)
    except DataError as exc:
        return exc
    small, _ = resize_pair(image, None, size)
    return Decoded(image_id, path, image.shape[:2], small)


@torch.no_grad()
def chunk_probs(
    networks: list[list[nn.Module]],
    chain: Chain,
    smalls: list[np.ndarray],
    device: torch.device,
    precision: Precision,
) -> list[np.ndarray]:
    """Each network's uint8 codes for a chunk: the mean over its folds of the TTA
    probabilities, summed fold by fold and quantised, as predict.py stores them."""
    transform = build_transforms(chain.img_size, train=False)
    images = torch.stack([chw_uint8(transform(image=im)["image"]) for im in smalls])
    codes = []
    for folds in networks:
        total = np.zeros((len(images), 3, *chain.img_size), np.float32)
        for model in folds:
            model.eval()
            for lo in range(0, len(images), chain.batch_size):
                x = images_to_device(images[lo : lo + chain.batch_size], device, precision)
                with precision.autocast():
                    probs = model(x)
                total[lo : lo + len(x)] += probs.float().cpu().numpy()
        codes.append(quantise(total / len(folds)))
    return codes


def chunk_maps(
    decoded: list[Decoded],
    networks: list[list[nn.Module]],
    refiners: list[nn.Module] | None,
    chain: Chain,
    device: torch.device,
    precision: Precision,
    jobs: int,
) -> Iterator[tuple[Decoded, np.ndarray]]:
    """(image, class map at its own size) for a chunk: networks, blend, refiner, post."""
    if not decoded:
        return
    smalls = [d.small for d in decoded]
    codes = chunk_probs(networks, chain, smalls, device, precision)
    rows = np.arange(len(decoded))
    maps = blend_rows(codes, normalised(chain.weights), rows)
    ids = [d.id for d in decoded]
    if refiners is not None and chain.refiner is not None:
        settings = RefineSettings(**chain.refiner["settings"])
        with portable_numerics(settings.cpu_threads):
            maps = refine_test(refiners, ids, smalls, maps, settings, chain.refiner["use_mask"])
    store = ProbMaps(ids, [d.orig_size for d in decoded], {}, maps)
    with closing(class_maps(store, chain.postprocess, jobs)) as stream:
        for d, (_, class_map) in zip(decoded, stream, strict=True):
            yield d, class_map


def _write_image(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(path.suffix, image)
    if not ok:
        raise DataError(f"{path}: OpenCV could not encode it")
    with atomic_write(path, "wb") as fh:
        fh.write(encoded.tobytes())


def write_extras(
    d: Decoded, class_map: np.ndarray, out: InferFiles, chain: Chain, masks: bool, overlays: bool
) -> None:
    """masks/<id>.png (class ids) and overlays/<id>.jpg (class colours over the image)."""
    if masks:
        _write_image(out.mask(d.id), class_map)
    if overlays:
        image = load_image(d.path).astype(np.float32)
        colours = np.asarray([chain.classes[str(c)]["colour"] for c in range(3)], np.float32)
        polyp = (class_map > 0)[..., None]
        mixed = image * (1 - OVERLAY_ALPHA) + colours[class_map] * OVERLAY_ALPHA
        overlay = np.where(polyp, mixed, image).round().astype(np.uint8)
        _write_image(out.overlay(d.id), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))


def run_chain(
    root: Path,
    chain: Chain,
    images: Sequence[tuple[str, Path]],
    out: Path,
    *,
    runtime: str = "torch",
    device: torch.device | None = None,
    jobs: int | None = None,
    bad_images: str = "skip",
    masks: bool = False,
    overlays: bool = False,
) -> Counts:
    """Predict `images` with the package at `root` into `out` (submission.csv and, by
    flag, masks/ and overlays/), replacing the previous run's outputs only once this one
    succeeded; returns the counts. BadImage with `bad_images="stop"`, NothingRead when no
    image could be read, locks.InUse while another run writes into `out`. `jobs`: CPU
    threads for everything (joblib's count: -1 all cores); None runs the networks on the
    experiment's thread count, which reproduces its bytes, and the rest on all cores."""
    files = InferFiles(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: a file, not a folder; choose another --out")
    foreign = [] if files.lock.exists() else [p for p in files.outputs if p.exists()]
    if foreign:
        raise DataError(
            f"--out {out}: holds {foreign[0].name}, which infer.py did not write there (no "
            f"{files.lock.name}); choose another --out, or move it away"
        )
    with locks.hold(files.lock, f"--out {out}"):
        for leftover in out.glob(".staging-*"):  # a killed run's: the lock is ours now
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        try:
            counts = _predict(
                root,
                chain,
                images,
                InferFiles(staging),
                runtime=runtime,
                device=device,
                jobs=jobs,
                bad_images=bad_images,
                masks=masks,
                overlays=overlays,
            )
            replace_outputs(InferFiles(staging), files)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return counts


def replace_outputs(new: InferFiles, old: InferFiles) -> None:
    """Each output of the finished run `new` in place of the previous run's; an output
    this run did not make is removed, as it belongs to other images or another package."""
    for made, previous in zip(new.outputs, old.outputs, strict=True):
        if previous.is_dir() and not previous.is_symlink():
            os.replace(previous, new.dir / f"previous-{previous.name}")  # goes with new.dir
        elif not (made.is_file() and previous.is_file() and not previous.is_symlink()):
            previous.unlink(missing_ok=True)  # a file replaced by a file is replaced at once
        if made.exists():
            os.replace(made, previous)


def _predict(
    root: Path,
    chain: Chain,
    images: Sequence[tuple[str, Path]],
    files: InferFiles,
    *,
    runtime: str,
    device: torch.device | None,
    jobs: int | None,
    bad_images: str,
    masks: bool,
    overlays: bool,
) -> Counts:
    """run_chain's work, every output written under `files`."""
    device = device or torch.device("cpu")
    threads = chain.cpu_threads if jobs is None else effective_n_jobs(jobs)
    configure_cpu_threads(threads)
    configure_determinism(True, device)
    precision = choose_precision(device, chain.precision, chain.channels_last)
    networks = fold_networks(root, chain, runtime, device, precision, threads)
    refiners = load_refiners(root / chain.refiner["file"], device) if chain.refines else None
    workers = effective_n_jobs(-1 if jobs is None else jobs)
    step = chain.batch_size * max(1, CHUNK_IMAGES // chain.batch_size)
    counts = Counts()
    sizes: dict[str, tuple[int, int]] = {}
    start = time.perf_counter()
    ticker = Ticker("infer", len(images), "images", logger=log)

    def decoded_chunks(pool: ThreadPoolExecutor) -> Iterator[list[Decoded | DataError]]:
        """The chunks in order, the next one decoding while the networks run this one."""
        chunks = [images[lo : lo + step] for lo in range(0, len(images), step)]
        pending = [pool.submit(decode, *it, chain.img_size) for it in chunks[0]]
        for following in [*chunks[1:], []]:
            current = pending
            pending = [pool.submit(decode, *it, chain.img_size) for it in following]
            yield [job.result() for job in current]

    def stream() -> Iterator[tuple[str, np.ndarray]]:
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            for chunk in decoded_chunks(pool):
                decoded = []
                for item in chunk:
                    if isinstance(item, Decoded):
                        decoded.append(item)
                    elif bad_images == "stop":
                        raise BadImage(f"{item} (--bad-images stop)")
                    else:
                        log.warning("skipped: %s", item)
                        counts.skipped.append(str(item))
                        ticker.step()
                for d, class_map in chunk_maps(
                    decoded, networks, refiners, chain, device, precision, workers
                ):
                    write_extras(d, class_map, files, chain, masks, overlays)
                    sizes[d.id] = d.orig_size
                    counts.predicted += 1
                    ticker.step()
                    yield d.id, class_map

    with ticker:
        write_submission(files.submission, stream())
    counts.seconds = time.perf_counter() - start
    if counts.predicted == 0:
        raise NothingRead(f"none of the {len(images)} images could be read")
    problems = check_rows(files.submission, sizes)
    if problems:
        raise DataError(f"the submission failed its check, not written: {problems[:3]}")
    return counts


def check_apart(images: Path, out: Path) -> None:
    """--out inside --images: the next run would read its masks and overlays as images;
    --images inside --out: the run would replace the images it reads."""
    inner, outer = out.resolve(), images.resolve()
    if inner.is_relative_to(outer):
        raise ConfigError(
            f"--out {out} is inside --images {images}: a later run would read its masks and "
            "overlays as images; choose an --out outside it"
        )
    if outer.is_relative_to(inner):
        raise ConfigError(
            f"--images {images} is inside --out {out}: the outputs would replace what is "
            "read; choose an --out outside it"
        )


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no GPU is visible to torch here")
    return torch.device(name)


@reports_environment_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = stages.parser("infer").parse_args(argv)
    setup_logging()
    try:
        jobs = cli.jobs_given(args)
        check_apart(args.images, args.out)
        device = choose_device(args.device)
        images = list_image_tree(args.images)
        with open_package(args.package) as (root, manifest):
            chain = Chain.read(root)
            log.info(
                "package %s (%s, chain: %s): %d images",
                args.package,
                (manifest.get("provenance") or {}).get("experiment"),
                (manifest.get("provenance") or {}).get("chain"),
                len(images),
            )
            counts = run_chain(
                root,
                chain,
                images,
                args.out,
                runtime=args.runtime,
                device=device,
                jobs=jobs,
                bad_images=args.bad_images,
                masks=args.masks,
                overlays=args.overlays,
            )
    except (BadImage, NothingRead) as exc:
        print(f"error: {exc} (nothing in {args.out} was replaced)", file=sys.stderr)
        return 1
    except (ConfigError, DataError, locks.InUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rate = counts.predicted / counts.seconds if counts.seconds else 0.0
    print(
        f"wrote {InferFiles(args.out).submission}: {counts.predicted} images predicted, "
        f"{len(counts.skipped)} skipped, {rate:.2f} images/s"
    )
    for line in counts.skipped:
        print(f"  skipped: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
