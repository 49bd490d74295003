"""One-shot GPU check: zoo step speeds, a real train.py fold and a short pipeline.py run.

Written to be run once, on a lent GPU machine under a hard time limit (~7 min on one
H100/H200), so it never stops at the first failure: each model and each section that
fails records `{"error": ...}` and the check goes on; the JSON is rewritten (atomically)
after every model and section, so a run killed from outside still leaves what it measured;
each section has a time budget, and the subprocesses are killed with their workers when
theirs is spent (a hung data loader is recorded as `"hung": true`, not waited on).

(a) every zoo model of configs/bkai.yaml (random init): images/s of train.py's own step
    (autocast bf16 + channels_last, `--compile` optional) and of a plain fp32 loop, bf16
    inference, peak GPU memory and parameters; random data already on the device.
(b) full-size synthetic data, then a real `train.py` fold as a subprocess: exit code, wall
    time, the `images_per_s` of its log (loader included) and how busy the GPU was.
(c) a short `pipeline.py` on the same data: exit code and wall time.

    python -m bench.gpu_check --out outputs/gpu_check.json        # GPU, ~4-7 min
    python -m bench.gpu_check --device cpu --quick                 # CPU smoke test, ~30 s
    python -m bench.gpu_check --print-table outputs/gpu_check.json # markdown of a saved run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch

from bench.train_throughput import images_per_second, random_batch, time_plain, time_train_py
from core.config import apply_overrides, load_config, model_entry
from core.runtime import Dist, configure_cpu_threads
from core.settings import TrainSettings, layout_of
from data.atomic import write_json
from data.foldlog import read_log
from data.synthetic import generate
from training import engine

ROOT = Path(__file__).resolve().parent.parent
ZOO_CONFIG = "configs/bkai.yaml"
DEMO_CONFIG = "configs/demo.yaml"
ZOO = (
    "pranet",
    "emcad",
    "deeplabv3plus_regnetx320",
    "deeplabv3plus_resnet50",
    "unet",
    "unetplusplus",
)
# H200, torch 2.11, smp 0.6.0, 352x352, batch 16, images/s: (plain fp32, bf16 +
# channels_last, bf16 inference). PraNet's and EMCAD's rows are their encoders alone.
REFERENCE = {
    "deeplabv3plus_regnetx320": ("DeepLabV3+ RegNetX-320", 151, 257, 949),
    "deeplabv3plus_resnet50": ("DeepLabV3+ ResNet-50", 428, 478, 2573),
    "unet": ("UNet ResNet-34", 431, 575, 3254),
    "unetplusplus": ("UNet++ ResNet-34", 244, 502, 1492),
    "pranet": ("Res2Net-50 encoder (PraNet)", 339, 450, 2156),
    "emcad": ("PVTv2-b2 encoder (EMCAD)", 265, 244, 1320),
}
SECTIONS = ("a", "b", "c")
# The fold and model that (b) trains; (c) trains every model of the same config.
FOLD_CONFIG, FOLD_MODEL = DEMO_CONFIG, "unet_mobilenetv3"
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class Settings:
    """Sizes, step counts and time budgets of one mode (GPU default or CPU --quick)."""

    models: tuple[tuple[str, str], ...]  # (config file, model name)
    size: int
    batch: int
    warmup: int
    steps: int
    budget_a_s: float
    n_train: int
    n_test: int
    fold_size: int
    fold_batch: int
    fold_epochs: int
    fold_workers: int
    fold_timeout_s: float
    pipeline_epochs: int
    pipeline_workers: int
    pipeline_timeout_s: float
    cpu_threads: int | None  # train.cpu_threads of the subprocesses; None: the config's


GPU = Settings(
    models=tuple((ZOO_CONFIG, name) for name in ZOO),
    size=352,
    batch=16,
    warmup=5,
    steps=20,
    budget_a_s=150,
    # 3 folds of 192 images: 8 steps of 16 a training epoch, enough for a loader-bound rate.
    n_train=192,
    n_test=16,
    fold_size=352,
    fold_batch=16,
    fold_epochs=2,
    fold_workers=16,
    fold_timeout_s=120,
    pipeline_epochs=1,
    pipeline_workers=8,
    pipeline_timeout_s=180,
    cpu_threads=None,
)
# Under a minute on a 2-core CPU: the demo's two light models and the lightest zoo model, tiny
# tensors; still full-size JPEGs for (b) and (c), so the cache and loader see real frames.
QUICK = Settings(
    models=(
        (DEMO_CONFIG, "unet_mobilenetv3"),
        (DEMO_CONFIG, "fpn_mobilenetv3"),
        (ZOO_CONFIG, "unet"),
    ),
    size=64,
    batch=2,
    warmup=2,
    steps=2,
    budget_a_s=60,
    n_train=9,
    n_test=3,
    fold_size=64,
    fold_batch=2,
    fold_epochs=1,
    # One worker: the full-size fold goes through the same fork-server loader as on a GPU.
    fold_workers=1,
    fold_timeout_s=120,
    pipeline_epochs=1,
    pipeline_workers=0,  # the fold above covers the worker path; this keeps --quick short
    pipeline_timeout_s=180,
    cpu_threads=1,  # two threads on a busy 2-core machine thrash (README, CPU threads)
)


class BudgetSpent(Exception):
    """A section's time budget ran out while one of its models was being measured."""


