"""The package's argument checks, written once: each raises a ValueError or TypeError that names
the argument, the value received and what is allowed, e.g. ``ValueError("k=0 must be a positive int")``.

The modules call them as ``validate.positive_int("k", k)`` at their public boundaries. A bool is
never a number here (``True`` would pass for 1), and a number must be finite where a rate or a
scale is meant (``inf`` passes ``> 0`` and then trains one step at an infinite learning rate).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "positive_int",
    "positive_number",
    "non_negative_number",
    "fraction",
    "feature_matrix",
    "label_vector",
    "normalize_stats",
    "class_count",
]


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def positive_int(name: str, value) -> None:
    """``value`` is an int > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")


def positive_number(name: str, value) -> None:
    """``value`` is a finite int or float > 0."""
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


def non_negative_number(name: str, value, zero_means: str = "") -> None:
    """``value`` is a finite int or float >= 0; ``zero_means`` says what 0 does, for the message."""
    if not _is_number(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0{f' ({zero_means})' if zero_means else ''}")


def fraction(name: str, value, closed: bool = False) -> None:
    """``value`` is a number in [0, 1), or in [0, 1] with ``closed=True``."""
    if not _is_number(value) or not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ValueError(f"{name}={value!r} must be a number in [0, {'1]' if closed else '1)'}")


def feature_matrix(name: str, x) -> None:
    """``x`` is a float tensor (N, F)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a float tensor of shape (N, F), got {type(x).__name__}")
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape (N, F), got {x.dtype} {tuple(x.shape)}")


def label_vector(name: str, labels, n: int, rows_of: str) -> Tensor:
    """``labels`` is an integer tensor (n,) of labels >= 0, one per row of ``rows_of``; returned as int64."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape (N,), got {type(labels).__name__}")
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"{name} must be an integer tensor of shape (N,), got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries but {rows_of} has {n} rows; they must match")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} holds a negative label {int(labels.min())}; labels must be 0..num_classes-1")
    return labels.long()


def normalize_stats(normalize) -> None:
    """``normalize`` is None or ``{"mean": ..., "std": ...}``: numbers or lists of numbers, finite, std > 0.

    A std of 0 or NaN would turn every image into inf or NaN, and every score into chance.
    """
    if normalize is None:
        return
    if not isinstance(normalize, dict) or set(normalize) != {"mean", "std"}:
        raise ValueError(f"normalize={normalize!r} must be None or a dict with keys 'mean' and 'std'")
    for key in ("mean", "std"):
        try:
            values = torch.as_tensor(normalize[key], dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"normalize[{key!r}]={normalize[key]!r} must be a number or a list of numbers") from None
        if values.numel() == 0 or not torch.isfinite(values).all() or (key == "std" and (values <= 0).any()):
            allowed = "finite numbers > 0" if key == "std" else "finite numbers"
            raise ValueError(f"normalize[{key!r}]={normalize[key]!r} must be one or more {allowed}")


def class_count(labels: Tensor, num_classes) -> int:
    """``num_classes`` if given (a positive int that covers every label), else the largest label + 1."""
    top = int(labels.max()) + 1 if len(labels) else 0
    if num_classes is None:
        return top
    positive_int("num_classes", num_classes)
    if top > num_classes:
        raise ValueError(f"num_classes={num_classes} but the labels go up to {top - 1}")
    return num_classes
