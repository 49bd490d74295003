"""Where and how a process computes: devices, DDP ranks, precision, threads, RNG state.

Shared by train.py, predict.py and the benchmarks, so that inference runs with exactly the
precision and memory format that training used.
"""

from __future__ import annotations

import os
import random
import signal
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from data.dataset import normalise


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


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None = fp32) and memory format for one device."""

    device_type: str
    dtype: torch.dtype | None
    channels_last: bool

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16


def choose_precision(device: torch.device, amp: bool, channels_last: bool) -> Precision:
    """bf16 where the GPU has it, else fp16 + GradScaler; CPUs train in fp32 (bf16 autocast
    on CPUs without AMX is slower, and channels_last does not help the CPU kernels here)."""
    if device.type != "cuda":
        return Precision(device.type, None, False)
    dtype = None
    if amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Precision("cuda", dtype, channels_last)


def configure_cpu_threads(cfg: dict[str, Any]) -> None:
    """Intra-op threads for the training process; loader workers need the other cores.

    `train.cpu_threads` wins when set; otherwise all cores minus one per loader worker,
    and at least one.
    """
    threads = cfg["train"].get("cpu_threads")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) - int(cfg["data"].get("num_workers", 0)))
    torch.set_num_threads(int(threads))


# Crash tests set NEOPOLYP_KILL_AT to one of the points below; the process then kills
# itself there with SIGKILL, which no cleanup can intercept, exactly as a user's kill would.
KILL_POINTS = ("epoch-saved", "store-written", "predict-fold")


def kill_point(name: str) -> None:
    """SIGKILL this process at `name` when NEOPOLYP_KILL_AT asks for it (tests only)."""
    if os.environ.get("NEOPOLYP_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


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


def to_device(
    batch: dict[str, Any], device: torch.device, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and masks to the device, then normalised and widened there."""
    images = normalise(batch["image"].to(device, non_blocking=True))
    if precision.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["mask"].to(device, non_blocking=True).long()