def error_text(exc: BaseException) -> str:
    """The exception as one JSON-friendly line: its type says more than the message alone."""
    return f"{type(exc).__name__}: {exc}"


def progress(text: str) -> None:
    """One flushed stdout line, so a log cut off by a time limit shows how far it got."""
    print(f"[gpu_check] {text}", flush=True)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise BudgetSpent in the main thread once `seconds` have passed.

    SIGALRM runs its handler between Python bytecodes, so a kernel or a compile already
    under way finishes first; the model is then recorded as failed and the section goes on.
    """

    def expire(signum: int, frame: Any) -> None:
        raise BudgetSpent(f"section (a) budget spent {seconds:.1f} s into this model")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- (a) zoo steps


def model_config(config: str, name: str, settings: Settings, compile_: bool) -> dict[str, Any]:
    """The model's config at the check's size and batch, random init, compile as asked."""
    size = settings.size
    return apply_overrides(
        load_config(ROOT / config),
        [
            f"data.img_size=[{size}, {size}]",
            f"train.batch_size={settings.batch}",
            f"train.compile={str(compile_).lower()}",
            f"models.{name}.pretrained=none",
        ],
    )


def time_inference(
    cfg: dict[str, Any], entry: dict[str, Any], dist: Dist, settings: Settings
) -> tuple[float, float]:
    """(images/s of eval-mode inference, parameters in millions) with train.py's model.

    The model comes from engine.build_learner, so it has the precision (bf16 autocast on
    GPU), memory format and compilation that training and predict.py use.
    """
    learner = engine.build_learner(cfg, entry, fold=0, dist=dist)
    params_m = sum(p.numel() for p in learner.raw.parameters()) / 1e6
    net = learner.net.eval()
    images, _ = random_batch(settings.batch, [settings.size] * 2, dist.device)
    if learner.precision.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def step() -> torch.Tensor:
        with learner.precision.autocast():
            # images_per_second syncs through float() of what a step returns: one element.
            return net(images)[0, 0, 0, 0]

    rate = images_per_second(step, settings.batch, settings.steps, settings.warmup, dist.device)
    return rate, params_m


def measure_model(
    config: str, name: str, dist: Dist, settings: Settings, compile_: bool, record: dict[str, Any]
) -> None:
    """Fill `record` as it goes, so a failure keeps what was measured before it."""
    cfg = model_config(config, name, settings, compile_)
    entry = model_entry(cfg, name)
    record.update(config=config, arch=entry["arch"])
    configure_cpu_threads(TrainSettings.from_config(cfg).cpu_threads)
    cuda = dist.device.type == "cuda"
    record["infer_img_s"], record["params_m"] = time_inference(cfg, entry, dist, settings)
    free_memory(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dist.device)
    fast, precision = time_train_py(cfg, entry, dist, settings.steps, settings.warmup)
    record["train_img_s"] = fast
    record["precision"] = (
        str(precision.dtype).replace("torch.", "") if precision.dtype else "float32"
    )
    record["channels_last"] = precision.channels_last
    # train.py's step is what real training runs, so its peak is the one that sizes batches.
    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2**30 if cuda else None
    free_memory(cuda)
    record["train_img_s_plain"] = time_plain(
        cfg, entry, dist.device, settings.steps, settings.warmup
    )


def free_memory(cuda: bool) -> None:
    """Drop the last model's tensors so the next one gets the whole GPU."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def section_models(
    dist: Dist,
    settings: Settings,
    compile_: bool,
    models: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """(a): each model under what is left of the section's budget, saved after each."""
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # Compiling the training and the inference graph of each model about doubles its time.
    budget = settings.budget_a_s * (2 if compile_ else 1)
    deadline = time.monotonic() + budget
    for config, name in settings.models:
        record: dict[str, Any] = {}
        models[name] = record
        left = deadline - time.monotonic()
        start = time.perf_counter()
        if left <= 0:
            record["error"] = f"skipped: section (a) budget of {budget:.0f} s spent"
        else:
            try:
                with time_limit(left):
                    measure_model(config, name, dist, settings, compile_, record)
            except Exception as exc:
                record["error"] = error_text(exc)
        free_memory(dist.device.type == "cuda")
        record["wall_s"] = time.perf_counter() - start
        save()
        progress(f"a {name}: " + _model_line(record))
    return models


