"""Paired comparisons of two classifiers scored on the same test images.

Two models tested on the same images are not independent samples: most images both get right
or both get wrong. McNemar's exact test (McNemar, 1947) counts only the images on which they
disagree. A card stores its per-image correctness as a hex string (``correct_to_hex``), so two
shipped backbones can be compared without re-running either.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["correct_to_hex", "correct_from_hex", "mcnemar"]


def correct_to_hex(correct: Tensor) -> str:
    """Per-image correctness (M,) bool -> a hex string of its bits (M / 4 characters): fits in a JSON card."""
    bits = correct.bool().cpu().flatten()
    padded = torch.cat([bits, bits.new_zeros(-len(bits) % 8)]).view(-1, 8)
    values = (padded.long() << torch.arange(7, -1, -1)).sum(1)  # (M/8,) bytes, first image in the top bit
    return bytes(values.tolist()).hex()


def correct_from_hex(text: str, n: int) -> Tensor:
    """Inverse of ``correct_to_hex``: the first ``n`` bits as a bool tensor (n,)."""
    try:
        raw = torch.tensor(list(bytes.fromhex(text)), dtype=torch.long)
    except (TypeError, ValueError) as err:
        raise ValueError(f"text is not the hex string correct_to_hex writes ({err})") from None
    if not 0 <= n <= 8 * len(raw):
        raise ValueError(f"n={n} does not fit the {8 * len(raw)} bits of text")
    return ((raw[:, None] >> torch.arange(7, -1, -1)) & 1).flatten()[:n].bool()


def mcnemar(correct_a: Tensor, correct_b: Tensor) -> dict[str, float]:
    """McNemar's exact test of two classifiers scored on the same test images.

    ``correct_a``, ``correct_b``: bool (M,), per image. Only the discordant images count: ``a_only``
    (A right, B wrong) and ``b_only``; under "A and B are equally good" each discordant image is
    a fair coin. Returns {"a_only", "b_only", "difference" (points, A - B), "p_value" (two-sided)}.
    """
    for name, c in (("correct_a", correct_a), ("correct_b", correct_b)):
        if not isinstance(c, Tensor) or c.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-D tensor of per-image correctness, got {tuple(getattr(c, 'shape', ()))}"
            )
    if correct_a.shape != correct_b.shape or len(correct_a) == 0:
        raise ValueError(
            f"correct_a {tuple(correct_a.shape)} and correct_b {tuple(correct_b.shape)} must score "
            "the same, non-empty test set"
        )
    a, b = correct_a.bool().cpu(), correct_b.bool().cpu()
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    # P(X <= k) for X ~ Binomial(n, 1/2), in log space (n can be thousands), doubled for two sides.
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)
    ]
    top = max(log_terms)
    p = min(1.0, 2 * math.exp(top) * sum(math.exp(t - top) for t in log_terms)) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "difference": 100.0 * (a_only - b_only) / len(a), "p_value": p}
