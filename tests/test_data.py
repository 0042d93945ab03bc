"""Tests for vitssl_core.data: the IDX reader, Fashion-MNIST search and loading, constants."""

import gzip
import struct

import numpy as np
import pytest
import torch

from vitssl_core import data


def write_idx(path, array, code, compress):
    """Write ``array`` as an IDX file by hand (big-endian header and data)."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_fake_split(folder, n_train=5, n_test=3, compress=True):
    """The four Fashion-MNIST files with small random content; returns the train arrays."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    out = {}
    for train, n in ((True, n_train), (False, n_test)):
        images_name, labels_name = data.FASHION_MNIST_FILES[train]
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        write_idx(folder / f"{images_name}{suffix}", images, 0x08, compress)
        write_idx(folder / f"{labels_name}{suffix}", labels, 0x08, compress)
        out[train] = (images, labels)
    return out


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Every default search folder points at an empty temporary folder."""
    monkeypatch.delenv("VITSSL_DATA", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")
    return tmp_path


# --- read_idx ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip_uint8(tmp_path, compress):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 7], dtype=np.uint8)
    got_images = data.read_idx(write_idx(tmp_path / "img", images, 0x08, compress))
    got_labels = data.read_idx(write_idx(tmp_path / "lbl", labels, 0x08, compress))
    assert got_images.dtype == np.uint8 and got_images.shape == (4, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    got_images[0, 0, 0] = 1  # the result is a writable array, safe for torch.from_numpy


@pytest.mark.parametrize("dtype,code", [(np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)])
def test_read_idx_big_endian_types(tmp_path, dtype, code):
    array = np.array([[1, -2, 300], [70000 if dtype != np.int16 else 7000, 5, -6]], dtype=dtype)
    got = data.read_idx(write_idx(tmp_path / "x", array, code, compress=False))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_read_idx_corrupt_magic(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((2, 3), np.uint8), 0x08, compress=False)
    raw = bytearray(path.read_bytes())
    raw[0] = 0x12
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(path)
    path.write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]))  # unknown type code
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(path)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_truncated_or_padded(tmp_path, compress):
    payload = write_idx(tmp_path / "x", np.ones((3, 28, 28), np.uint8), 0x08, False).read_bytes()
    for bad, word in ((payload[:-10], "truncated"), (payload[:9], "truncated"), (payload + b"\0", "longer")):
        path = tmp_path / "bad"
        path.write_bytes(gzip.compress(bad) if compress else bad)
        with pytest.raises(ValueError, match=word):
            data.read_idx(path)


def test_read_idx_broken_gzip(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.ones((100, 28, 28), np.uint8), 0x08, compress=True)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="gzip"):
        data.read_idx(path)


# --- search and errors (fake data, no real files needed) --------------------------------


def test_search_order_and_plain_files(isolated, monkeypatch):
    env_dir = isolated / "env"
    written = write_fake_split(env_dir / "FashionMNIST" / "raw", compress=False)
    monkeypatch.setenv("VITSSL_DATA", str(env_dir))
    ds = data.FashionMNIST(download=False)  # found in torchvision's layout under VITSSL_DATA
    assert ds.root == env_dir / "FashionMNIST" / "raw"
    torch.testing.assert_close(ds.data, torch.from_numpy(written[True][0]))
    assert ds.targets.dtype == torch.int64
    # An explicit root comes before $VITSSL_DATA.
    other = write_fake_split(isolated / "explicit", n_train=7)
    ds = data.FashionMNIST(root=isolated / "explicit", download=False)
    assert ds.root == isolated / "explicit" and len(ds) == 7
    torch.testing.assert_close(ds.targets, torch.from_numpy(other[True][1]).long())
    dirs = data.fashion_mnist_dirs(isolated / "explicit")
    assert dirs[:3] == [isolated / "explicit", env_dir, env_dir / "FashionMNIST" / "raw"]
    assert dirs[3] == isolated / "debian" and dirs[4] == isolated / "cache"


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / "vitssl" / "fashion-mnist"


def test_missing_data_error_says_how_to_get_it(isolated, monkeypatch):
    (isolated / "empty_root").mkdir()
    (isolated / "empty_env").mkdir()
    monkeypatch.setenv("VITSSL_DATA", str(isolated / "empty_env"))
    with pytest.raises(FileNotFoundError) as info:
        data.FashionMNIST(root=isolated / "empty_root", download=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "VITSSL_DATA" in message
    for folder in ("empty_root", "empty_env", "debian", "cache"):
        assert str(isolated / folder) in message
    assert isinstance(info.value, data.DatasetNotFoundError)


def test_failed_download_is_reported(isolated, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(data.DatasetNotFoundError, match="network is unreachable") as info:
        data.FashionMNIST(download=True)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"train": "yes"}, TypeError),
        ({"train": 1}, TypeError),
        ({"transform": 3}, TypeError),
        ({"root": 5}, TypeError),
        ({"download": None}, TypeError),
    ],
)
def test_fashion_mnist_bad_arguments(isolated, kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        data.FashionMNIST(**kwargs)


def test_normalize():
    norm = data.normalize("cifar10")
    x = torch.rand(3, 4, 4)
    expected = (x - torch.tensor(data.CIFAR10_MEAN)[:, None, None]) / torch.tensor(data.CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(norm(x), expected)
    assert set(data.NORMALIZE) == {"fashion_mnist", "cifar10", "imagenet"}
    with pytest.raises(ValueError, match="allowed.*cifar10"):
        data.normalize("mnist")
    with pytest.raises(ValueError, match="dataset_name"):
        data.normalize(None)


def test_cifar10_missing_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        data.cifar10(tmp_path)
    with pytest.raises(TypeError, match="train"):
        data.cifar10(tmp_path, train="no")


def test_image_folder_gives_float_tensors(tmp_path):
    from PIL import Image

    for i, name in enumerate(("cat", "dog")):
        (tmp_path / name).mkdir()
        pixels = np.full((20, 30, 3), 255 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name / "a.png")
    ds = data.image_folder(tmp_path, img_size=16)
    image, label = ds[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert label == 1 and torch.allclose(image, torch.ones_like(image))
    assert ds.classes == ["cat", "dog"]
    ds = data.image_folder(tmp_path, transform=lambda x: x * 2)
    assert ds[1][0].shape == (3, 20, 30) and ds[1][0].max() == 2
    with pytest.raises(ValueError, match="img_size"):
        data.image_folder(tmp_path, img_size=0)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.image_folder(tmp_path / "nope")


# --- the real Fashion-MNIST -------------------------------------------------------------


@pytest.fixture(scope="module")
def real(needs_fashion_mnist):
    """The folder that holds the real Fashion-MNIST (conftest's rule: skip locally, fail in CI)."""
    return needs_fashion_mnist


@pytest.fixture(scope="module")
def train_set(real):
    return data.FashionMNIST(root=real, train=True, download=False)


@pytest.fixture(scope="module")
def test_set(real):
    return data.FashionMNIST(root=real, train=False, download=False)


def test_real_train_and_test_sets(train_set, test_set, real):
    assert len(train_set) == 60000 and len(test_set) == 10000
    assert train_set.data.shape == (60000, 28, 28) and train_set.data.dtype == torch.uint8
    assert train_set.root == real
    image, label = train_set[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5
    assert label == 9 and train_set.classes[label] == "Ankle boot"
    assert len(train_set.classes) == 10
    assert torch.bincount(train_set.targets).tolist() == [6000] * 10
    assert torch.bincount(test_set.targets).tolist() == [1000] * 10


def test_real_via_env_and_default_search(monkeypatch, real):
    monkeypatch.setenv("VITSSL_DATA", str(real))
    ds = data.FashionMNIST(train=False, download=False)
    assert ds.root == real and len(ds) == 10000
    monkeypatch.delenv("VITSSL_DATA")
    images, labels = data.load_fashion_mnist_tensors(train=False)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    torch.testing.assert_close(images, ds.data)


def test_real_transform_is_applied_per_sample(train_set, real):
    calls = []

    def flip(x):
        calls.append(x.shape)
        return x.flip(-1)

    ds = data.FashionMNIST(root=real, train=False, transform=flip, download=False)
    plain = data.FashionMNIST(root=real, train=False, download=False)
    for i in (0, 5):
        image, label = ds[i]
        torch.testing.assert_close(image, plain[i][0].flip(-1))
        assert label == plain[i][1]
    assert calls == [(1, 28, 28), (1, 28, 28)]
    normalized, _ = data.FashionMNIST(
        root=real, train=False, transform=data.normalize("fashion_mnist"), download=False
    )[0]
    torch.testing.assert_close(normalized, (plain[0][0] - data.FASHION_MNIST_MEAN[0]) / data.FASHION_MNIST_STD[0])


def test_real_mean_std_match_constants(train_set):
    pixels = train_set.data.double() / 255
    assert abs(pixels.mean().item() - data.FASHION_MNIST_MEAN[0]) < 1e-3
    assert abs(pixels.std().item() - data.FASHION_MNIST_STD[0]) < 1e-3
    assert data.NORMALIZE["fashion_mnist"] == {"mean": data.FASHION_MNIST_MEAN, "std": data.FASHION_MNIST_STD}


# --- images read right or refused (issue 23) ---------------------------------------------
def test_16_bit_images_are_scaled_by_their_types_range_not_saturated(tmp_path):
    from PIL import Image

    values = np.array([[0, 130 * 257], [65535, 1000]], dtype=np.uint16)  # 130 * 257 is 8-bit 130
    Image.fromarray(values).save(tmp_path / "u16.png")
    assert Image.open(tmp_path / "u16.png").mode == "I;16"
    image = data.read_image(tmp_path / "u16.png")
    assert image.shape == (3, 2, 2) and image.dtype == torch.float32
    expected = torch.from_numpy(values.astype(np.float32) / 65535)
    assert all(torch.equal(image[c], expected) for c in range(3))
    assert image[0, 0, 1] * 255 == pytest.approx(130)  # PIL's convert("RGB") gives 255 here


def test_non_finite_out_of_range_and_corrupt_images_are_refused_by_name(tmp_path):
    from PIL import Image

    for name, values in (("nan", [[0.5, np.nan]]), ("inf", [[np.inf, 0.0]]), ("big", [[0.5, 3.0]])):
        Image.fromarray(np.array(values, dtype=np.float32)).save(tmp_path / f"{name}.tiff")
    Image.fromarray(np.array([[0.25, 1.0]], dtype=np.float32)).save(tmp_path / "ok.tiff")
    assert torch.equal(data.read_image(tmp_path / "ok.tiff")[0], torch.tensor([[0.25, 1.0]]))
    with pytest.raises(ValueError, match=r"nan\.tiff holds non-finite pixels"):
        data.read_image(tmp_path / "nan.tiff")
    with pytest.raises(ValueError, match=r"inf\.tiff holds non-finite pixels"):
        data.read_image(tmp_path / "inf.tiff")
    with pytest.raises(ValueError, match=r"big\.tiff holds float pixels outside \[0, 1\]"):
        data.read_image(tmp_path / "big.tiff")
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"fake\.png is not a readable image \(UnidentifiedImageError"):
        data.read_image(tmp_path / "fake.png")


def write_pngs(root, per_class, classes=("cat", "dog")):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 10 * i + c, np.uint8)).save(root / name / f"{i:02d}.png")