def _model_line(record: dict[str, Any]) -> str:
    if "error" in record:
        return f"error {record['error']}"
    return (
        f"train {record['train_img_s']:.1f} img/s (plain {record['train_img_s_plain']:.1f}), "
        f"infer {record['infer_img_s']:.1f} img/s, {record['wall_s']:.1f} s"
    )


# --------------------------------------------------------------------------- subprocesses


class UtilSampler:
    """GPU utilisation sampled in a thread every 0.5 s while a subprocess runs.

    torch.cuda.utilization needs NVML's Python binding; nvidia-smi is the fallback. On the
    CPU, or when neither answers, the fraction is None.
    """

    def __init__(self, device: torch.device) -> None:
        self.index = device.index or 0
        self.read = self._reader() if device.type == "cuda" else None
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _reader(self) -> Callable[[], float] | None:
        def from_nvml() -> float:
            return float(torch.cuda.utilization(self.index))

        def from_smi() -> float:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    f"--id={self.index}",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            return float(out.split()[0])

        for read in (from_nvml, from_smi):
            try:
                read()
                return read
            except Exception:
                continue
        return None

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self.samples.append(self.read())
            except Exception:
                continue

    def __enter__(self) -> UtilSampler:
        if self.read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        busy = sum(self.samples) / len(self.samples) / 100 if self.samples else None
        return {"gpu_busy_fraction": busy, "gpu_util_samples": len(self.samples)}


