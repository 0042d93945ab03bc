"""Tests for vitssl_core.scenes: Fashion-MNIST scenes with boxes, instance masks and semantic maps."""

import pytest
import torch
from torchvision.ops import box_iou, masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitssl_core import data
from vitssl_core.scenes import FashionScenes, collate_detection, scene_class_names


@pytest.fixture(scope="module")
def train_scenes(needs_fashion_mnist):
    return FashionScenes("train", num_scenes=60, seed=0)


@pytest.fixture(scope="module")
def test_scenes(needs_fashion_mnist):
    return FashionScenes("test", num_scenes=30, seed=0)


def render(items, placements, canvas):
    """Re-draw a scene by hand from source images (uint8 (K, 28, 28)) and (x0, y0, size) rows."""
    image = torch.zeros(canvas, canvas)
    for item, (x0, y0, size) in zip(items, placements.tolist()):
        pasted = TF.resize(item.float().div(255)[None], [size, size], antialias=True).clamp(0, 1)[0]
        layer = torch.zeros(canvas, canvas)
        layer[y0 : y0 + size, x0 : x0 + size] = pasted
        image = torch.maximum(image, layer)
    return image[None]


def test_sample_format(train_scenes):
    image, target = train_scenes[0]
    K = len(target["labels"])
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5
    assert target["boxes"].shape == (K, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64
    assert target["masks"].shape == (K, 64, 64) and target["masks"].dtype == torch.bool
    assert target["semantic"].shape == (64, 64) and target["semantic"].dtype == torch.int64
    assert target["item_ids"].shape == (K,) and target["placements"].shape == (K, 3)
    assert target["image_id"] == 0


def test_class_names_put_background_first(train_scenes):
    assert train_scenes.class_names[0] == "background"
    assert train_scenes.class_names[1:] == data.FASHION_MNIST_CLASSES
    assert scene_class_names() == train_scenes.class_names and train_scenes.num_classes == 11


def test_same_seed_and_index_give_the_same_scene_in_any_order(train_scenes):
    other = FashionScenes("train", num_scenes=60, seed=0)
    later = [other[i] for i in (7, 3)]  # a different access order on a fresh object
    for (image, target), i in zip(later, (7, 3)):
        image_again, target_again = train_scenes[i]
        assert torch.equal(image, image_again)
        for key in ("boxes", "labels", "masks", "semantic", "item_ids", "placements"):
            assert torch.equal(target[key], target_again[key]), key


def test_different_index_or_seed_gives_a_different_scene(train_scenes):
    assert not torch.equal(train_scenes[0][0], train_scenes[1][0])
    assert not torch.equal(train_scenes[0][0], FashionScenes("train", num_scenes=2, seed=1)[0][0])


def test_negative_index_and_out_of_range(train_scenes):
    assert torch.equal(train_scenes[-1][0], train_scenes[59][0])
    with pytest.raises(IndexError, match="index=60"):
        train_scenes[60]


@pytest.mark.parametrize("split", ["train", "test"])
def test_items_come_from_their_own_split(split, train_scenes, test_scenes):
    scenes = train_scenes if split == "train" else test_scenes
    own, own_labels = data.load_fashion_mnist_tensors(train=split == "train")
    other, _ = data.load_fashion_mnist_tensors(train=split != "train")
    for i in range(10):
        image, target = scenes[i]
        ids = target["item_ids"]
        assert ids.max() < len(own)
        assert torch.equal(target["labels"], own_labels[ids] + 1)
        assert torch.equal(render(own[ids], target["placements"], 64), image)  # pixel for pixel
        assert not torch.equal(render(other[ids % len(other)], target["placements"], 64), image)


def test_train_and_test_scenes_differ(train_scenes, test_scenes):
    assert not torch.equal(train_scenes[0][0], test_scenes[0][0])


def test_boxes_are_tight_around_the_visible_masks(train_scenes):
    for i in range(len(train_scenes)):
        _, target = train_scenes[i]
        masks = target["masks"]
        assert masks.flatten(1).any(1).all()  # no empty instance
        # continuous pixel coordinates: one past the last pixel on the right and bottom
        expected = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        assert torch.equal(target["boxes"].as_subclass(torch.Tensor), expected)


def test_semantic_map_agrees_with_the_instance_masks(train_scenes):
    for i in range(len(train_scenes)):
        image, target = train_scenes[i]
        masks, labels = target["masks"], target["labels"]
        assert masks.sum(0).max() <= 1  # instances are disjoint: later items own overlaps
        painted = (masks.long() * labels[:, None, None]).sum(0)
        assert torch.equal(target["semantic"].as_subclass(torch.Tensor), painted)
        # a pixel is an item pixel exactly where the composed image is above the threshold
        assert torch.equal(image[0] > train_scenes.threshold, target["semantic"] > 0)


def test_boxes_respect_the_overlap_bound(train_scenes):
    worst = 0.0
    for i in range(len(train_scenes)):
        boxes = train_scenes[i][1]["boxes"]
        iou = box_iou(boxes, boxes).fill_diagonal_(0.0)
        worst = max(worst, float(iou.max()))
    assert worst <= train_scenes.max_overlap + 1e-6
    assert worst > 0.0  # items do overlap sometimes, so the bound is what stops them


def test_item_counts_scales_and_labels(train_scenes):
    counts = torch.tensor([len(train_scenes[i][1]["labels"]) for i in range(len(train_scenes))])
    assert counts.min() >= 1 and counts.max() <= 4
    assert set(counts.tolist()) == {1, 2, 3, 4}
    for i in range(10):
        _, target = train_scenes[i]
        sizes = target["placements"][:, 2]
        assert sizes.min() >= round(28 * 0.6) and sizes.max() <= round(28 * 1.2)
        assert target["labels"].min() >= 1 and target["labels"].max() <= 10
    exact = FashionScenes("train", num_scenes=5, min_items=3, max_items=3, seed=2)
    assert all(len(exact[i][1]["labels"]) == 3 for i in range(5))


def test_collate_detection_stacks_images_and_lists_targets(train_scenes):
    images, targets = collate_detection([train_scenes[i] for i in range(3)])
    assert images.shape == (3, 1, 64, 64)
    assert isinstance(targets, list) and len(targets) == 3
    assert torch.equal(targets[2]["boxes"], train_scenes[2][1]["boxes"])
    with pytest.raises(ValueError, match="non-empty"):
        collate_detection([])
    with pytest.raises(ValueError, match="share one shape"):
        collate_detection([train_scenes[0], (torch.zeros(1, 32, 32), {})])


def test_torchvision_v2_transforms_move_boxes_and_masks_together(train_scenes):
    image, target = train_scenes[4]
    flipped_image, flipped = v2.RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    expected = masks_to_boxes(flipped["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert torch.equal(flipped["boxes"].as_subclass(torch.Tensor), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="val"), "split='val'"),
        (dict(num_scenes=0), "num_scenes=0"),
        (dict(min_items=0), "min_items=0"),
        (dict(min_items=3, max_items=2), "max_items=2"),
        (dict(scale_range=(1.2, 0.6)), "scale_range"),
        (dict(scale_range=(0.0, 1.0)), "scale_range"),
        (dict(scale_range="big"), "scale_range"),
        (dict(canvas=30), "canvas=30"),
        (dict(max_overlap=1.5), "max_overlap=1.5"),
        (dict(seed=-1), "seed=-1"),
        (dict(threshold=1.0), "threshold=1.0"),
        (dict(min_visible=0.0), "min_visible=0.0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FashionScenes(**kwargs)


def test_impossible_scene_raises_a_clear_error(needs_fashion_mnist):
    crowded = FashionScenes("train", num_scenes=1, canvas=34, min_items=4, max_items=4, max_overlap=0.0)
    with pytest.raises(RuntimeError, match="min_items=4"):
        crowded[0]
