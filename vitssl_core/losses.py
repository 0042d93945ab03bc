"""Contrastive and self-distillation losses: InfoNCE / NT-Xent (SimCLR), MoCo v3's InfoNCE, DINO's cross-entropy.

``info_nce`` is the NT-Xent loss of SimCLR (Chen et al., 2020), an instance of InfoNCE
(van den Oord et al., 2018). A batch of B images gives 2B views; each view is an anchor whose
positive is the other view of its image and whose negatives are the other 2B - 2 views:

    loss_i = -log( exp(s(z_i, z_i+) / tau) / sum_{k != i} exp(s(z_i, z_k) / tau) ),  s = cosine.

Why the symmetric form (both views are anchors, the default): the two views play the same role,
so averaging over both halves the variance of the estimate for free (every similarity is
already computed), and it is what SimCLR's reference code and the MoCo v3 paper use. The
article's formula (section 4.1.2) takes only the first views as anchors and *sums* over them;
``info_nce(..., symmetric=False, reduction="sum")`` (or ``info_nce_article``) reproduces it
exactly, which the tests check against the article's two-sample example worked by hand.

``moco_infonce`` is MoCo v3's ``contrastive_loss`` (Chen, Xie and He, 2021): queries against
the (gathered) keys of the momentum encoder, labels ``arange``, scaled by ``2 * tau``.

``dino_cross_entropy`` and ``sharpen`` are the pieces of DINO's loss (Caron et al., 2021):
the teacher's centred, sharpened distribution is the target of the student's softmax on every
other crop. The centre's state lives in ``vitssl_core.dino.DINO``.

All losses compute in float32, with autocast switched off, even when the inputs come from a
bf16 autocast region: a log-sum-exp over thousands of logits in bf16 loses the loss's
precision. In a process group, negatives and keys are gathered from every rank with
``all_gather_with_grad``; in one process the gather is the identity.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import all_gather_with_grad, get_rank

__all__ = ["info_nce", "info_nce_article", "moco_infonce", "sharpen", "dino_cross_entropy"]

_REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------- input checks
def _check_temperature(temperature: float, name: str = "temperature") -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name}={temperature!r} must be a float > 0")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{name}={temperature!r} must be a finite float > 0")


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, D), got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must have shape (B, D) with 2 dims, got {t.ndim} dims {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (B, D), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] < 2:
        raise ValueError(
            f"{name_a} has {a.shape[0]} sample(s); a contrastive loss needs at least 2 so that "
            f"every anchor has a negative"
        )


def _no_autocast(device: torch.device):
    """A context that switches autocast off on ``device``'s type, so the loss runs in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------- InfoNCE / NT-Xent
def info_nce(
    z1: Tensor, z2: Tensor, temperature: float = 0.1, reduction: str = "mean", symmetric: bool = True
) -> Tensor:
    """NT-Xent on two views: z1, z2 (B, D) -> scalar float32 loss.

    Cosine similarity; for each anchor the positive is its other view and the other 2B - 2
    views (gathered from every rank) are negatives, the anchor itself excluded. ``symmetric``:
    both views are anchors (2B terms) or only z1 (B terms, the article's formula).
    ``reduction``: "mean" over the anchors or "sum".
    """
    _check_pair(z1, z2, "z1", "z2")
    _check_temperature(temperature)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {_REDUCTIONS}")
    B = z1.shape[0]
    with _no_autocast(z1.device):
        z1 = F.normalize(z1.float(), dim=1)  # (B, D), unit rows: dot product = cosine
        z2 = F.normalize(z2.float(), dim=1)
        keys = torch.cat([all_gather_with_grad(z1), all_gather_with_grad(z2)])  # (2M, D), M = world * B
        M = keys.shape[0] // 2
        idx = torch.arange(B, device=z1.device) + get_rank() * B  # this rank's rows among the M gathered
        if symmetric:
            anchors = torch.cat([z1, z2])  # (2B, D)
            self_idx, pos_idx = torch.cat([idx, idx + M]), torch.cat([idx + M, idx])
        else:
            anchors, self_idx, pos_idx = z1, idx, idx + M  # (B, D)
        logits = anchors @ keys.T / temperature  # (A, 2M)
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(len(anchors), device=z1.device), self_idx] = True
        logits = logits.masked_fill(is_self, float("-inf"))  # exp(-inf) = 0: the anchor is not its own negative
        return F.cross_entropy(logits, pos_idx, reduction=reduction)  # log-sum-exp: stable at small tau