def run_monitored(
    cmd: Sequence[str], timeout_s: float, log_file: Path, dist: Dist
) -> dict[str, Any]:
    """Run `cmd` from the repository root, GPU utilisation sampled, killed at `timeout_s`.

    The child gets its own process group, so a timeout kills its loader workers too (a
    worker stuck in a deadlock would otherwise outlive it); output goes to a file, not a
    pipe, for the same reason (an orphan holding the pipe would block the read).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dist.device.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine stays on the CPU
    record: dict[str, Any] = {"cmd": " ".join(cmd)}
    start = time.perf_counter()
    with log_file.open("w") as log, UtilSampler(dist.device) as sampler:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            record["exit_code"] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            record.update(exit_code=None, error=f"timeout after {timeout_s:.0f} s", hung=True)
    record["wall_s"] = time.perf_counter() - start
    record.update(sampler.summary())
    if record["exit_code"] != 0:
        record["output_tail"] = log_file.read_text(errors="replace")[-3000:]
    return record


def make_data(work: Path, settings: Settings) -> dict[str, Any]:
    """Full-size synthetic frames (1280 wide, as the real data) shared by (b) and (c)."""
    start = time.perf_counter()
    path = generate(
        work / "data", settings.n_train, settings.n_test, seed=0, workers=os.cpu_count() or 1
    )
    return {
        "dir": str(path),
        "n_train": settings.n_train,
        "n_test": settings.n_test,
        "seconds": time.perf_counter() - start,
    }


def _thread_flags(settings: Settings) -> list[str]:
    return (
        []
        if settings.cpu_threads is None
        else ["--set", f"train.cpu_threads={settings.cpu_threads}"]
    )


def section_train_fold(data_dir: str, work: Path, dist: Dist, settings: Settings) -> dict[str, Any]:
    """(b): one real train.py fold, loader and validation included, as a user runs it."""
    out = work / "train_out"
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        FOLD_CONFIG,
        "--model",
        FOLD_MODEL,
        "--fold",
        "0",
        "--data-dir",
        data_dir,
        "--out-dir",
        str(out),
        "--epochs",
        str(settings.fold_epochs),
        "--img-size",
        str(settings.fold_size),
        "--batch-size",
        str(settings.fold_batch),
        "--workers",
        str(settings.fold_workers),
        "--pretrained",
        "none",
        # a speed check of one short fold: a fold that has not learnt yet is not retrained
        "--set",
        "retry.attempts=0",
        *_thread_flags(settings),
    ]
    record = run_monitored(cmd, settings.fold_timeout_s, work / "train.log", dist)
    fold_cfg = load_config(ROOT / FOLD_CONFIG, [f"out_dir={out}"])
    epochs = read_log(layout_of(fold_cfg).fold(FOLD_MODEL, 0).log)
    # The last epoch's rate: the first one pays for starting the loader workers.
    record["images_per_s"] = epochs[-1]["images_per_s"] if epochs else None
    record["images_per_s_epochs"] = [e["images_per_s"] for e in epochs]
    return record


def section_pipeline(data_dir: str, work: Path, dist: Dist, settings: Settings) -> dict[str, Any]:
    """(c): every stage of pipeline.py on the demo config, few epochs and optuna trials."""
    size = settings.fold_size
    overrides = [
        f"train.epochs={settings.pipeline_epochs}",
        f"data.img_size=[{size}, {size}]",
        f"train.batch_size={settings.fold_batch}",
        f"data.num_workers={settings.pipeline_workers}",
        "ensemble.trials=2",
        "tune.trials=2",
        "retry.attempts=0",
    ]
    cmd = [
        sys.executable,
        "pipeline.py",
        "--config",
        DEMO_CONFIG,
        "--data-dir",
        data_dir,
        "--out-dir",
        str(work / "pipeline_out"),
        *[arg for item in overrides for arg in ("--set", item)],
        *_thread_flags(settings),
    ]
    return run_monitored(cmd, settings.pipeline_timeout_s, work / "pipeline_output.log", dist)


# --------------------------------------------------------------------------- report


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.0f}"


def to_markdown(result: dict[str, Any] | None) -> str:
    """Measured images/s next to the H200 reference; `None` gives the reference alone."""
    models = {k: v for k, v in ((result or {}).get("models") or {}).items() if isinstance(v, dict)}
    lines = [
        "| model | plain fp32 | train.py step | inference | peak GB | params (M) "
        "| H200 reference: plain / bf16+CL / inference |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in dict.fromkeys([*models, *REFERENCE]):
        r = models.get(name, {})
        label, reference = f"`{name}`", "–"
        if name in REFERENCE:
            title, *figures = REFERENCE[name]
            label, reference = f"{title} ({label})", " / ".join(str(v) for v in figures)
        peak = r.get("peak_mem_gb")
        params = r.get("params_m")
        lines.append(
            f"| {label} | {_fmt(r.get('train_img_s_plain'))} "
            f"| {_fmt(r.get('train_img_s'))} | {_fmt(r.get('infer_img_s'))} "
            f"| {'–' if peak is None else f'{peak:.1f}'} "
            f"| {'–' if params is None else f'{params:.1f}'} | {reference} |"
        )
    if result is None:
        return "\n".join(lines)
    s = result["settings"]
    compiled = ", torch.compile" if result["compile"] else ""
    lines[:0] = [
        f"{result['device']}, torch {result['torch']} (CUDA {result['cuda']}), "
        f"smp {result['smp']}; {s['size']}x{s['size']}, batch {s['batch']}{compiled}; "
        "images/s on random data already on the device.",
        "",
    ]
    fold, pipe = result.get("train_fold") or {}, result.get("pipeline") or {}
    lines += [
        "",
        f"train.py fold ({FOLD_MODEL}, {s['fold_size']}x{s['fold_size']}, batch "
        f"{s['fold_batch']}, loader included): {_run_line(fold)}.",
        f"pipeline.py (demo config, epochs {s['pipeline_epochs']}): {_run_line(pipe)}.",
    ]
    return "\n".join(lines)


def _percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.0f}%"


# --------------------------------------------------------------------------- main


def choose_device(name: str | None) -> torch.device:
    """cuda:0 when asked for or available, else the CPU; ValueError for cuda without one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def header(device: torch.device, quick: bool, compile_: bool, settings: Settings) -> dict[str, Any]:
    """Every top-level key from the start, so a run killed early still has the full shape."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "smp": smp.__version__,
        "quick": quick,
        "compile": compile_,
        "settings": {k: v for k, v in asdict(settings).items() if k != "models"},
        "models": {},
        "train_fold": None,
        "pipeline_s": None,
        "pipeline": None,
        "section_s": {},
        "errors": {},
        "total_s": None,
    }


def parse_sections(text: str) -> list[str]:
    """`b,a` -> ["a", "b"]: sections always run in order, since (c) reuses (b)'s data."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"sections are a subset of a,b,c; got {text!r}")
    return [s for s in SECTIONS if s in chosen]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="One-shot GPU check: zoo step speeds, a train.py fold, a short pipeline; "
        "writes JSON after every step and prints a markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny sizes and light models (CPU test)")
    p.add_argument("--out", type=Path, default=Path("outputs/gpu_check.json"), help="JSON result")
    p.add_argument(
        "--sections",
        type=parse_sections,
        default=list(SECTIONS),
        help="comma-separated subset of a (zoo steps), b (train.py fold), c (pipeline.py)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the models of (a) (its budget doubles)",
    )
    p.add_argument(
        "--print-table",
        type=Path,
        metavar="JSON",
        help="print the markdown table of a saved result and exit (runs nothing)",
    )
    return p


