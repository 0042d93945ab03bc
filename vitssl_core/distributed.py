"""Collectives that are no-ops in one process, so every method runs unchanged on one CPU.

Under ``torchrun`` (DDP, gloo on CPU, nccl on GPU) they call ``torch.distributed``; with no
process group they return their input. Nothing here ever calls a collective without checking
that a group exists (DINO's reference code does, and fails on a single CPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "all_gather_with_grad",
    "all_reduce_mean",
    "all_reduce_sum",
]


def is_distributed() -> bool:
    """True when a process group is up and has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice, summed over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every slice
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """(B, ...) per rank -> (world*B, ...) in rank order, differentiable; identity in one process.

    Every rank must pass the same B.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of x over ranks (a new tensor, no gradient); x itself in one process."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of x over ranks (a new tensor, no gradient); x itself in one process."""
    if not is_distributed():
        return x
    return all_reduce_sum(x) / get_world_size()
