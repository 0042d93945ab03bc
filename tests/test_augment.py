"""Tests for vitssl_core.augment on real Fashion-MNIST: per-sample views, the article's batch bug,
shapes, seeding, multi-crop and input errors."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from vitssl_core import data
from vitssl_core.augment import (
    MultiCrop,
    TwoViews,
    asymmetric_augment,
    dino_augment,
    local_crop_augment,
    simclr_augment,
)

MEAN, STD = data.NORMALIZE["fashion_mnist"]["mean"], data.NORMALIZE["fashion_mnist"]["std"]


@pytest.fixture(scope="module")
def fmnist(needs_fashion_mnist):
    return data.FashionMNIST(train=False, download=False)


class Repeat(Dataset):
    """One image, n times: any difference between items comes from the augmentation."""

    def __init__(self, image, n):
        self.image, self.n = image, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.image, 0


def test_two_views_of_one_image_differ_and_keep_shape(fmnist):
    torch.manual_seed(0)
    ds = TwoViews(fmnist, simclr_augment(28, grayscale=True, mean=MEAN, std=STD))
    (v1, v2), label = ds[0]
    assert label == fmnist[0][1]
    for v in (v1, v2):
        assert v.shape == (1, 28, 28) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert not torch.allclose(v1, v2)


def test_views_in_a_batch_are_independent_unlike_the_articles_batch_transform(fmnist):
    image = fmnist[1][0]
    t = simclr_augment(28, grayscale=True)
    torch.manual_seed(0)
    loader = DataLoader(TwoViews(Repeat(image, 8), t), batch_size=8)
    (first, second), labels = next(iter(loader))
    assert first.shape == (8, 1, 28, 28) and second.shape == (8, 1, 28, 28) and labels.shape == (8,)
    distinct = {tuple(first[i].flatten().tolist()) for i in range(8)}
    assert len(distinct) == 8  # every sample drew its own crop, flip and jitter

    # The article's loop: images1 = train_transform(images) on the whole (B, C, H, W) batch.
    torch.manual_seed(0)
    images1 = t(image.expand(8, 1, 28, 28).clone())  # one draw of the random parameters for all 8
    assert images1.shape == (8, 1, 28, 28)
    assert all(torch.equal(images1[0], images1[i]) for i in range(8))


def test_seed_makes_views_reproducible(fmnist):
    ds = TwoViews(fmnist, *asymmetric_augment(28, grayscale=True, mean=MEAN, std=STD))
    torch.manual_seed(123)
    a = ds[5][0]
    torch.manual_seed(123)
    b = ds[5][0]
    torch.manual_seed(124)
    c = ds[5][0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_normalisation_uses_the_given_mean_and_std(fmnist):
    image = fmnist[2][0]
    torch.manual_seed(7)
    plain = simclr_augment(28, grayscale=True)(image)
    torch.manual_seed(7)
    normed = simclr_augment(28, grayscale=True, mean=MEAN, std=STD)(image)
    torch.testing.assert_close(normed, (plain - MEAN[0]) / STD[0])


def test_asymmetric_views_blur_the_first_and_solarise_only_the_second():
    # A bright square on black, no jitter, the whole image kept: blur shows as grey edges,
    # solarisation as a dark centre (1 -> 1 - 1 = 0).
    image = torch.zeros(1, 28, 28)
    image[0, 10:18, 10:18] = 1.0
    first, second = asymmetric_augment(28, grayscale=True, scale=(1.0, 1.0), strength=0.0)
    torch.manual_seed(0)
    views = {"first": [first(image) for _ in range(60)], "second": [second(image) for _ in range(60)]}
    blurred = {k: sum(bool((v - v.round()).abs().max() > 0.05) for v in vs) for k, vs in views.items()}
    solarised = {k: sum(bool(v[0, 14, 14] < 0.5) for v in vs) for k, vs in views.items()}
    # sigma ~ U(0.1, 2): a visible blur for most draws when p=1, rarely when p=0.1.
    assert blurred["first"] >= 35 and blurred["second"] <= 15
    assert solarised["first"] == 0 and 3 <= solarised["second"] <= 25  # p=0.2 of 60


def test_rgb_recipe_on_colour_images(fmnist):
    image = fmnist[3][0].expand(3, 28, 28).clone() * torch.tensor([1.0, 0.5, 0.2])[:, None, None]
    torch.manual_seed(0)
    t = simclr_augment(
        32, grayscale=False, strength=1.0, mean=data.NORMALIZE["cifar10"]["mean"], std=data.NORMALIZE["cifar10"]["std"]
    )
    views = [t(image) for _ in range(20)]
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    # Random grayscale (p=0.2) makes some views colourless: channels equal before normalisation.
    t_plain = simclr_augment(32, grayscale=False, strength=1.0)
    torch.manual_seed(0)
    grey = sum(
        bool(torch.allclose(v[0], v[1]) and torch.allclose(v[1], v[2])) for v in (t_plain(image) for _ in range(40))
    )
    assert 1 <= grey <= 25


def test_multicrop_gives_two_global_and_k_local_crops(fmnist):
    g1, g2, local = dino_augment(28, 12, grayscale=True, mean=MEAN, std=STD)
    ds = MultiCrop(fmnist, g1, g2, local, n_local=3)
    torch.manual_seed(0)
    crops, label = ds[4]
    assert len(crops) == 5 and label == fmnist[4][1]
    assert [tuple(c.shape) for c in crops] == [(1, 28, 28)] * 2 + [(1, 12, 12)] * 3
    assert not torch.equal(crops[2], crops[3])  # local crops are drawn independently
    batch, labels = next(iter(DataLoader(ds, batch_size=4)))
    assert [tuple(c.shape) for c in batch] == [(4, 1, 28, 28)] * 2 + [(4, 1, 12, 12)] * 3
    assert len(MultiCrop(fmnist, g1, g2, None, n_local=0)[0][0]) == 2


def test_input_errors(fmnist):
    with pytest.raises(ValueError, match="img_size=0"):
        simclr_augment(0, grayscale=True)
    with pytest.raises(ValueError, match="scale"):
        simclr_augment(28, grayscale=True, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="blur_p=1.5"):
        simclr_augment(28, grayscale=True, blur_p=1.5)
    with pytest.raises(ValueError, match="given together"):
        simclr_augment(28, grayscale=True, mean=MEAN)
    with pytest.raises(ValueError, match="strength=-1"):
        simclr_augment(28, grayscale=True, strength=-1)
    with pytest.raises(ValueError, match="local_size=32"):
        dino_augment(28, 32, grayscale=True)
    with pytest.raises(ValueError, match="crop_size"):
        local_crop_augment(-4, grayscale=True)
    with pytest.raises(TypeError, match="not callable"):
        TwoViews(fmnist, "crop")
    with pytest.raises(TypeError, match="transform=None"):
        TwoViews(fmnist, None)
    g = simclr_augment(28, grayscale=True)
    with pytest.raises(ValueError, match="need a local_transform"):
        MultiCrop(fmnist, g, g, None, n_local=2)
    with pytest.raises(ValueError, match="n_local=-1"):
        MultiCrop(fmnist, g, g, g, n_local=-1)