def test_image_folder_checks_every_file_before_training(tmp_path):
    write_pngs(tmp_path / "ok", 3)
    raw = (tmp_path / "ok" / "dog" / "02.png").read_bytes()
    (tmp_path / "ok" / "dog" / "02.png").write_bytes(raw[: len(raw) // 2])  # never read until the last item
    with pytest.raises(ValueError, match=r"dog/02\.png is not a readable image"):
        data.image_folder(tmp_path / "ok")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="Found no valid file for the classes cat; an image folder holds"):
        data.image_folder(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes((tmp_path / "ok" / "cat" / "00.png").read_bytes())
    with pytest.raises(ValueError, match="Couldn't find any class folder"):
        data.image_folder(tmp_path / "flat")


def test_folder_split_reads_both_layouts_alike(tmp_path):
    write_pngs(tmp_path / "flat", 10)
    train, test = data.folder_split(tmp_path / "flat", True), data.folder_split(tmp_path / "flat", False)
    assert (len(train), len(test)) == (16, 4) and train.classes == test.classes == ["cat", "dog"]
    assert train.targets == [0] * 8 + [1] * 8 and test.targets == [0, 0, 1, 1]
    pixel = lambda ds, i: int(round(ds[i][0][0, 0, 0].item() * 255))  # noqa: E731  (10 * index + class)
    assert [pixel(test, i) for i in range(4)] == [40, 90, 41, 91]  # every fifth image: 04, 09 of each class
    assert 40 not in [pixel(train, i) for i in range(16)]  # no test image trains
    write_pngs(tmp_path / "split" / "train", 4)
    write_pngs(tmp_path / "split" / "val", 2)
    train, test = data.folder_split(tmp_path / "split", True), data.folder_split(tmp_path / "split", False)
    assert (len(train), len(test)) == (8, 4) and train.classes == ["cat", "dog"]
    (tmp_path / "split" / "val").rename(tmp_path / "split" / "elsewhere")
    with pytest.raises(ValueError, match="holds train/ but neither test/ nor val/"):
        data.folder_split(tmp_path / "split", False)
