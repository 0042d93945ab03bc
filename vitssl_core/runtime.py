"""Where and how code runs: processes, devices, precision, seeds. One rule for each, shared by every loop.

The trainer (``train``), the probes and fine-tuning (``probes``) and the CLI read these, so
"auto" means the same device and the same precision everywhere:

- ``setup_distributed`` / ``cleanup_distributed``: join and leave the process group that
  ``torchrun`` describes (a no-op in one process);
- ``resolve_device``: "auto" is the GPU ``LOCAL_RANK`` if CUDA is available, else the CPU;
- ``resolve_precision`` and ``autocast``: "auto" is bf16 autocast on a CUDA GPU that supports
  it and fp32 everywhere else, CPUs included (``benchmarks/precision_speed.py``: on a CPU bf16
  pays only for some shapes, even with native bf16); "bf16" is always honoured;
- ``to_device``: tensors inside any nesting of lists, tuples and dicts moved to a device;
- ``seed_everything``: Python's, NumPy's and torch's generators seeded at once;
- ``sync_batchnorm``: BatchNorm over the global batch under DDP on GPUs;
- ``hardware``: one line naming the GPU or the CPU, for the logs and the checkpoint cards.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
from pathlib import Path
from typing import Any, ContextManager, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import get_rank, get_world_size

__all__ = [
    "PRECISIONS",
    "DistInfo",
    "setup_distributed",
    "cleanup_distributed",
    "resolve_device",
    "resolve_precision",
    "autocast",
    "mps_available",
    "to_device",
    "seed_everything",
    "sync_batchnorm",
    "hardware",
]

PRECISIONS = ("auto", "bf16", "fp32")


# --------------------------------------------------------------------------- processes
class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def setup_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes in RANK / WORLD_SIZE / LOCAL_RANK.

    A no-op without those variables (one process) or when a group already exists. The backend is
    gloo for CPU tensors and NCCL for CUDA tensors; on a GPU machine each process takes the GPU
    ``LOCAL_RANK``.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(get_rank(), get_world_size(), local_rank)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0)
    if not dist.is_available():
        raise RuntimeError("RANK and WORLD_SIZE are set but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(get_rank(), get_world_size(), local_rank)


def cleanup_distributed() -> None:
    """Leave the process group, if there is one (call once, at the end of the program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sync_batchnorm(module: nn.Module, device: str | torch.device) -> nn.Module:
    """``module`` with every BatchNorm turned into a SyncBatchNorm when ``device`` is a GPU; unchanged on a CPU.

    Under DDP a plain BatchNorm normalises each process's batch on its own, and a contrastive
    head can then tell its own samples from the gathered ones by their statistics; MoCo v3 and
    DINO convert their whole model (``main_moco.py``, ``main_dino.py``) and SimCLR uses a global
    BN. The converted layers share their parameters and buffers with the old ones, so the state
    dict keys stay the same and an optimizer built before still holds the right tensors.
    torch's SyncBatchNorm synchronises only GPU tensors (its forward raises on a CPU in a process
    group, torch 2.14), so under gloo on CPUs each process keeps its own batch statistics.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if torch.device(device).type != "cuda":
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


# --------------------------------------------------------------------------- devices and precision
def mps_available() -> bool:
    """Whether this torch build and machine offer Apple's GPU (Metal Performance Shaders)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the GPU ``LOCAL_RANK`` if CUDA is available, else Apple's GPU (MPS), else the CPU;
    otherwise ``torch.device(device)``, checked to exist on this machine. Nothing has run on MPS yet
    (no Mac in our CI): the package keeps float64 off the device and trains in fp32 there."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"device={device!r} must be 'auto' or a torch device string such as 'cpu' or 'cuda:0'")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        found = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from err
    if found.type == "mps" and not mps_available():
        raise ValueError(f"device={device!r}: Apple's MPS is not available on this machine; use 'cpu' or 'auto'")
    if found.type == "cuda":  # fail here, not deep in the first .to(device)
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r}: CUDA is not available on this machine "
                f"({'a CPU-only torch build' if torch.version.cuda is None else 'no GPU found'}); "
                "use 'cpu' or 'auto'"
            )
        if found.index is not None and found.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    return found


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"bf16"`` or ``"fp32"``; ``"auto"`` is bf16 on a CUDA GPU that supports it, fp32 elsewhere (CPUs too).

    On a CPU bf16 is an explicit choice, so that "auto" never slows a run: even with native bf16
    (AVX512-BF16 or AMX) a ``vit_mini_28`` training step runs at 0.82-0.84x the speed of fp32, and
    without it bf16 is emulated and several times slower; it pays only for wide layers, many
    tokens or 64-wide heads (``benchmarks/precision_speed.py`` measures where).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    device = resolve_device(device)
    if device.type == "mps" and precision == "bf16":
        raise ValueError(
            "precision='bf16' is not supported on MPS (nothing has been tested there); use 'fp32' or 'auto'"
        )
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def autocast(device: str | torch.device, precision: str) -> ContextManager:
    """bf16 autocast on ``device`` when ``resolve_precision(precision, device)`` is "bf16", else nothing."""
    device = resolve_device(device)
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()  # no autocast object at all: not every device type has one (MPS)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(obj: Any, device: str | torch.device) -> Any:
    """``obj`` with every tensor (also inside lists, tuples and dicts) moved to ``device``; the rest unchanged."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def hardware(device: str | torch.device = "cpu") -> str:
    """One line naming what runs this process: the GPU, or the CPU model, its kernels and threads."""
    device = resolve_device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (GPU)"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return (
        f"{name} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} thread(s) "
        f"of {os.cpu_count()} cores"
    )


# --------------------------------------------------------------------------- seeds
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
