"""Per-step schedules, precomputed as arrays (DINO's way): learning rate, weight decay, momentum.

A schedule is a float64 tensor with one value per optimisation step, so resuming at step k
reads ``schedule[k]`` and a plot of the schedule is a plot of the tensor.

The two rules every optimisation loop of the package shares live here too:

- ``decays(name, param)``: which parameters get weight decay (the trainer's ``param_groups``,
  fine-tuning's ``layer_decay_param_groups``);
- ``ema_update_(targets, sources, m)``: an exponential moving average, targets <- m targets +
  (1 - m) sources (MoCo v3's momentum encoder, DINO's teacher and centre).
"""

from __future__ import annotations

import math

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "cosine_schedule",
    "cosine_momentum",
    "ema_update_",
    "decays",
    "NO_DECAY_NAMES",
    "MomentumLog",
    "upgrade_momentum_log",
]

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")  # any parameter whose name contains one


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
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0:
        raise ValueError(f"max_steps={max_steps!r} must be a positive int")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= max_steps:
        raise ValueError(f"step={step!r} must be an int in [0, max_steps={max_steps}]")
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max_steps) + 1.0) / 2.0


class MomentumLog(nn.Module):
    """The momentum of the last EMA update, kept exactly (a float64's bits in an int64 buffer).

    A buffer, so a resumed run logs what an uninterrupted one does; int64, not float64, because
    Apple's MPS has no float64 and the buffer travels with the model. The owning method registers
    ``upgrade_momentum_log`` so that its older checkpoints load too.
    """

    def __init__(self, momentum: float):
        super().__init__()
        self.register_buffer("bits", self.encode(momentum))

    @staticmethod
    def encode(value: float) -> Tensor:
        """A 0-dim int64 tensor holding the bits of ``value`` as a float64 (made on the CPU)."""
        return torch.tensor(float(value), dtype=torch.float64).view(torch.int64)

    @property
    def value(self) -> float:
        return float(self.bits.detach().cpu().view(torch.float64))

    def set(self, value: float) -> None:
        self.bits.copy_(self.encode(value))


def upgrade_momentum_log(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of a method with a ``momentum_log``: a checkpoint with the older float64
    ``last_momentum`` buffer is converted; one from before either existed keeps the module's value."""
    key = prefix + "momentum_log.bits"
    old = state_dict.pop(prefix + "last_momentum", None)
    if old is not None:
        state_dict[key] = MomentumLog.encode(float(old))
    state_dict.setdefault(key, module.momentum_log.bits.detach().clone())


@torch.no_grad()
def ema_update_(targets: Iterable[Tensor], sources: Iterable[Tensor], momentum: float) -> None:
    """In place, for each pair: target <- m target + (1 - m) source, with m = ``momentum`` (no gradient).

    ``targets`` and ``sources`` are matching sequences of tensors of equal shapes (e.g. the
    parameters of a momentum encoder and of the online encoder, in the same order).
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum!r} must be a number in [0, 1]")
    targets, sources = list(targets), list(sources)
    if len(targets) != len(sources):
        raise ValueError(f"{len(targets)} targets but {len(sources)} sources; they must pair up")
    for target, source in zip(targets, sources):
        if target.shape != source.shape:
            raise ValueError(
                f"an EMA target of shape {tuple(target.shape)} is paired with a source of shape {tuple(source.shape)}"
            )
        target.mul_(momentum).add_(source.detach(), alpha=1.0 - momentum)


def decays(name: str, param: Tensor, exempt: Iterable[str] = ()) -> bool:
    """Whether AdamW should decay the parameter ``name``: the package's one weight-decay rule.

    No decay (timm's and MAE's rule) for biases, parameters with one dimension (norms,
    LayerScale), names containing ``pos_embed``, ``cls_token`` or ``mask_token``, and names in
    ``exempt`` (a model's ``no_weight_decay()``; matched as the whole name or its last parts).
    """
    if not isinstance(name, str) or not isinstance(param, Tensor):
        raise TypeError(
            f"decays(name, param) takes a str and a Tensor, got {type(name).__name__} and {type(param).__name__}"
        )
    return not (
        param.ndim <= 1
        or name.endswith("bias")
        or any(t in name for t in NO_DECAY_NAMES)
        or any(name == s or name.endswith("." + s) for s in exempt)
    )
