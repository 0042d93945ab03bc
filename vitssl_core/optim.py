"""What every optimisation loop of the package shares: the weight-decay rule, gradient clipping,
the exponential moving average (EMA), and the one loop that trains probes and heads.

- ``decays`` / ``param_groups``: which parameters AdamW decays (timm's and MAE's rule), used by
  the trainer, the linear probe, fine-tuning (``probes.layer_decay_param_groups``) and the dense heads;
- ``clip_grad_per_param_``: DINO's per-parameter gradient clipping;
- ``ema_update_`` and ``MomentumLog``: the EMA of MoCo v3's momentum encoder and DINO's teacher
  and centre, and the exact record of its last momentum;
- ``fit``: epochs of (set the learning rate from a per-step schedule, forward, backward, step)
  with one finiteness check, for the linear probe, fine-tuning and the dense heads. The
  pre-training loop (``train``) adds checkpoints, accumulation and processes around the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import validate

__all__ = [
    "NO_DECAY_NAMES",
    "decays",
    "param_groups",
    "clip_grad_per_param_",
    "ema_update_",
    "MomentumLog",
    "upgrade_momentum_log",
    "fit",
]

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")  # any parameter whose name contains one


# --------------------------------------------------------------------------- weight decay
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


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups under ``decays``: decayed weights, then undecayed biases / 1-D params / tokens.

    The names returned by ``no_weight_decay()`` of the module or of its ``backbone`` are exempt
    too. Frozen parameters (``requires_grad=False``, e.g. an EMA teacher or a frozen backbone
    under a head) are left out. Each group lists its parameters' ``names`` and says whether it
    decays (``apply_wd``: the trainer's weight-decay schedule reads it).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be a number >= 0")
    skip: set[str] = set()
    for owner in (module, getattr(module, "backbone", None)):
        if owner is not None and callable(getattr(owner, "no_weight_decay", None)):
            skip |= set(owner.no_weight_decay())
    decay: tuple[list, list] = ([], [])
    no_decay: tuple[list, list] = ([], [])
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        group = decay if decays(name, p, skip) else no_decay
        group[0].append(name)
        group[1].append(p)
    if not decay[1] and not no_decay[1]:
        raise ValueError(f"the {type(module).__name__} has no trainable parameters (every requires_grad is False)")
    return [
        {"params": decay[1], "names": decay[0], "weight_decay": weight_decay, "apply_wd": True},
        {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0, "apply_wd": False},
    ]


# --------------------------------------------------------------------------- gradient clipping
def clip_grad_per_param_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip each parameter's gradient to L2 norm ``max_norm`` on its own (DINO's ``utils.clip_gradients``).

    g <- g * min(1, max_norm / (||g|| + 1e-6)) for every parameter with a gradient, where
    ``clip_grad_norm_`` scales all of them by one factor from their joint norm. Returns the joint
    norm before clipping (a 0-dim tensor), what ``clip_grad_norm_`` returns too.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2.0) for g in grads])  # (n,)
    for g, norm in zip(grads, norms):
        g.detach().mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))  # a factor of exactly 1 leaves g as it is
    return torch.linalg.vector_norm(norms, 2.0)


# --------------------------------------------------------------------------- the EMA
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


# --------------------------------------------------------------------------- the loop of probes and heads
def fit(
    optimizer: torch.optim.Optimizer,
    schedule: Tensor,
    epochs: int,
    batches: Callable[[], Iterable[Any]],
    loss_of: Callable[[Any], tuple[Tensor, int]],
    what: str = "training",
    progress: bool = False,
) -> list[list[tuple[float, int]]]:
    """Train for ``epochs`` passes; returns each epoch's ``[(loss, batch size)]``, one pair per step.

    Each pass iterates ``batches()`` (called once per epoch). Each step sets every parameter
    group's learning rate to ``schedule[step]`` times the group's ``lr_scale`` (1 if it has none,
    ``probes.layer_decay_param_groups`` sets it), computes ``loss, n = loss_of(batch)`` (the caller
    does the forward pass, under its own precision), then zeroes the gradients, back-propagates
    and steps. ``schedule`` holds one value per step (``schedules.cosine_schedule``). A loss that
    is not finite stops the loop before it reaches the weights: FloatingPointError names ``what``,
    the step and the epoch.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    validate.positive_int("epochs", epochs)
    if not callable(batches) or not callable(loss_of):
        raise TypeError("batches and loss_of must be callables: batches() -> batches, loss_of(batch) -> (loss, n)")
    history: list[list[tuple[float, int]]] = []
    step = 0
    bar = tqdm(total=len(schedule), disable=not progress, desc=what)
    for epoch in range(epochs):
        steps: list[tuple[float, int]] = []
        for batch in batches():
            if step >= len(schedule):
                raise ValueError(f"schedule has {len(schedule)} values but {what} takes more steps than that")
            lr = float(schedule[step])
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss, n = loss_of(batch)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{what}: the loss is {value} at step {step + 1} of {len(schedule)} (epoch {epoch + 1} of "
                    f"{epochs}); lower the learning rate, or check the inputs for NaN or inf"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps.append((value, n))
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{value:.3f}")
        history.append(steps)
    bar.close()
    return history
