"""Scenes for dense prediction, composed from real Fashion-MNIST items (Xiao et al., 2017).

A scene is a black ``canvas x canvas`` grey image holding 1 to 4 Fashion-MNIST items, each
resized by a random factor and pasted at a random place (pixel-wise maximum, so items never
darken each other). Every scene comes with its ground truth in torchvision's detection and
segmentation format (the format of ``torchvision.datasets.wrap_dataset_for_transforms_v2`` and
of torchvision's detection models), so the heads of ``vitssl_core.dense`` train on these scenes
and on VOC or COCO alike.

Conventions, stated once:

* Labels are the Fashion-MNIST class **plus one**: 0 is background, 1..10 are the ten classes
  (``class_names[label]``; ``class_names[0] == "background"``), as in torchvision's detection
  models and VOC.
* A pixel belongs to an item where the resized item is brighter than ``threshold``. Where two
  items overlap, the item drawn later owns the pixel and the earlier item's mask is cut, so
  instance masks are disjoint and the semantic map is their union.
* Boxes are ``xyxy`` in continuous pixel coordinates: pixel (row i, column j) covers
  ``[j, j+1) x [i, i+1)``, so the tight box of a mask is ``masks_to_boxes(mask) + (0, 0, 1, 1)``
  and its area is its width times its height in pixels. Boxes are tight around the *visible*
  mask, and no two boxes of a scene have an IoU above ``max_overlap``.
* Train scenes draw items only from the Fashion-MNIST training split, test scenes only from the
  test split; ``target["item_ids"]`` records each item's index in its split.
* Scene ``i`` is a pure function of ``(seed, i)``: each index gets its own random generator, so
  the same scene comes back whatever the access order, worker or process.
"""

from __future__ import annotations

import functools
import math
import operator
import os

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

# Imported as a module, and used only inside functions, so that data.py may re-export this
# module's names from anywhere in its body without a circular-import error.
from . import data as _data

__all__ = ["FashionScenes", "collate_detection", "scene_class_names"]

ITEM_SIZE = 28  # Fashion-MNIST images are 28 x 28
_SPLITS = ("train", "test")
_MAX_ATTEMPTS = 100  # placements tried per scene before settling for fewer items


def scene_class_names() -> tuple[str, ...]:
    """("background", "T-shirt/top", ..., "Ankle boot"): the name of each scene label 0..10."""
    return ("background", *_data.FASHION_MNIST_CLASSES)


@functools.lru_cache(maxsize=4)
def _split_tensors(train: bool, root: str | None) -> tuple[Tensor, Tensor]:
    """One split as (uint8 (N, 28, 28), int64 (N,)), read once per process and split."""
    return _data.load_fashion_mnist_tensors(train=train, root=root)


def _index_seed(seed: int, index: int) -> int:
    """A 63-bit seed for scene ``index``: NumPy's SeedSequence mixes (seed, index) well."""
    words = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool non-empty masks -> (K, 4) float32 xyxy, x2/y2 one past the last pixel."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (K, H), (K, W)
    y1, x1 = rows.argmax(axis=1), cols.argmax(axis=1)
    y2 = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    x2 = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


def _max_pairwise_iou(boxes: np.ndarray) -> float:
    """The largest IoU between two different rows of (K, 4) xyxy boxes; 0 for K < 2."""
    if len(boxes) < 2:
        return 0.0
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])  # (K, K, 2)
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)  # (K, K)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    np.fill_diagonal(iou, 0.0)
    return float(iou.max())


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


