"""Where and how the network runs: device, numeric precision, determinism, distributed ranks."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from medseg.errors import MedsegError


@dataclass(frozen=True)
class Precision:
    """An autocast choice: ``dtype`` None means float32; ``scale_loss`` for float16 on CUDA."""

    name: str
    dtype: torch.dtype | None
    scale_loss: bool = False

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks this process's CUDA device when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedsegError(
            f"device {name!r} was asked for but CUDA is not available; use --device cpu"
        )
    return device


def cpu_has_fast_bfloat16() -> bool:
    """True when the CPU computes bfloat16 natively (AMX or AVX-512 BF16): there it pays off.

    On older CPUs bfloat16 is emulated and slower than float32, so 'auto' keeps float32.
    The CPU's feature flags are read from /proc/cpuinfo (Linux); elsewhere, float32 is kept.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def select_precision(name: str, device: torch.device) -> Precision:
    """Resolve ``auto``/``bf16``/``fp16``/``fp32`` for a device."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "bf16" if cpu_has_fast_bfloat16() else "fp32"
    if name == "fp32":
        return Precision("fp32", None)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16)
    if device.type != "cuda":
        raise MedsegError("precision fp16 needs a CUDA device; on a CPU use bf16 or fp32")
    return Precision("fp16", torch.float16, scale_loss=True)


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally insist on deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> Ranks:
    """Join the process group torchrun describes (RANK, WORLD_SIZE); gloo on CPU, NCCL on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size())


def all_gather_counts(counts: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Concatenate every rank's per-image confusion counts (M_r, 4) into one (M, 4) tensor."""
    if not ranks.distributed:
        return counts
    gathered: list[torch.Tensor | None] = [None] * ranks.world_size
    dist.all_gather_object(gathered, counts.cpu())
    return torch.cat(gathered)


def mean_across_ranks(value: float, ranks: Ranks) -> float:
    if not ranks.distributed:
        return value
    gathered: list[float | None] = [None] * ranks.world_size
    dist.all_gather_object(gathered, value)
    return float(np.mean(gathered))
