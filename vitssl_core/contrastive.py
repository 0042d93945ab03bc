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
  a few thousand steps needs a key encoder that follows the query encoder quickly). MoCo v3's
  ViT set-up (fixed sin-cos positions, its xavier initialisation, a frozen random patch
  projection against the loss spikes it traced to that layer) is the default for a fresh
  backbone; the deviations we keep are listed in ``MoCoV3``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validate
from .losses import info_nce, moco_infonce
from .optim import MomentumLog, ema_update_, upgrade_momentum_log
from .schedules import cosine_momentum
from .vit import ViT

__all__ = ["SimCLR", "MoCoV3", "mlp_head"]


# --------------------------------------------------------------------------- shared pieces
def mlp_head(
    num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True, bias: bool = False
) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: num_layers x (Linear, BN, ReLU), the last without ReLU.

    The last layer gets an affine-free BatchNorm if ``last_bn`` (SimCLR v2's design, MoCo v3
    removed its gamma). (B, in_dim) -> (B, out_dim).
    """
    for name, v in (("num_layers", num_layers), ("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
        validate.positive_int(name, v)
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


def _check_common(backbone, proj_dim, hidden_dim, temperature) -> None:
    """The arguments SimCLR and MoCo v3 share."""
    _check_backbone(backbone)
    validate.positive_int("proj_dim", proj_dim)
    validate.positive_int("hidden_dim", hidden_dim)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be a float > 0")


def _two_views(batch) -> tuple[Tensor, Tensor]:
    """([x1, x2], labels) or [x1, x2] -> (x1, x2), each (B, C, H, W) with the same shape."""
    views = (
        batch[0]
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], (tuple, list))
        else batch
    )
    if not isinstance(views, (tuple, list)) or len(views) != 2 or not all(isinstance(v, Tensor) for v in views):
        raise ValueError(
            "batch must be ([view1, view2], labels) with two (B, C, H, W) tensors, as "
            "augment.TwoViews yields; got " + type(batch).__name__
        )
    x1, x2 = views
    if x1.shape != x2.shape or x1.ndim != 4:
        raise ValueError(
            f"the two views must be (B, C, H, W) tensors of one shape, got {tuple(x1.shape)} and {tuple(x2.shape)}"
        )
    if x1.shape[0] < 2:
        raise ValueError(
            f"batch size {x1.shape[0]} < 2: a contrastive loss needs negatives (and BatchNorm "
            f"needs more than one sample)"
        )
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
        _check_common(backbone, proj_dim, hidden_dim, temperature)
        self.backbone = backbone
        # SimCLR v1: 2-layer head; BN after the hidden layer, none on the output.
        self.projector = nn.Sequential(
            nn.Linear(backbone.embed_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
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

    Loss ctr(q1, k2) + ctr(q2, k1), each ``moco_infonce`` (scaled by 2 tau). The projector is
    3 x (Linear, BN, ReLU) and the predictor 2 x, the last layer of each without ReLU and with an
    affine-free BatchNorm (``MoCo_ViT`` in ``moco/builder.py``; the ResNet predictor has no final
    BN). The momentum encoder (``momentum_backbone``, ``momentum_projector``) is a frozen copy
    (requires_grad False, so never in the optimizer) updated in ``on_step_end`` by an EMA whose
    momentum follows ``cosine_momentum`` from ``momentum`` to 1 (``--moco-m-cos``).

    With ``init_backbone=True`` (the default, for pre-training from scratch) the backbone is set
    up as MoCo v3's ``VisionTransformerMoCo`` (``vits.py``) sets up its own:

    - ``pos_embed`` becomes a fixed 2-D sin-cos table (not trained);
    - every Linear is xavier-uniform with zero bias, the fused ``qkv`` with the bound of one
      (D, D) projection, sqrt(6 / 2D) (``ViT.init_xavier(split_qkv=True)``); LayerNorms are 1, 0;
    - ``cls_token`` is normal with std 1e-6;
    - the patch projection is uniform in +-sqrt(6 / (C P P + D)) with zero bias (xavier for the
      convolution as the linear map it is).

    ``freeze_patch_embed`` (by default equal to ``init_backbone``) then keeps that random patch
    projection fixed (``--stop-grad-conv1``, part of every MoCo v3 ViT recipe): MoCo v3 traced the
    loss spikes of ViT training to sudden changes of the patch projection's gradient. Pass
    ``init_backbone=False`` to keep a given backbone exactly as it is (weights, positions and
    which parameters train), e.g. to continue pre-training.

    Deviations from facebookresearch/moco-v3 that we keep:

    - The sin-cos table is MAE's (``sincos_pos_embed_2d``): channels (sin col, cos col, sin row,
      cos row), where MoCo v3's are (sin row, cos row, sin col, cos col), same frequencies. The
      two tables differ by a fixed permutation of the D channels, and every initialisation here
      treats channels alike, so training is the same in distribution (cosmetic). One table keeps
      ``ViT.set_img_size`` and the checkpoint cards simple.
    - The patch-projection bound uses the backbone's ``in_chans``; ``vits.py`` writes 3 (RGB).
      For C = 3 the two agree; for grey images ours is xavier's bound, MoCo v3's would be narrower.
    - Weight decay follows the trainer's rule for every method (``optim.param_groups``): no
      decay on biases, 1-D parameters (LayerNorm, BatchNorm) and ``cls_token``. MoCo v3 decays
      every parameter (AdamW over ``model.parameters()``); the exempt ones are a small share
      (biases and norm scales), and one rule keeps the methods comparable.
    - EMA timing: ``on_step_end(t, T)`` updates the momentum encoder right after optimizer step
      t with m(t / T). MoCo v3 makes the same update (with the same online weights) at the start
      of the next iteration with m((t + 1) / T), so our m lags by one step, a difference of at
      most (1 - momentum) pi / (2T) (cosmetic).
    - SyncBatchNorm: ``train()`` converts the BatchNorms under DDP on GPUs only; on CPUs (gloo)
      torch cannot sync them and each process normalises its own batch (``runtime.sync_batchnorm``).
    - The recipe lives in ``configs/results/mocov3.yaml``: MoCo v3's weight decay 0.1, no
      gradient clipping, a warm-up of 13 % of the run; the heads (``hidden_dim``), batch, epochs
      and learning rate are sized for Fashion-MNIST on a CPU.
    """

    def __init__(
        self,
        backbone: ViT,
        proj_dim: int = 256,
        hidden_dim: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.99,
        freeze_patch_embed: bool | None = None,
        init_backbone: bool = True,
    ):
        super().__init__()
        _check_common(backbone, proj_dim, hidden_dim, temperature)
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum={momentum!r} must be in [0, 1]")
        if not isinstance(init_backbone, bool):
            raise ValueError(f"init_backbone={init_backbone!r} must be True or False")
        if freeze_patch_embed is not None and not isinstance(freeze_patch_embed, bool):
            raise ValueError(
                f"freeze_patch_embed={freeze_patch_embed!r} must be True, False or None "
                f"(None: the same as init_backbone)"
            )
        self.backbone = backbone
        if init_backbone:
            _init_moco_vit(backbone)
        if init_backbone if freeze_patch_embed is None else freeze_patch_embed:
            backbone.patch_embed.proj.weight.requires_grad_(False)
            backbone.patch_embed.proj.bias.requires_grad_(False)
        self.projector = mlp_head(3, backbone.embed_dim, hidden_dim, proj_dim)  # MoCo v3's ViT projector
        self.predictor = mlp_head(2, proj_dim, hidden_dim, proj_dim)  # the ViT predictor ends in BN too
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self._momentum_params():
            p.requires_grad = False
        self.temperature = float(temperature)
        self.base_momentum = float(momentum)
        # The momentum of the last EMA update, for the logs: a buffer, so a resumed run logs what
        # an uninterrupted one does. A checkpoint written before it existed loads with the base value.
        self.momentum_log = MomentumLog(momentum)
        self.register_load_state_dict_pre_hook(upgrade_momentum_log)

    @property
    def momentum(self) -> float:
        """The momentum of the last ``on_step_end`` (``momentum`` before the first); survives a resume."""
        return self.momentum_log.value

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
            pos = 0.5 * (
                F.cosine_similarity(q1.float(), k2.float()).mean() + F.cosine_similarity(q2.float(), k1.float()).mean()
            )
        return loss, {"loss": float(loss.detach()), "pos_cos": float(pos), "momentum": self.momentum}

    def forward(self, batch) -> tuple[Tensor, dict[str, float]]:
        return self.training_step(batch)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA of the online encoder into the momentum encoder with m = cosine_momentum(momentum, step, max_steps)."""
        m = cosine_momentum(self.base_momentum, step, max_steps)
        ema_update_(self._momentum_params(), self._online_params(), m)  # target = m target + (1 - m) online
        self.momentum_log.set(m)


@torch.no_grad()
def _init_moco_vit(backbone: ViT) -> None:
    """MoCo v3's ViT set-up (``VisionTransformerMoCo.__init__``): sin-cos positions, xavier, tiny cls token."""
    backbone.fix_sincos_pos_embed()
    backbone.init_xavier(split_qkv=True)
    for m in backbone.modules():  # timm's LayerNorm init, which VisionTransformerMoCo inherits
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(backbone.cls_token, std=1e-6)
    proj = backbone.patch_embed.proj  # weight (D, C, P, P): fan_in C*P*P, fan_out D
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