class FashionScenes(Dataset):
    """Scenes of 1-4 resized Fashion-MNIST items; items are ``(image (1, H, W), target)``.

    ``image`` is float32 in [0, 1] with H = W = ``canvas``. ``target`` holds, for K items:
    ``boxes`` (K, 4) float xyxy pixels (a ``tv_tensors.BoundingBoxes``), ``labels`` (K,) int64 in
    1..10, ``masks`` (K, H, W) bool (a ``tv_tensors.Mask``), ``semantic`` (H, W) int64 in 0..10
    (a ``tv_tensors.Mask``), ``item_ids`` (K,) int64 indices into the split, ``placements``
    (K, 3) int64 ``(x0, y0, size)`` of each pasted item, and ``image_id`` (int, the index).
    Items are listed in drawing order (later ones on top).
    """

    def __init__(
        self,
        split: str = "train",
        num_scenes: int = 1000,
        canvas: int = 64,
        min_items: int = 1,
        max_items: int = 4,
        scale_range: tuple[float, float] = (0.6, 1.2),
        max_overlap: float = 0.2,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        threshold: float = 0.1,
        min_visible: float = 0.5,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split={split!r} is not one of {_SPLITS}")
        _check_int("num_scenes", num_scenes, 1)
        _check_int("min_items", min_items, 1)
        _check_int("max_items", max_items, 1)
        if max_items < min_items:
            raise ValueError(f"max_items={max_items} must be >= min_items={min_items}")
        _check_int("seed", seed, 0)
        try:
            lo, hi = (float(s) for s in scale_range)
        except (TypeError, ValueError):
            raise ValueError(f"scale_range={scale_range!r} must be a pair (low, high) of numbers") from None
        if not (0 < lo <= hi) or not math.isfinite(hi) or round(ITEM_SIZE * lo) < 1:
            raise ValueError(
                f"scale_range={scale_range!r} must satisfy 0 < low <= high with round(28 * low) >= 1 pixel"
            )
        _check_int("canvas", canvas, 1)
        largest = round(ITEM_SIZE * hi)
        if canvas < largest:
            raise ValueError(
                f"canvas={canvas} cannot hold an item at the largest scale {hi} ({largest} x {largest} pixels); "
                f"use canvas >= {largest} or a smaller scale_range"
            )
        if not 0.0 <= float(max_overlap) <= 1.0:
            raise ValueError(f"max_overlap={max_overlap!r} must be an IoU in [0, 1]")
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"threshold={threshold!r} must be in [0, 1): pixels above it belong to an item")
        if not 0.0 < float(min_visible) <= 1.0:
            raise ValueError(f"min_visible={min_visible!r} must be in (0, 1]: the visible share of an occluded item")
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root={root!r} must be a path (str or os.PathLike) or None")

        self.split = split
        self.num_scenes = num_scenes
        self.canvas = canvas
        self.min_items, self.max_items = min_items, max_items
        self.scale_range = (lo, hi)
        self.max_overlap = float(max_overlap)
        self.seed = seed
        self.threshold = float(threshold)
        self.min_visible = float(min_visible)
        self.class_names = scene_class_names()
        self.num_classes = len(self.class_names)  # 11: background + 10 classes
        root_key = None if root is None else os.fspath(root)
        self.items, self.item_labels = _split_tensors(split == "train", root_key)  # (N, 28, 28), (N,)

    def __len__(self) -> int:
        return self.num_scenes

    def render_item(self, item_id: int, size: int) -> Tensor:
        """Fashion-MNIST item ``item_id`` of this split resized to (size, size), float in [0, 1]."""
        item = self.items[item_id].float().div(255)[None]  # (1, 28, 28)
        if size != ITEM_SIZE:
            item = TF.resize(item, [size, size], antialias=True).clamp_(0.0, 1.0)
        return item[0]  # (size, size)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        index = operator.index(index)
        if index < 0:
            index += self.num_scenes
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"index={index} is out of range for {self.num_scenes} scenes")
        g = torch.Generator().manual_seed(_index_seed(self.seed, index))
        H = W = self.canvas
        lo, hi = self.scale_range
        wanted = int(torch.randint(self.min_items, self.max_items + 1, (), generator=g))

        # NumPy for the bookkeeping: a scene is many tiny array ops, where torch's per-call
        # overhead would dominate.
        image = np.zeros((H, W), dtype=np.float32)
        masks = np.zeros((0, H, W), dtype=bool)  # visible masks, drawing order
        full_area = np.zeros(0)  # pixels of each item before occlusion
        labels, item_ids, placements = [], [], []
        for _ in range(_MAX_ATTEMPTS):
            if len(labels) == wanted:
                break
            item_id = int(torch.randint(len(self.items), (), generator=g))
            scale = lo + (hi - lo) * float(torch.rand((), generator=g))
            size = round(ITEM_SIZE * scale)
            y0 = int(torch.randint(H - size + 1, (), generator=g))
            x0 = int(torch.randint(W - size + 1, (), generator=g))
            item = self.render_item(item_id, size).numpy()  # (size, size)
            new = np.zeros((H, W), dtype=bool)
            new[y0 : y0 + size, x0 : x0 + size] = item > self.threshold
            if not new.any():
                continue
            cut = np.concatenate([masks & ~new, new[None]])  # (K+1, H, W): the new item on top
            areas = cut.reshape(len(cut), -1).sum(axis=1)
            if (areas[:-1] < self.min_visible * full_area).any():  # an earlier item hidden too much
                continue
            if _max_pairwise_iou(_tight_boxes(cut)) > self.max_overlap:
                continue
            region = image[y0 : y0 + size, x0 : x0 + size]
            np.maximum(region, item, out=region)
            masks = cut
            full_area = np.append(full_area, areas[-1])
            labels.append(int(self.item_labels[item_id]) + 1)
            item_ids.append(item_id)
            placements.append((x0, y0, size))
        if len(labels) < self.min_items:
            raise RuntimeError(
                f"scene {index}: placed only {len(labels)} of min_items={self.min_items} items in {_MAX_ATTEMPTS} "
                f"tries; lower min_items or scale_range, or raise max_overlap={self.max_overlap} "
                f"or canvas={self.canvas}"
            )

        label_t = torch.tensor(labels, dtype=torch.int64)
        masks_t = torch.from_numpy(masks)
        semantic = (masks_t.long() * label_t[:, None, None]).sum(0)  # (H, W): masks are disjoint
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(_tight_boxes(masks)), format="XYXY", canvas_size=(H, W)),
            "labels": label_t,
            "masks": tv_tensors.Mask(masks_t),
            "semantic": tv_tensors.Mask(semantic),
            "item_ids": torch.tensor(item_ids, dtype=torch.int64),
            "placements": torch.tensor(placements, dtype=torch.int64),
            "image_id": index,
        }
        return torch.from_numpy(image)[None], target  # (1, H, W)

    def __repr__(self) -> str:
        return (
            f"FashionScenes(split={self.split!r}, num_scenes={self.num_scenes}, canvas={self.canvas}, "
            f"items={self.min_items}..{self.max_items}, scale_range={self.scale_range}, "
            f"max_overlap={self.max_overlap}, seed={self.seed})"
        )


def collate_detection(batch: list[tuple[Tensor, dict]]) -> tuple[Tensor, list[dict]]:
    """DataLoader collate for detection: images stacked to (B, C, H, W), targets kept as a list.

    Targets differ in their number of objects, so they cannot be stacked; torchvision's
    detection models take exactly this list.
    """
    if not isinstance(batch, (list, tuple)) or len(batch) == 0:
        raise ValueError(f"batch must be a non-empty list of (image, target) pairs, got {type(batch).__name__}")
    for i, sample in enumerate(batch):
        if not isinstance(sample, (list, tuple)) or len(sample) != 2:
            raise ValueError(f"batch[{i}] must be an (image, target) pair, got {type(sample).__name__}")
    images = [image for image, _ in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in a batch must share one shape to be stacked, got {sorted(shapes)}")
    return torch.stack(images), [target for _, target in batch]
