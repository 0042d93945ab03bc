"""Supervised training of a ViT from scratch: the baseline every self-supervised method must beat.

The original ViT (Dosovitskiy et al., 2021) and DeiT (Touvron et al., 2021) train the backbone
with labels: pool the tokens (class token or mean of patches), one linear layer to the classes,
cross-entropy, optionally with label smoothing (Szegedy et al., 2016). On small data sets a ViT
trained this way overfits and lags a CNN; that gap is what self-supervised pre-training closes.

The module follows the method protocol of ``vitssl_core.train``: it has a ``backbone`` and a
``training_step(batch) -> (loss, logs)``, so the same trainer runs it and every SSL method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import ViT

__all__ = ["Supervised", "head_state_dict"]


class Supervised(nn.Module):
    """A linear classifier on the backbone's pooled features, trained end to end with cross-entropy.

    ``Supervised(vit_tiny_28(), num_classes=10)`` maps (B, C, H, W) images to (B, num_classes)
    logits; ``training_step((images, labels))`` returns the loss and ``{"acc": ...}``. ``augment``
    is read by the data recipe (``recipes.supervised_data``): "crop_flip" (DeiT-style, the
    default) or "none" (the images as they are, as the fine-tuning protocol feeds them).
    """

    AUGMENTATIONS = ("crop_flip", "none")  # what recipes.supervised_data applies to the training images

    def __init__(self, backbone: ViT, num_classes: int, label_smoothing: float = 0.0, augment: str = "crop_flip"):
        super().__init__()
        if not isinstance(backbone, ViT):
            raise TypeError(f"backbone must be a vitssl_core.ViT, got {type(backbone).__name__}")
        if backbone.num_classes != 0:
            raise ValueError(
                f"backbone has its own head (num_classes={backbone.num_classes}); build it with num_classes=0, "
                "the Supervised method owns the classifier"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 2")
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} must be a float in [0, 1)")
        if augment not in self.AUGMENTATIONS:
            raise ValueError(f"augment={augment!r} is not one of {self.AUGMENTATIONS}")
        self.backbone = backbone
        self.augment = augment  # "none": the fine-tuning protocol's images, for a baseline matched to it
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # timm's classifier init
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        tokens = self.backbone.forward_features(images)  # (B, N, D)
        features = self.backbone.forward_head(tokens, pre_logits=True)  # (B, D): pooled (+ fc_norm)
        return self.head(features)

    def training_step(self, batch: tuple[Tensor, Tensor] | list[Tensor]) -> tuple[Tensor, dict[str, float]]:
        """``(images (B, C, H, W), labels (B,) int64)`` -> (cross-entropy loss, {"acc": accuracy in [0, 1]})."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"batch must be (images, labels), got {type(batch).__name__} of length "
                f"{len(batch) if isinstance(batch, (tuple, list)) else 'n/a'}"
            )
        images, labels = batch
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype != torch.int64:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be an int64 tensor of shape (B,), got {shape}")
        if not isinstance(images, Tensor) or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be a tensor with B={labels.shape[0]} rows to match the labels")
        logits = self(images)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        return loss, {"acc": acc.item()}


def head_state_dict(state: dict) -> dict:
    """The classifier's entries of a ``Supervised`` state dict, as ``{"weight", "bias"}`` of its
    ``nn.Linear``: what a run keeps besides the backbone, so its own predictions can be measured."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors (a state dict), got {type(state).__name__}")
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    if set(head) != {"weight", "bias"}:
        raise ValueError(
            f"state holds no Supervised classifier (head.weight, head.bias); its head keys: {sorted(head)}"
        )
    return head
