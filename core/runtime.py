"""Where and how a process computes: devices, DDP ranks, precision, threads, RNG state.

Shared by train.py, predict.py and the benchmarks, so that inference runs with exactly the
precision and memory format that training used.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from core.config import ConfigError
from core.settings import PRECISIONS

# Same inputs, same weights, on any x86 machine with AVX2: oneDNN (convolutions) and MKL
# (matrix products) pick their kernels by the CPU's widest instructions, and an AVX-512
# kernel sums in another order than an AVX2 one (measured here: logits 0.16 apart after 5
# training steps of the demo UNet). Pinned to AVX2 before torch runs its first operation
# (both read these on first use, not at import); no slower on this project's CPU. cuBLAS
# needs a fixed workspace for deterministic GPU matrix products. A user's setting wins.
for _key, _value in (
    ("ONEDNN_MAX_CPU_ISA", "AVX2"),
    ("MKL_CBWR", "AVX2"),
    ("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),
):
    os.environ.setdefault(_key, _value)


@dataclass(frozen=True)
class Dist:
    """Where this process runs; world_size 1 without torchrun."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def init_dist() -> Dist:
    """Read torchrun's environment; nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world, device=device)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# The first compute capability whose tensor cores do bf16 (Ampere: A100, A10, L4; H100 is
# 9.0). Below it (T4 7.5, V100 7.0, P100 6.0) cuDNN has no bf16 convolutions and torch
# emulates them, while `torch.cuda.is_bf16_supported()` still says yes.
NATIVE_BF16 = (8, 0)


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None = fp32) and memory format for one device."""

    device_type: str
    dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        """bf16, fp16 or fp32: what a fold's log records."""
        return next(k for k, v in _DTYPES.items() if v == self.dtype)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16


def choose_precision(device: torch.device, precision: str, channels_last: bool) -> Precision:
    """`train.precision` on this device. `auto`: bf16 on a GPU of compute capability 8.0 or
    more, fp16 with a GradScaler below it. A CPU computes in fp32 whatever is asked (bf16
    autocast on CPUs without AMX is slower, and channels_last does not help the CPU kernels
    here), so a config made for a GPU still predicts on a laptop. bf16 asked of a GPU
    without it is an error: emulated, it is slower than fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return Precision(device.type, None, False)
    capability = torch.cuda.get_device_capability(device)
    native = capability >= NATIVE_BF16
    if precision == "bf16" and not native:
        raise ConfigError(
            f"train.precision bf16: this GPU (compute capability {capability[0]}.{capability[1]}) "
            "has no native bf16; use auto or fp16"
        )
    if precision == "auto":
        precision = "bf16" if native else "fp16"
    return Precision("cuda", _DTYPES[precision], channels_last)


def configure_cpu_threads(threads: int) -> None:
    """Intra-op threads of a training or prediction process: `train.cpu_threads`, else 1.

    On the CPU the thread count is part of the numerics: convolutions and batch norm
    split their sums by thread, so 1 and 2 threads train different weights (measured: the
    first epoch's loss differs). One thread per process, whatever `--parallel` or the
    machine's core count, keeps the same command giving the same submission; cores are
    used by training folds side by side (`pipeline.py --parallel N`), which these small
    models gain more from anyway. A larger `train.cpu_threads` is faster for one big CPU
    run and changes the weights with it. On a GPU the CPU threads change nothing.
    """
    torch.set_num_threads(threads)


def configure_determinism(exact: bool, device: torch.device) -> None:
    """`train.deterministic` (default on): cuDNN's deterministic algorithms, no autotuning.

    cuDNN's benchmark mode picks the fastest algorithm by timing it, and the winner can
    change between runs, with different sums; some backward kernels add with atomics in
    any order. Off trades reproducibility for speed on the GPU; the CPU path is already
    deterministic for a fixed thread count.
    """
    torch.use_deterministic_algorithms(exact, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not exact
        torch.backends.cudnn.deterministic = exact


# Crash tests set NEOPOLYP_KILL_AT to one of the points below; the process then kills
# itself there with SIGKILL, which no cleanup can intercept, exactly as a user's kill would.
KILL_POINTS = ("epoch-saved", "store-written", "predict-fold", "study-trial")


def kill_point(name: str) -> None:
    """SIGKILL this process at `name` when NEOPOLYP_KILL_AT asks for it (tests only)."""
    if os.environ.get("NEOPOLYP_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# Set by `pipeline.py --parallel` in each train.py it starts: the pipeline's pid.
PARENT_ENV = "NEOPOLYP_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent() -> None:
    """In a child of `pipeline.py --parallel`: be sent SIGTERM when the pipeline dies.

    A parent killed by SIGKILL (an out-of-memory kill, a notebook's stop button) runs no
    cleanup, so only the kernel can end its children; left alone they trained on for hours
    and held their folds' locks. Linux only: elsewhere the children outlive the parent.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def forced_fold_failure(model: str, fold: int, attempt: int) -> bool | None:
    """Test hook: NEOPOLYP_FAIL_FOLD="model:fold:n[,model:fold:n...]" makes each listed
    fold's first n attempts count as failed and the later ones as passed, whatever they
    scored; None for a fold it does not list (judged on its scores)."""
    for part in filter(None, os.environ.get("NEOPOLYP_FAIL_FOLD", "").split(",")):
        name, k, n = part.rsplit(":", 2)
        if name == model and int(k) == fold:
            return attempt < int(n)
    return None


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part, so streams never overlap."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    """Every RNG's state in types `torch.load(weights_only=True)` accepts (no numpy arrays)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    # A checkpoint loaded onto a GPU brings these tensors with it; RNG states live on the CPU.
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