def info_nce_article(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """The article's InfoNCE (section 4.1): first views as anchors, summed. z1, z2 (B, D) -> scalar."""
    return info_nce(z1, z2, temperature, reduction="sum", symmetric=False)


def moco_infonce(q: Tensor, k: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo v3's contrastive loss: q (B, D) queries, k (B, D) keys -> scalar float32.

    Cross-entropy of q k^T / tau over the keys gathered from every rank, the positive of query
    i being key i of this rank; multiplied by 2 tau, as in MoCo v3, which makes the gradient
    scale independent of tau. Keys usually come from the momentum encoder and carry no gradient.
    """
    _check_pair(q, k, "q", "k")
    _check_temperature(temperature)
    B = q.shape[0]
    with _no_autocast(q.device):
        q = F.normalize(q.float(), dim=1)  # (B, D)
        k = all_gather_with_grad(F.normalize(k.float(), dim=1))  # (world * B, D)
        logits = q @ k.T / temperature  # (B, world * B)
        labels = torch.arange(B, device=q.device) + get_rank() * B
        return F.cross_entropy(logits, labels) * (2 * temperature)


# --------------------------------------------------------------------------- DINO
def sharpen(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """DINO's teacher target: softmax((logits - center) / temperature), (B, K) -> (B, K) float32, no grad."""
    if not isinstance(teacher_logits, Tensor) or teacher_logits.ndim != 2:
        raise ValueError(
            f"teacher_logits must be a (B, K) tensor, got "
            f"{tuple(teacher_logits.shape) if isinstance(teacher_logits, Tensor) else teacher_logits!r}"
        )
    if not isinstance(center, Tensor) or center.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"center must be a tensor of shape (1, K={teacher_logits.shape[-1]}), got "
            f"{tuple(center.shape) if isinstance(center, Tensor) else center!r}"
        )
    _check_temperature(temperature)
    with torch.no_grad(), _no_autocast(teacher_logits.device):
        return F.softmax((teacher_logits.float() - center.float()) / temperature, dim=-1)


def dino_cross_entropy(
    student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor], student_temp: float = 0.1
) -> Tensor:
    """DINO's loss: mean over pairs (teacher view i, student view v != i) of CE(p_t_i, softmax(s_v / T_s)).

    ``student_logits``: V tensors (B, K), global crops first; ``teacher_probs``: G <= V tensors
    (B, K), the teacher's targets for the first G (global) crops. A crop is never its own target.
    Returns a float32 scalar; every pair is averaged over its B samples.
    """
    if not isinstance(student_logits, (list, tuple)) or not isinstance(teacher_probs, (list, tuple)):
        raise TypeError("student_logits and teacher_probs must be lists of (B, K) tensors")
    V, G = len(student_logits), len(teacher_probs)
    if G < 1 or V < 2 or G > V:
        raise ValueError(f"need 1 <= len(teacher_probs)={G} <= len(student_logits)={V} and at least 2 student views")
    shape = teacher_probs[0].shape
    if len(shape) != 2:
        raise ValueError(f"teacher_probs[0] must have shape (B, K), got {tuple(shape)}")
    for name, seq in (("student_logits", student_logits), ("teacher_probs", teacher_probs)):
        for i, t in enumerate(seq):
            if t.shape != shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; every view must be {tuple(shape)}")
    _check_temperature(student_temp, "student_temp")
    with _no_autocast(student_logits[0].device):
        log_q = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]  # V x (B, K)
        total, n_terms = 0.0, 0
        for i, p in enumerate(teacher_probs):
            p = p.float().detach()
            for v, lq in enumerate(log_q):
                if v == i:
                    continue  # same crop seen by teacher and student: no task
                total = total + (-p * lq).sum(dim=-1).mean()
                n_terms += 1
        return total / n_terms
