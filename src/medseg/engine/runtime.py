"""Where and how the network runs: device, numeric precision, determinism, distributed ranks."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import os
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medseg.config.choices import DEVICE_FORMS
from medseg.core.errors import MedsegError


@dataclass(frozen=True)
class Precision:
    """An autocast choice: ``dtype`` None means float32; ``scale_loss`` for float16."""

    name: str
    dtype: torch.dtype | None
    scale_loss: bool = False

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def parse_device(name: str) -> torch.device:
    """The device ``name`` stands for: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``.

    ``auto`` is resolved to this process's CUDA device, else Apple's MPS, else the CPU. Whether an
    explicitly named device exists is `select_device`'s check; this only reads the name.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:[0-9]+)?", name):
        raise MedsegError(f"unknown device {name!r}; use {DEVICE_FORMS}")
    return torch.device(name)


def select_device(name: str = "auto") -> torch.device:
    """`parse_device`, refusing a device this machine does not have."""
    device = parse_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MedsegError(
                f"device {name!r} was asked for but CUDA is not available; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MedsegError(
                f"device {name!r} was asked for but this machine has "
                f"{torch.cuda.device_count()} GPUs (cuda:0 ...); pick one of them"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MedsegError(
            f"device {name!r} was asked for but Apple's MPS is not available; use --device cpu"
        )
    return device


def tune_allocator() -> bool:
    """Keep the C allocator's freed memory for the next forward pass (glibc only).

    glibc serves large blocks (a batch's activations) with fresh ``mmap``s and returns them on
    free, so every forward pass pays page faults and zeroing for the same memory again; a
    process only stops doing so once a large free raises glibc's dynamic threshold. Serving
    every block from the heap and trimming it only past 1 GiB makes a fresh process run at the
    speed of a warm one (README Performance). Process-wide, so the command line calls it for its
    own process; importing medseg does not. Returns whether it applied (False without glibc,
    or with ``MEDSEG_TUNE_MALLOC=0``).
    """
    if os.environ.get("MEDSEG_TUNE_MALLOC", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: macOS, Windows, musl
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # from glibc's malloc.h
    return all(
        mallopt(option, value) == 1
        for option, value in ((m_mmap_max, 0), (m_trim_threshold, 1 << 30), (m_top_pad, 1 << 28))
    )


def cpu_has_fast_bfloat16() -> bool:
    """True when the CPU computes bfloat16 natively (AMX or AVX-512 BF16): there it pays off.

    On older CPUs bfloat16 is emulated and slower than float32, so 'auto' keeps float32.
    The CPU's feature flags are read from /proc/cpuinfo (Linux); elsewhere, float32 is kept.
    ``MEDSEG_CPU_BF16=0`` (or ``1``) overrides what the flags say, so that 'auto' chooses as
    on the other kind of CPU: CI runs the test suite both ways on whichever CPU it has.
    """
    override = os.environ.get("MEDSEG_CPU_BF16")
    if override in ("0", "1"):
        return override == "1"
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
        elif device.type == "mps":
            # Autocast on MPS accepts fp16 (and bf16 from macOS 14), but medseg has not been
            # measured there, neither its speed nor its Dice: float32 until it has.
            name = "fp32"
        else:
            name = "bf16" if cpu_has_fast_bfloat16() else "fp32"
    if name == "fp32":
        return Precision("fp32", None)
    if name == "bf16":
        if device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
            raise MedsegError("precision bf16 on MPS needs macOS 14 or newer; use fp16 or fp32")
        return Precision("bf16", torch.bfloat16)
    if device.type not in ("cuda", "mps"):
        raise MedsegError("precision fp16 needs a CUDA or MPS device; on a CPU use bf16 or fp32")
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


def releases_process_group(function: Callable) -> Callable:
    """Destroy the process group that ``function`` created (through `init_distributed`) when it
    returns or raises; a group that existed before the call is left to whoever made it."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        existed = dist.is_available() and dist.is_initialized()
        try:
            return function(*args, **kwargs)
        finally:
            if not existed and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    return wrapper


@contextlib.contextmanager
def main_rank_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building the data cache), the other ranks after it."""
    if ranks.distributed and not ranks.is_main:
        dist.barrier()
    yield
    if ranks.distributed and ranks.is_main:
        dist.barrier()


def gather_objects(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` on one process."""
    if not ranks.distributed:
        return [value]
    gathered: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_gather_counts(counts: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Concatenate every rank's per-image confusion counts, (M_r, 4) or (M_r, C, 4), along the
    images: (M, ...)."""
    return torch.cat(gather_objects(counts.cpu(), ranks))


def mean_across_ranks(value: float, ranks: Ranks, *, weight: float = 1.0) -> float:
    """The mean of every rank's ``value``, each counted ``weight`` times (e.g. its image count).

    Ranks whose weights are all 0 (nothing to average) give ``value`` back unchanged.
    """
    pairs = gather_objects((value, weight), ranks)
    total = sum(weight for _, weight in pairs)
    if total == 0:
        return value
    return float(sum(value * weight for value, weight in pairs) / total)


@torch.no_grad()
def average_buffers(module: nn.Module, ranks: Ranks) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, in place.

    DistributedDataParallel keeps parameters identical on every rank, but each rank's BatchNorm
    running statistics follow its own share of the data. Averaging them after each epoch gives
    every rank, and the checkpoint rank 0 writes, the same model and statistics of all the data.
    """
    if not ranks.distributed:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(ranks.world_size)


def distributed_data_parallel(
    model: nn.Module, *, device: torch.device, find_unused_parameters: bool = False
) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel: gradients averaged over ranks at every step.

    Buffers are synchronised once, at the start, not at every forward pass: each rank's
    BatchNorm statistics then follow its own data until `average_buffers` joins them.
    """
    from torch.nn.parallel import DistributedDataParallel

    # Newer torch calls the per-step broadcast `forward_sync_buffers` (`broadcast_buffers` before).
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        **({"forward_sync_buffers": False} if new_name else {"broadcast_buffers": False}),
    )


def sync_batchnorm(model: nn.Module, *, device: torch.device, ranks: Ranks) -> nn.Module:
    """Turn BatchNorm layers into SyncBatchNorm, whose batch statistics span every rank.

    It pays when each rank's batch is small. One process: the model is returned unchanged.
    """
    if not ranks.distributed:
        return model
    if device.type == "cpu":
        raise MedsegError(
            "train.sync_bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPUs; drop "
            "--sync-bn (medseg averages BatchNorm statistics across ranks after every epoch)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@functools.cache
def _compile_errors() -> tuple[type[Exception], ...]:
    """What compiling raises, as opposed to what the module itself raises (out of memory).

    TorchRuntimeError can be either: `CompiledOrEager.forward` tells them apart. A backend's
    failures (inductor's C++ and Triton errors included) arrive wrapped in BackendCompilerFailed;
    the inductor errors are listed too in case a torch version lets them through unwrapped.
    Imported here, not with this module: importing torch._dynamo takes a second.
    """
    import torch._dynamo.exc as dynamo
    import torch._inductor.exc as inductor

    return (
        dynamo.BackendCompilerFailed,
        dynamo.Unsupported,
        dynamo.InternalTorchDynamoError,
        dynamo.TorchRuntimeError,
        inductor.InvalidCxxCompiler,
        inductor.CppCompileError,
        inductor.OperatorIssue,
        inductor.TritonMissing,
        inductor.GPUTooOldForTriton,
    )


class CompiledOrEager(nn.Module):
    """``torch.compile(module)`` that falls back to ``module`` itself when compiling fails.

    Compiling happens at the first call (and again for new input shapes), so that is where a
    missing C++ compiler or an unsupported operation shows up: it is reported in one line on
    stderr and every later call runs the module uncompiled. Errors of the module itself (out of
    memory, wrong shapes) propagate unchanged and leave compilation on. The wrapper owns no
    parameters of its own; save ``module``'s state dict, not the wrapper's.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        backend: str | Callable = "inductor",
        options: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.module = module
        compiled = torch.compile(module, backend=backend, options=options)
        # Not a registered submodule: it shares module's parameters, which must appear once.
        object.__setattr__(self, "_compiled", compiled)
        self.failed = False

    def forward(self, *args, **kwargs):
        if self.failed:
            return self.module(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except _compile_errors() as error:
            failure = error
        # Tracing runs the module on fake tensors, so the module's own errors (a shape mismatch)
        # also arrive as TorchRuntimeError. Run eagerly, outside the handler, the module raises
        # its error as it is, and compilation stays on; if it runs, the compiler was at fault.
        output = self.module(*args, **kwargs)
        self._give_up(failure)
        return output

    def _give_up(self, error: Exception) -> None:
        """Switch compilation off for good and say why in one line on stderr."""
        self.failed = True
        cause = error  # the compiler's own complaint, under torch's wrappers
        while (inner := getattr(cause, "inner_exception", cause.__cause__)) is not None:
            cause = inner
        reason = f"{type(cause).__name__}: {cause}".strip().splitlines()[0][:200]
        print(
            f"medseg: warning: torch.compile failed ({reason}); continuing uncompiled",
            file=sys.stderr,
        )
