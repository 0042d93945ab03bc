"""Contrastive self-supervision for the ViT: SimCLR (Chen et al., 2020) and MoCo v3 (Chen, Xie and He, 2021).

Both follow the method protocol: ``backbone`` attribute, ``training_step(batch) -> (loss, logs)``
with ``batch = ([view1, view2], labels)`` (``augment.TwoViews``), and for MoCo v3
``on_step_end(step, max_steps)`` for the momentum encoder. ``forward`` is ``training_step``.

The backbone's pooled feature is ``backbone.forward_head(backbone.forward_features(x),
pre_logits=True)``: the class token (or the patch mean for ``global_pool="avg"``), (B, D).

Defaults are the papers'; what small images (28x28 Fashion-MNIST, a 5M-parameter ViT, batch
256 on a CPU) change is summed up here:
- SimCLR: ``hidden_dim=2048``, ``proj_dim=128``, ``temperature=0.1`` (the paper's ImageNet
  values, tuned for batch 4096). For small images and batches a hidden width of 512 costs less,
  and tau = 0.2-0.5 suits batches of a few hundred (SimCLR's CIFAR-10 runs used tau = 0.5).
- MoCo v3: ``proj_dim=256``, ``hidden_dim=4096``, ``temperature=0.2``, ``momentum=0.99`` (the
  ViT recipe, batch 4096). For small images ``hidden_dim=1024`` is enough; keep 0.99 (a run of
  a few thousand steps needs a key encoder that follows the query encoder quickly) and
  ``freeze_patch_embed=True`` if the loss spikes, the instability MoCo v3 traced to the patch
  projection.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import info_nce, moco_infonce
from .schedules import cosine_momentum
from .vit import ViT

__all__ = ["SimCLR", "MoCoV3", "mlp_head"]


# --------------------------------------------------------------------------- shared pieces
def mlp_head(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True,
             bias: bool = False) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: num_layers x (Linear, BN, ReLU), the last without ReLU.

    The last layer gets an affine-free BatchNorm if ``last_bn`` (SimCLR v2's design, MoCo v3
    removed its gamma). (B, in_dim) -> (B, out_dim).
    """
    for name, v in (("num_layers", num_layers), ("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive int")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def _check_backbone(backbone) -> None:
    if not isinstance(backbone, ViT):
        raise TypeError(f"backbone must be a vitssl_core.ViT, got {type(backbone).__name__}")


def _check_positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name}={v!r} must be a positive int")


def _two_views(batch) -> tuple[Tensor, Tensor]:
    """([x1, x2], labels) or [x1, x2] -> (x1, x2), each (B, C, H, W) with the same shape."""
    views = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 and \
        isinstance(batch[0], (tuple, list)) else batch
    if not isinstance(views, (tuple, list)) or len(views) != 2 or not all(isinstance(v, Tensor) for v in views):
        raise ValueError("batch must be ([view1, view2], labels) with two (B, C, H, W) tensors, as "
                         "augment.TwoViews yields; got " + type(batch).__name__)
    x1, x2 = views
    if x1.shape != x2.shape or x1.ndim != 4:
        raise ValueError(f"the two views must be (B, C, H, W) tensors of one shape, got {tuple(x1.shape)} "
                         f"and {tuple(x2.shape)}")
    if x1.shape[0] < 2:
        raise ValueError(f"batch size {x1.shape[0]} < 2: a contrastive loss needs negatives (and BatchNorm "
                         f"needs more than one sample)")
    return x1, x2


