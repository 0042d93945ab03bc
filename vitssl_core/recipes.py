"""Each method's recipe for small images: its defaults, its data augmentation, its batched views.

The papers' heads (2048-65536 wide) and crops are sized for ImageNet; these fit Fashion-MNIST /
CIFAR-10 (28-32 px) and a CPU. ``vitssl pretrain --method NAME`` builds exactly what these
functions build, so a Python user gets the CLI's recipe without the CLI:

    from vitssl_core import data, recipes, vit_tiny_28
    stats = data.NORMALIZE["fashion_mnist"]
    info = recipes.DataInfo("fashion_mnist", 28, 1, tuple(stats["mean"]), tuple(stats["std"]), num_classes=10)
    method = recipes.build_method("simclr", vit_tiny_28(), info)      # hidden 512, tau 0.2
    dataset, views = recipes.training_data("simclr", base, info, method)
    train(method, dataset, config, batch_transform=views)

Every default can be overridden by a keyword (``--method-arg KEY=VALUE`` on the command line).
``METHODS`` has one ``MethodEntry`` per method name; ``PRESETS`` names the backbone presets.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from . import vit
from .batch_augment import BatchViews, batch_asymmetric_views, batch_dino_views, batch_simclr_views
from .contrastive import MoCoV3, SimCLR
from .dino import DINO
from .mae import MAE
from .masked import BEiT, PatchTokenizer, SimMIM
from .supervised import Supervised

__all__ = [
    "DataInfo",
    "MethodEntry",
    "Transformed",
    "METHODS",
    "PRESETS",
    "build_method",
    "training_data",
    "supervised_data",
    "masked_data",
    "simclr_views",
    "mocov3_views",
    "dino_views",
    "dino_local_size",
    "simclr",
    "mocov3",
    "dino",
    "mae",
    "beit",
]

PRESETS: dict[str, Callable[..., vit.ViT]] = {
    "vit_mini_28": vit.vit_mini_28,
    "vit_tiny_28": vit.vit_tiny_28,
    "vit_small_28": vit.vit_small_28,
    "vit_tiny_32": vit.vit_tiny_32,
    "vit_small_32": vit.vit_small_32,
    "vit_tiny": vit.vit_tiny,
    "vit_small": vit.vit_small,
    "vit_base": vit.vit_base,
}


# --------------------------------------------------------------------------- what a recipe knows
@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a method's data recipe may need to know about the images."""

    name: str  # "fashion_mnist", "cifar10" or "folder:PATH"
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    @property
    def grayscale(self) -> bool:
        return self.in_chans == 1


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """How one method is built and fed.

    ``build(backbone, **method_args) -> method``; with ``num_classes=True`` it also receives
    ``num_classes=`` from the data set. ``data(dataset, info, method) -> dataset`` turns a data set
    of (float image (C, H, W) in [0, 1], label) into what the method's ``training_step`` expects,
    e.g. ``Transformed(dataset, transform)``; ``views(info, method) -> BatchViews`` instead makes
    the views of every batch on the training device (the data set stays plain images).
    """

    build: Callable[..., nn.Module]
    data: Callable[[Dataset, DataInfo, nn.Module], Dataset] | None = None
    views: Callable[[DataInfo, nn.Module], BatchViews] | None = None
    num_classes: bool = False
    needs_dataset: bool = False  # build() also receives dataset= (e.g. to fit BEiT's tokenizer)
    needs_steps: bool = False  # build() also receives epoch_steps= and total_steps= (DINO's epoch-long schedules)


class Transformed(Dataset):
    """A data set of (image, label) with ``transform`` applied to every image."""

    def __init__(self, dataset: Dataset, transform: Callable[[torch.Tensor], Any]):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return self.transform(image), label


