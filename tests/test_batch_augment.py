"""Tests for vitssl_core.batch_augment: every batched operation equals torchvision's per-image one."""

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitssl_core.batch_augment import (
    BatchView,
    BatchViews,
    _adjust_hue,
    _blend,
    _grey,
    batch_dino_views,
    batch_simclr_views,
    crop_boxes,
    resized_crop,
)


@pytest.fixture
def rgb():
    return torch.rand(16, 3, 20, 20, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("size", [28, 12])
def test_resized_crop_equals_torchvision_per_image(size):
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    boxes = crop_boxes(64, 28, 28, (0.05, 1.0), x.device)
    flip = torch.rand(64) < 0.5
    out = resized_crop(x, boxes, size, flip)
    ref = torch.stack(
        [TF.resized_crop(x[i], *[int(v) for v in boxes[i]], [size, size], antialias=False) for i in range(64)]
    )
    ref = torch.where(flip[:, None, None, None], ref.flip(-1), ref)
    assert torch.allclose(out, ref, atol=1e-5)


def test_crop_boxes_follow_random_resized_crop():
    torch.manual_seed(1)
    boxes = crop_boxes(20000, 28, 28, (0.2, 1.0), torch.device("cpu"))
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round()) and bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + h <= 28).all() and (left + w <= 28).all())
    # the same distribution of crop areas as torchvision's sampler (means within 1 % of the image)
    ref = torch.tensor(
        [v2.RandomResizedCrop.get_params(torch.zeros(1, 28, 28), [0.2, 1.0], [3 / 4, 4 / 3])[2:] for _ in range(20000)],
        dtype=torch.float32,
    )
    area, ref_area = (h * w / 784).mean(), (ref[:, 0] * ref[:, 1] / 784).mean()
    assert abs(area - ref_area) < 0.01, (area, ref_area)
    assert abs((h / w).log().mean()) < 0.01  # aspect ratios symmetric around 1


def test_photometric_ops_equal_torchvision(rgb):
    f = torch.linspace(0.2, 1.8, len(rgb))
    for ours, theirs in [
        (_blend(rgb, torch.zeros_like(rgb), f), TF.adjust_brightness),
        (_blend(rgb, _grey(rgb).mean(dim=(1, 2, 3), keepdim=True).expand_as(rgb), f), TF.adjust_contrast),
        (_blend(rgb, _grey(rgb).expand_as(rgb), f), TF.adjust_saturation),
    ]:
        ref = torch.stack([theirs(rgb[i], float(f[i])) for i in range(len(rgb))])
        assert torch.allclose(ours, ref, atol=1e-5)
    hue = torch.linspace(-0.5, 0.5, len(rgb))
    ref = torch.stack([TF.adjust_hue(rgb[i], float(hue[i])) for i in range(len(rgb))])
    assert torch.allclose(_adjust_hue(rgb, hue), ref, atol=1e-4)


def test_blur_equals_torchvision_gaussian_blur():
    torch.manual_seed(2)
    x = torch.rand(8, 1, 28, 28)
    view = BatchView(28, grayscale=True, blur_p=1.0)
    state = torch.get_rng_state()
    out = view._blur(x)
    torch.set_rng_state(state)
    torch.rand(8)  # the on/off draw
    sigma = torch.rand(8) * 1.9 + 0.1
    ref = torch.stack([TF.gaussian_blur(x[i], [3, 3], [float(sigma[i])] * 2) for i in range(8)])
    assert torch.allclose(out, ref, atol=1e-5)


def test_views_are_drawn_per_image_and_normalised():
    torch.manual_seed(3)
    x = torch.rand(1, 1, 28, 28).expand(32, -1, -1, -1).contiguous()  # one image, 32 times
    views, labels = BatchViews(batch_simclr_views(28, True, mean=(0.5,), std=(0.25,)))((x, torch.arange(32)))
    assert len(views) == 2 and views[0].shape == (32, 1, 28, 28) and torch.equal(labels, torch.arange(32))
    flat = views[0].flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1).min() > 0  # every copy got its own view
    assert not torch.equal(views[0], views[1])
    raw = BatchView(28, True, blur_p=0, jitter_p=0, scale=(1.0, 1.0))(x)  # whole image, maybe flipped
    assert all(torch.allclose(r, x[0], atol=1e-6) or torch.allclose(r, x[0].flip(-1), atol=1e-6) for r in raw)
    normalised = BatchView(28, True, blur_p=0, jitter_p=0, scale=(1.0, 1.0), mean=(0.5,), std=(0.25,))
    torch.manual_seed(4)
    a = normalised(x)
    torch.manual_seed(4)
    assert torch.allclose(a, (BatchView(28, True, blur_p=0, jitter_p=0, scale=(1.0, 1.0))(x) - 0.5) / 0.25)


def test_dino_views_have_global_and_local_sizes():
    views = batch_dino_views(28, 12, True, n_local=3)
    out, _ = BatchViews(views)(torch.rand(4, 1, 28, 28))
    assert [v.shape[-1] for v in out] == [28, 28, 12, 12, 12]


def test_jitter_changes_brightness_statistics_like_torchvision():
    """Mean brightness after the whole view recipe matches the per-image v2 pipeline's (same recipe)."""
    from vitssl_core.augment import simclr_augment

    torch.manual_seed(5)
    x = torch.rand(1, 1, 28, 28) * 0.5 + 0.25
    batch = x.expand(4000, -1, -1, -1)
    ours = BatchView(28, True)(batch)
    per_image = simclr_augment(28, True)
    theirs = torch.stack([per_image(x[0]) for _ in range(4000)])
    for stat in (lambda t: t.mean(dim=(1, 2, 3)), lambda t: t.std(dim=(1, 2, 3))):
        a, b = stat(ours), stat(theirs)
        assert abs(a.mean() - b.mean()) < 0.01 and abs(a.std() - b.std()) < 0.01, (a.mean(), b.mean(), a.std(), b.std())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="images must be a float tensor"):
        BatchView(28, True)(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mean has 3 values for 1-channel"):
        BatchView(28, True, mean=(0.5,) * 3, std=(0.2,) * 3)(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="blur_p"):
        BatchView(28, True, blur_p=2)
    with pytest.raises(ValueError, match="local_size=30 must not exceed"):
        batch_dino_views(28, 30, True, 2)
    with pytest.raises(ValueError, match="views must be a non-empty list"):
        BatchViews([])
    assert math.isclose(BatchView(28, False).hue, 0.1)
