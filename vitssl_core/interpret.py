"""What a ViT attends to: attention maps, attention distance and patch features as colours.

- ``attention_maps``: the class token's last-layer attention per head (DINO, Caron et al., 2021, Fig. 1/3);
- ``attention_distance``: the mean attention distance per layer and head (Dosovitskiy et al., 2021, Fig. 7);
- ``pca_rgb``: a PCA of patch features shown as colours (DINOv2, Oquab et al., 2024, Fig. 1).

Only the backbone's public API is used (``get_last_selfattention``, ``get_selfattentions``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import validate
from .features import eval_mode, image_batches, prepare_images
from .vit import ViT

__all__ = ["attention_maps", "attention_distance", "pca_rgb"]


def _grid(backbone: ViT, x: Tensor) -> tuple[int, int]:
    return x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size


def attention_maps(
    backbone: ViT,
    images: Tensor,
    upsample: bool = False,
    normalize: dict | None = None,
) -> Tensor:
    """Where the class token looks in the last block (DINO): (B, h, gh, gw), or (B, h, H, W) if upsampled.

    Row 0 of the last self-attention without its first entry (attention to itself), so each
    head's map sums to at most 1. ``upsample`` repeats each patch value over its P x P pixels.
    """
    validate.normalize_stats(normalize)
    device = next(backbone.parameters()).device
    x = prepare_images(images, device, normalize)
    with eval_mode(backbone):
        attn = backbone.get_last_selfattention(x).float()  # (B, h, N, N)
    gh, gw = _grid(backbone, x)
    maps = attn[:, :, 0, 1:].reshape(x.shape[0], attn.shape[1], gh, gw)  # (B, h, gh, gw)
    if upsample:
        maps = F.interpolate(maps, scale_factor=backbone.patch_size, mode="nearest")  # (B, h, H, W)
    return maps


def attention_distance(
    backbone: ViT,
    images: Tensor,
    normalize: dict | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Mean attention distance in pixels, (depth, h) (Dosovitskiy et al., 2021, Fig. 7).

    For each query patch: the distance between its centre and each key patch's centre,
    weighted by the attention between them, with the class token left out and the patch
    weights renormalised to sum to 1; averaged over query patches and images. Small values
    are local heads (like a convolution), large values global ones.
    """
    validate.normalize_stats(normalize)
    device = next(backbone.parameters()).device
    total, count = None, 0
    with eval_mode(backbone):
        for raw in image_batches(images, batch_size):
            x = prepare_images(raw, device, normalize)
            gh, gw = _grid(backbone, x)
            rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
            centres = torch.stack([rows, cols], -1).reshape(-1, 2).float() * backbone.patch_size  # (L, 2) px
            dist = torch.cdist(centres, centres)  # (L, L): pixels between patch centres
            per_layer = []
            for attn in backbone.get_selfattentions(x):  # each (B, h, N, N)
                a = attn[:, :, 1:, 1:].float()  # (B, h, L, L) patch-to-patch only
                a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
                per_layer.append((a * dist).sum(-1).mean(-1).sum(0))  # (h,): summed over images
            batch_total = torch.stack(per_layer)  # (depth, h)
            total = batch_total if total is None else total + batch_total
            count += x.shape[0]
    if total is None:
        raise ValueError("images is empty; attention distance is undefined")
    return total / count


def pca_rgb(patch_features: Tensor, n_components: int = 3, grid_size: tuple[int, int] | None = None) -> Tensor:
    """Patch features (B, L, D) -> (B, gh, gw, n_components) in [0, 1]: the first principal components as colours.

    One PCA over all B*L patches (SVD of the centred features), each component min-max scaled
    over all patches, signs fixed so the largest loading is positive. Pass the patch tokens,
    e.g. ``backbone.forward_features(x)[:, 1:]``. ``grid_size`` defaults to a square grid.
    """
    if not isinstance(patch_features, Tensor) or patch_features.ndim != 3:
        shape = tuple(patch_features.shape) if isinstance(patch_features, Tensor) else type(patch_features).__name__
        raise ValueError(f"patch_features must be a tensor of shape (B, L, D), got {shape}")
    B, L, D = patch_features.shape
    validate.positive_int("n_components", n_components)
    if n_components > min(B * L, D):
        raise ValueError(f"n_components={n_components} exceeds min(B*L={B * L}, D={D})")
    if grid_size is None:
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"L={L} patches is not a square grid; pass grid_size=(gh, gw)")
        grid_size = (side, side)
    if grid_size[0] * grid_size[1] != L:
        raise ValueError(f"grid_size={grid_size} does not hold L={L} patches")
    x = patch_features.detach().reshape(B * L, D).float()
    x = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # rows of vh: principal directions
    comps = vh[:n_components]  # (n, D)
    signs = comps.gather(1, comps.abs().argmax(1, keepdim=True)).sign()  # (n, 1)
    proj = x @ (comps * signs).T  # (B*L, n)
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return proj.reshape(B, grid_size[0], grid_size[1], n_components)