# --------------------------------------------------------------------------- data recipes
def supervised_data(dataset: Dataset, info: DataInfo, method: nn.Module | None = None) -> Dataset:
    """DeiT-style light augmentation for small images: padded random crop, flip, normalise; only the
    normalisation if the method was built with ``augment="none"``."""
    if getattr(method, "augment", "crop_flip") == "none":
        return Transformed(dataset, v2.Normalize(mean=list(info.mean), std=list(info.std)))
    return Transformed(
        dataset,
        v2.Compose(
            [
                v2.RandomCrop(info.img_size, padding=info.img_size // 8),
                v2.RandomHorizontalFlip(),
                v2.Normalize(mean=list(info.mean), std=list(info.std)),
            ]
        ),
    )


def masked_data(scale: tuple[float, float], jitter: float = 0.0) -> Callable[[Dataset, DataInfo, nn.Module], Dataset]:
    """MAE/SimMIM/BEiT recipe: colour jitter (if ``jitter``), random resized crop (area fraction
    ``scale``), flip, normalise. BEiT's ``ColorJitter(0.4, 0.4, 0.4)`` comes first, on the whole
    image; on grey images only brightness and contrast (saturation means nothing on one channel)."""

    def recipe(dataset: Dataset, info: DataInfo, method: nn.Module | None = None) -> Dataset:
        colour = (
            []
            if not jitter
            else [
                v2.ColorJitter(brightness=jitter, contrast=jitter)
                if info.grayscale
                else v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter)
            ]
        )
        return Transformed(
            dataset,
            v2.Compose(
                [
                    *colour,
                    v2.RandomResizedCrop(info.img_size, scale=scale, antialias=True),
                    v2.RandomHorizontalFlip(),
                    v2.Normalize(mean=list(info.mean), std=list(info.std)),
                ]
            ),
        )

    return recipe


# Multi-view recipes draw their views for a whole batch on the training device (batch_augment):
# the same recipes as augment.py's per-sample pipelines, without their per-image Python cost.
def simclr_views(info: DataInfo, method: nn.Module | None = None) -> BatchViews:
    return BatchViews(batch_simclr_views(info.img_size, info.grayscale, mean=info.mean, std=info.std))


def mocov3_views(info: DataInfo, method: nn.Module | None = None) -> BatchViews:
    return BatchViews(batch_asymmetric_views(info.img_size, info.grayscale, mean=info.mean, std=info.std))


def dino_local_size(img_size: int, patch_size: int) -> int:
    """Local crops of about 3/7 of the image side, rounded to whole patches (12 px for 28/4)."""
    return max(patch_size, round(img_size * 3 / 7 / patch_size) * patch_size)


def dino_views(info: DataInfo, method: DINO) -> BatchViews:
    local = dino_local_size(info.img_size, method.backbone.patch_size)
    return BatchViews(
        batch_dino_views(info.img_size, local, info.grayscale, method.n_local_crops, mean=info.mean, std=info.std)
    )


# --------------------------------------------------------------------------- methods with small-image defaults
def simclr(backbone: vit.ViT, **kw: Any) -> SimCLR:
    """SimCLR with a 512-wide projection and tau 0.2 (the paper's 2048 and 0.1 are for batch 4096)."""
    return SimCLR(backbone, **{"hidden_dim": 512, "temperature": 0.2, **kw})


def mocov3(backbone: vit.ViT, **kw: Any) -> MoCoV3:
    """MoCo v3 with 1024-wide heads. Its defaults are the ViT recipe: momentum 0.99 -> 1 (cosine),
    temperature 0.2, fixed sin-cos positions, xavier init and a frozen random patch projection."""
    return MoCoV3(backbone, **{"hidden_dim": 1024, "momentum": 0.99, "temperature": 0.2, **kw})


