"""View-making augmentations for contrastive and self-distillation methods, per sample.

The recipes follow SimCLR (Chen et al., 2020: random resized crop, flip, colour jitter 0.8,
random grayscale 0.2, Gaussian blur), BYOL (Grill et al., 2020) as reused by MoCo v3 and DINO
(two *asymmetric* global views: blur with p=1.0 on the first and p=0.1 on the second,
solarisation p=0.2 on the second only) and DINO's multi-crop (Caron et al., 2021: two global
crops plus K small local crops).

Every transform here is a ``torchvision.transforms.v2`` pipeline that maps ONE float image
(C, H, W) in [0, 1] to one view. It must run per sample, inside the dataset (``TwoViews``,
``MultiCrop``): v2 transforms draw their random parameters once per call, so applying one to a
batch tensor (B, C, H, W), as the article's training loop does (section 5.1), gives every image
in the batch the same crop, flip and jitter. The views are then far less diverse and the
contrastive task is easier than intended. ``tests/test_augment.py`` shows both behaviours.

Changes for small grey images (28x28 Fashion-MNIST), documented where they are made: a milder
crop scale (0.2-1 instead of 0.08-1: an 8 % crop of 28 px is a 8x8 blob), brightness/contrast
jitter only (no saturation, hue or grayscale on one channel), a 3x3 blur kernel (SimCLR uses
10 % of the image side).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

__all__ = [
    "simclr_augment",
    "asymmetric_augment",
    "local_crop_augment",
    "dino_augment",
    "TwoViews",
    "MultiCrop",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- checks and pieces
def _check_size(name: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"{name}={size!r} must be a positive int (pixels)")


def _check_prob(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p!r} must be a probability in [0, 1]")


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if not isinstance(scale, (tuple, list)) or len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name}={scale!r} must be a pair (lo, hi) with 0 < lo <= hi <= 1 (fractions of the area)")
    return float(scale[0]), float(scale[1])


def _blur_kernel(size: int) -> int:
    """SimCLR's kernel: 10 % of the image side, odd, at least 3 (3 for 28 or 32 px, 23 for 224 px)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def _photometric(grayscale: bool, strength: float) -> list:
    """Colour jitter (p=0.8) and, for RGB, random grayscale (p=0.2), scaled by ``strength``."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
        raise ValueError(f"strength={strength!r} must be a float >= 0 (SimCLR uses 1.0 on ImageNet, 0.5 on CIFAR)")
    s = float(strength)
    if grayscale:  # saturation and hue mean nothing on one channel
        return [v2.RandomApply([v2.ColorJitter(brightness=0.8 * s, contrast=0.8 * s)], p=0.8)]
    return [
        v2.RandomApply(
            [v2.ColorJitter(brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=min(0.2 * s, 0.5))], p=0.8
        ),
        v2.RandomGrayscale(p=0.2),
    ]


def _finish(steps: list, mean: Sequence[float] | None, std: Sequence[float] | None) -> v2.Compose:
    if (mean is None) != (std is None):
        raise ValueError(f"mean={mean!r} and std={std!r} must be given together (or both None: no normalisation)")
    if mean is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)


def _view(
    size: int, grayscale: bool, strength: float, scale: tuple[float, float], blur_p: float, solarize_p: float, mean, std
) -> v2.Compose:
    _check_prob("blur_p", blur_p)
    _check_prob("solarize_p", solarize_p)
    steps = [
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        *_photometric(grayscale, strength),
    ]
    if blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=0.5, p=solarize_p))  # images are floats in [0, 1]
    return _finish(steps, mean, std)


def _default_scale(grayscale: bool, scale) -> tuple[float, float]:
    if scale is None:
        return (0.2, 1.0) if grayscale else (0.08, 1.0)  # milder crops for 28x28 grey images
    return _check_scale("scale", scale)


# --------------------------------------------------------------------------- recipes
def simclr_augment(
    img_size: int,
    grayscale: bool,
    strength: float = 0.5,
    scale: Sequence[float] | None = None,
    blur_p: float = 0.5,
    solarize_p: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """SimCLR's view: (C, H, W) float in [0, 1] -> (C, img_size, img_size), normalised if mean/std given.

    Random resized crop (``scale`` (0.08, 1) RGB, (0.2, 1) grey by default), horizontal flip,
    colour jitter (brightness/contrast/saturation 0.8 s, hue 0.2 s, p=0.8; brightness/contrast
    only for grey), random grayscale p=0.2 (RGB), Gaussian blur p=``blur_p`` (sigma 0.1-2),
    solarisation p=``solarize_p`` (0 in SimCLR), normalisation. s = ``strength``: 0.5 gives
    BYOL/DINO's (0.4, 0.4, 0.4, 0.1).
    """
    _check_size("img_size", img_size)
    return _view(img_size, grayscale, strength, _default_scale(grayscale, scale), blur_p, solarize_p, mean, std)


def asymmetric_augment(
    img_size: int,
    grayscale: bool,
    strength: float = 0.5,
    scale: Sequence[float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[v2.Compose, v2.Compose]:
    """BYOL's two view recipes, used by MoCo v3 and for DINO's global crops: (first, second).

    Both as ``simclr_augment``; the first always blurs and never solarises, the second blurs
    with p=0.1 and solarises with p=0.2.
    """
    _check_size("img_size", img_size)
    scale = _default_scale(grayscale, scale)
    return (
        _view(img_size, grayscale, strength, scale, 1.0, 0.0, mean, std),
        _view(img_size, grayscale, strength, scale, 0.1, 0.2, mean, std),
    )


def local_crop_augment(
    crop_size: int,
    grayscale: bool,
    strength: float = 0.5,
    scale: Sequence[float] = (0.05, 0.4),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """DINO's local crop: a small part (``scale`` of the area) resized to crop_size x crop_size, blur p=0.5.

    ``crop_size`` must be a multiple of the ViT's patch size (e.g. 12 or 16 px for patch 4).
    """
    _check_size("crop_size", crop_size)
    return _view(crop_size, grayscale, strength, _check_scale("scale", scale), 0.5, 0.0, mean, std)


def dino_augment(
    img_size: int,
    local_size: int,
    grayscale: bool,
    strength: float = 0.5,
    global_scale: Sequence[float] = (0.4, 1.0),
    local_scale: Sequence[float] = (0.05, 0.4),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[v2.Compose, v2.Compose, v2.Compose]:
    """DINO's multi-crop recipes: (global 1, global 2, local), for ``MultiCrop``.

    Global crops cover ``global_scale`` (0.4-1, DINO's default) of the image at img_size; local
    crops cover ``local_scale`` (0.05-0.4) at local_size. A local crop's scale range must end
    where the global one starts, so local crops really are local.
    """
    if local_size > img_size:
        raise ValueError(f"local_size={local_size} must not exceed img_size={img_size}")
    g1, g2 = asymmetric_augment(img_size, grayscale, strength, global_scale, mean, std)
    return g1, g2, local_crop_augment(local_size, grayscale, strength, local_scale, mean, std)


# --------------------------------------------------------------------------- dataset wrappers
def _check_dataset_and_transforms(dataset, **transforms) -> None:
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset={type(dataset).__name__} must be a map-style dataset (__getitem__ and __len__)")
    for name, t in transforms.items():
        if t is not None and not callable(t):
            raise TypeError(f"{name}={t!r} is not callable; pass a transform such as simclr_augment(...)")


class TwoViews(Dataset):
    """Wrap a dataset of (image (C, H, W) in [0, 1], label): items become ([view1, view2], label).

    Each view is drawn independently, per sample; ``transform2`` (default: ``transform``) makes
    the second view, for asymmetric recipes.
    """

    def __init__(self, dataset: Dataset, transform: Transform, transform2: Transform | None = None):
        if transform is None:
            raise TypeError("transform=None; pass a transform such as simclr_augment(...)")
        _check_dataset_and_transforms(dataset, transform=transform, transform2=transform2)
        self.dataset = dataset
        self.transform = transform
        self.transform2 = transform2 if transform2 is not None else transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        image, label = self.dataset[index]
        return [self.transform(image), self.transform2(image)], label


class MultiCrop(Dataset):
    """Wrap a dataset: items become ([global1, global2, local1, ..., localK], label), DINO's multi-crop."""

    def __init__(
        self,
        dataset: Dataset,
        global_transform1: Transform,
        global_transform2: Transform,
        local_transform: Transform | None,
        n_local: int,
    ):
        if global_transform1 is None or global_transform2 is None:
            raise TypeError("global_transform1 and global_transform2 must be transforms, not None")
        _check_dataset_and_transforms(
            dataset,
            global_transform1=global_transform1,
            global_transform2=global_transform2,
            local_transform=local_transform,
        )
        if isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 0:
            raise ValueError(f"n_local={n_local!r} must be an int >= 0")
        if n_local > 0 and local_transform is None:
            raise ValueError(f"n_local={n_local} local crops need a local_transform")
        self.dataset = dataset
        self.global_transforms = (global_transform1, global_transform2)
        self.local_transform = local_transform
        self.n_local = n_local

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        image, label = self.dataset[index]
        crops = [t(image) for t in self.global_transforms]
        crops += [self.local_transform(image) for _ in range(self.n_local)]
        return crops, label
