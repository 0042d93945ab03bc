"""Per-step schedules, precomputed as arrays (DINO's way): learning rate, weight decay, momentum.

A schedule is a float64 tensor with one value per optimisation step, so resuming at step k
reads ``schedule[k]`` and a plot of the schedule is a plot of the tensor. The rules that use
them (weight decay, the EMA, the loop of the probes) live in ``optim``.
"""

from __future__ import annotations

import math


import torch
from torch import Tensor

from . import validate

__all__ = ["cosine_schedule", "cosine_momentum"]


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> Tensor:
    """(total_steps,) values: linear warm-up warmup_start -> base, then cosine base -> final.

    Used for the learning rate (final ~ 0), weight decay (e.g. 0.04 -> 0.4) and EMA momentum
    (e.g. 0.996 -> 1.0).
    """
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps={total_steps!r} must be a positive int")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be an int in [0, total_steps={total_steps}]")
    warm = (
        torch.linspace(warmup_start, base, warmup_steps + 1, dtype=torch.float64)[:-1]
        if warmup_steps
        else torch.empty(0, dtype=torch.float64)
    )
    n = total_steps - warmup_steps
    t = torch.arange(n, dtype=torch.float64) / max(n, 1)
    cos = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t))
    return torch.cat([warm, cos])


def cosine_momentum(base: float, step: int, max_steps: int) -> float:
    """EMA momentum after ``step`` of ``max_steps``: m_t = 1 - (1 - base) (cos(pi t / T) + 1) / 2.

    base at t = 0, 1.0 at t = T (BYOL, MoCo v3, DINO).
    """
    validate.positive_int("max_steps", max_steps)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= max_steps:
        raise ValueError(f"step={step!r} must be an int in [0, max_steps={max_steps}]")
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max_steps) + 1.0) / 2.0