def dino(backbone: vit.ViT, epoch_steps: int, total_steps: int, **kw: Any) -> DINO:
    """DINO with small-image heads, EMA 0.996 -> 1, and DINO's epoch-long schedules in this run's steps.

    ``DINO`` counts steps and cannot know an epoch's length; the caller can (``epoch_steps`` from
    the data set and the batch). DINO freezes the last layer for the first epoch: here for
    min(1 epoch, half the run) steps, so a short run still trains it. The teacher temperature
    0.07 comes with a 30-epoch warm-up from 0.04 (DINO's README; it warns that a hot teacher
    early is unstable): here max(1, min(30 epochs, half the run)) steps, so a short run spends
    its second half at the final temperature. Keywords override any of these.

    Local crops are smaller than the image, so they need ``dynamic_img_size``. The caller's
    backbone is never changed: one built without it is copied, and DINO trains the copy (read
    the trained weights from ``method.backbone``, or build the backbone with
    ``dynamic_img_size=True`` to train it in place).
    """
    kw = {
        "out_dim": 4096,
        "hidden_dim": 1024,
        "n_local_crops": 6,
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07,
        "momentum": 0.996,
        "warmup_teacher_temp_steps": max(1, min(30 * epoch_steps, total_steps // 2)),
        "freeze_last_layer_steps": min(epoch_steps, total_steps // 2),
        **kw,
    }
    if kw["n_local_crops"] > 0 and not backbone.dynamic_img_size:
        backbone = copy.deepcopy(backbone)  # a factory must not flip a flag on the caller's model
        backbone.dynamic_img_size = True
    return DINO(backbone, **kw)


def mae(backbone: vit.ViT, **kw: Any) -> MAE:
    """MAE with a 128-wide, 4-block decoder (the paper's 512 x 8 is for ViT-B on ImageNet)."""
    return MAE(backbone, **{"decoder_embed_dim": 128, "decoder_depth": 4, "decoder_num_heads": 4, **kw})


def beit(backbone: vit.ViT, dataset: Dataset, vocab_size: int = 256, tokenizer_images: int = 10000, **kw: Any) -> BEiT:
    """Fit the k-means patch tokenizer on the first ``tokenizer_images`` training images, then build BEiT."""
    n = min(len(dataset), tokenizer_images)
    images = torch.stack([dataset[i][0] for i in range(n)])  # (n, C, H, W) in [0, 1]
    tokenizer = PatchTokenizer.fit(images, patch_size=backbone.patch_size, vocab_size=vocab_size, seed=0)
    return BEiT(backbone, tokenizer, **kw)


# One entry per method name. To add one: MethodEntry(build=<class or function>, data=<recipe>).
METHODS: dict[str, MethodEntry] = {
    "supervised": MethodEntry(build=Supervised, data=supervised_data, num_classes=True),
    "simclr": MethodEntry(build=simclr, views=simclr_views),
    "mocov3": MethodEntry(build=mocov3, views=mocov3_views),
    "dino": MethodEntry(build=dino, views=dino_views, needs_steps=True),
    "mae": MethodEntry(build=mae, data=masked_data((0.2, 1.0))),
    "simmim": MethodEntry(build=SimMIM, data=masked_data((0.67, 1.0))),  # SimMIMTransform: crop (0.67, 1), flip
    # BEiT's DataAugmentationForBEiT: ColorJitter(0.4, 0.4, 0.4), flip, crop (0.08, 1)
    "beit": MethodEntry(build=beit, data=masked_data((0.08, 1.0), jitter=0.4), needs_dataset=True),
}


def _entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ValueError(f"method {name!r} is unknown; one of: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(
    name: str,
    backbone: vit.ViT,
    info: DataInfo,
    dataset: Dataset | None = None,
    epoch_steps: int | None = None,
    total_steps: int | None = None,
    **method_args: Any,
) -> nn.Module:
    """The method ``name`` around ``backbone`` with this module's defaults, ``method_args`` overriding them.

    What an entry needs besides: ``num_classes`` (from ``info``, unless given), ``dataset`` (BEiT
    fits its tokenizer on the plain images) and ``epoch_steps`` / ``total_steps`` (DINO).
    """
    entry = _entry(name)
    if not isinstance(info, DataInfo):
        raise TypeError(f"info must be a recipes.DataInfo, got {type(info).__name__}")
    kwargs = dict(method_args)
    if entry.num_classes:
        kwargs.setdefault("num_classes", info.num_classes)
    if entry.needs_dataset:
        if dataset is None:
            raise ValueError(f"method {name!r} needs dataset= (the plain training images)")
        kwargs["dataset"] = dataset
    if entry.needs_steps:
        for arg, value in (("epoch_steps", epoch_steps), ("total_steps", total_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"method {name!r} needs {arg}= as an int > 0 (its schedules count steps), got {value!r}"
                )
        kwargs.update(epoch_steps=epoch_steps, total_steps=total_steps)
    return entry.build(backbone, **kwargs)


def training_data(name: str, dataset: Dataset, info: DataInfo, method: nn.Module) -> tuple[Dataset, BatchViews | None]:
    """(data set for ``train``, ``batch_transform`` for ``train`` or None) of the method ``name``.

    ``dataset`` holds (float image (C, H, W) in [0, 1], label); a per-image recipe wraps it, a
    multi-view recipe leaves it as it is and returns the views to draw per batch.
    """
    entry = _entry(name)
    data = entry.data(dataset, info, method) if entry.data is not None else dataset
    views = entry.views(info, method) if entry.views is not None else None
    return data, views