def run_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Run the chosen sections, saving the JSON after each step; returns the result."""
    settings = QUICK if args.quick else GPU
    dist = Dist(rank=0, world_size=1, device=device)
    result = header(device, args.quick, args.compile, settings)
    start = time.perf_counter()

    def save() -> None:
        result["total_s"] = time.perf_counter() - start
        write_json(args.out, result)

    def guarded(section: str, key: str, run: Callable[[], Any], line: Callable[[Any], str]) -> None:
        """result[key] = run(), or an error there (keeping what run() filled in) and go on."""
        begun = time.perf_counter()
        try:
            result[key] = run()
            progress(f"{section}: {line(result[key])}")
        except Exception as exc:
            text = error_text(exc)
            result["errors"][section] = text
            result[key] = result.get(key) or {"error": text}
            progress(f"{section}: error {text}")
        result["section_s"][section] = time.perf_counter() - begun
        save()

    def train_fold() -> dict[str, Any]:
        return section_train_fold(data_dir, work, dist, settings)

    def pipeline() -> dict[str, Any]:
        record = section_pipeline(data_dir, work, dist, settings)
        result["pipeline_s"] = record["wall_s"] if record["exit_code"] == 0 else None
        return record

    save()
    progress(f"device {result['device']}, torch {result['torch']}, sections {args.sections}")
    if "a" in args.sections:
        guarded(
            "a",
            "models",
            lambda: section_models(dist, settings, args.compile, result["models"], save),
            lambda models: f"{len(models)} models",
        )
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    data_dir = str(work / "data")
    try:
        if {"b", "c"} & set(args.sections):
            guarded(
                "data",
                "data",
                lambda: make_data(work, settings),
                lambda d: f"{d['n_train']} + {d['n_test']} full-size images, {d['seconds']:.0f} s",
            )
        if "b" in args.sections:
            guarded("b", "train_fold", train_fold, _run_line)
        if "c" in args.sections:
            guarded("c", "pipeline", pipeline, _run_line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _run_line(record: dict[str, Any] | None) -> str:
    record = record or {}
    rate = record.get("images_per_s")
    return (
        f"exit {record.get('exit_code')}, {_fmt(record.get('wall_s'))} s"
        + ("" if rate is None else f", {rate:.1f} img/s")
        + f", GPU busy {_percent(record.get('gpu_busy_fraction'))}"
        + (f", {record['error']}" if "error" in record else "")
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_table:
        print(to_markdown(json.loads(args.print_table.read_text())))
        return 0
    try:
        device = choose_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_check(args, device)
    print()
    print(to_markdown(result))
    print(f"\nwrote {args.out} in {result['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