def _features(backbone: ViT, x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, D) pooled, normed features."""
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)


# --------------------------------------------------------------------------- SimCLR
class SimCLR(nn.Module):
    """SimCLR: backbone -> MLP projection (Linear-BN-ReLU-Linear) -> NT-Xent between two views.

    ``training_step(([x1, x2], labels))`` with x (B, C, H, W) returns the symmetric ``info_nce``
    over the 2B projections and logs ``loss``, ``pos_cos`` (mean cosine of the two views of an
    image) and ``neg_cos`` (mean cosine between different images).
    """

    def __init__(self, backbone: ViT, proj_dim: int = 128, hidden_dim: int = 2048, temperature: float = 0.1):
        super().__init__()
        _check_backbone(backbone)
        _check_positive_int("proj_dim", proj_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be a float > 0")
        self.backbone = backbone
        # SimCLR v1: 2-layer head; BN after the hidden layer, none on the output.
        self.projector = nn.Sequential(
            nn.Linear(backbone.embed_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, proj_dim),
        )
        self.temperature = float(temperature)

    def project(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, proj_dim) projections (not normalised)."""
        return self.projector(_features(self.backbone, x))

    def training_step(self, batch) -> tuple[Tensor, dict[str, float]]:
        x1, x2 = _two_views(batch)
        B = x1.shape[0]
        # One pass over the 2B views: BN statistics mix both views, as in SimCLR's code.
        z = self.project(torch.cat([x1, x2]))  # (2B, proj_dim)
        z1, z2 = z[:B], z[B:]
        loss = info_nce(z1, z2, self.temperature)
        with torch.no_grad():
            n1, n2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
            pos = (n1 * n2).sum(1).mean()
            sims = n1 @ n2.T  # (B, B): off-diagonal = different images
            neg = (sims.sum() - sims.diagonal().sum()) / (B * (B - 1))
        return loss, {"loss": float(loss.detach()), "pos_cos": float(pos), "neg_cos": float(neg)}

    def forward(self, batch) -> tuple[Tensor, dict[str, float]]:
        return self.training_step(batch)


# --------------------------------------------------------------------------- MoCo v3
class MoCoV3(nn.Module):
    """MoCo v3: a query encoder (backbone, projector, predictor) against a momentum key encoder.

    Loss ctr(q1, k2) + ctr(q2, k1), each ``moco_infonce`` (scaled by 2 tau). The momentum
    encoder (``momentum_backbone``, ``momentum_projector``) is a frozen copy (requires_grad False,
    so never in the optimizer) updated in ``on_step_end`` by an EMA whose momentum follows
    ``cosine_momentum`` from ``momentum`` to 1. ``freeze_patch_embed``: MoCo v3's random patch
    projection, kept fixed for stability.
    """

    def __init__(self, backbone: ViT, proj_dim: int = 256, hidden_dim: int = 4096, temperature: float = 0.2,
                 momentum: float = 0.99, freeze_patch_embed: bool = False):
        super().__init__()
        _check_backbone(backbone)
        _check_positive_int("proj_dim", proj_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be a float > 0")
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum={momentum!r} must be in [0, 1]")
        self.backbone = backbone
        if freeze_patch_embed:
            for p in backbone.patch_embed.parameters():
                p.requires_grad = False
        self.projector = mlp_head(3, backbone.embed_dim, hidden_dim, proj_dim)  # MoCo v3's ViT projector
        self.predictor = mlp_head(2, proj_dim, hidden_dim, proj_dim, last_bn=False)
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self._momentum_params():
            p.requires_grad = False
        self.temperature = float(temperature)
        self.base_momentum = float(momentum)
        self.momentum = float(momentum)  # the value used by the last on_step_end

    def _online_params(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    def _momentum_params(self) -> list[nn.Parameter]:
        return list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters())

    def training_step(self, batch) -> tuple[Tensor, dict[str, float]]:
        x1, x2 = _two_views(batch)
        # Each view on its own, as MoCo v3 does: BN statistics per view.
        q1 = self.predictor(self.projector(_features(self.backbone, x1)))  # (B, proj_dim)
        q2 = self.predictor(self.projector(_features(self.backbone, x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(_features(self.momentum_backbone, x1))  # (B, proj_dim), no grad
            k2 = self.momentum_projector(_features(self.momentum_backbone, x2))
        loss = moco_infonce(q1, k2, self.temperature) + moco_infonce(q2, k1, self.temperature)
        with torch.no_grad():
            pos = 0.5 * (F.cosine_similarity(q1.float(), k2.float()).mean()
                         + F.cosine_similarity(q2.float(), k1.float()).mean())
        return loss, {"loss": float(loss.detach()), "pos_cos": float(pos), "momentum": self.momentum}

    def forward(self, batch) -> tuple[Tensor, dict[str, float]]:
        return self.training_step(batch)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA of the online encoder into the momentum encoder with m = cosine_momentum(momentum, step, max_steps)."""
        m = cosine_momentum(self.base_momentum, step, max_steps)
        for online, target in zip(self._online_params(), self._momentum_params()):
            target.mul_(m).add_(online.detach(), alpha=1.0 - m)  # target = m target + (1 - m) online
        self.momentum = m
