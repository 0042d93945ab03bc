"""Datasets for the book: Fashion-MNIST from local IDX files, CIFAR-10, image folders.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) is read straight from its four IDX files
(LeCun et al.'s MNIST format) with NumPy, so the book runs offline: the files are looked for
in an explicit ``root``, in ``$VITSSL_DATA``, in the Debian package ``dataset-fashion-mnist``
and in a user cache, and only then downloaded with torchvision.

One convention for every dataset here: a sample is ``(image, label)`` where the image is a
float32 tensor (C, H, W) with values in [0, 1]; a ``transform`` receives that tensor, so
``torchvision.transforms.v2`` transforms work unchanged.

Image folders come in two layouts (``folder_split``): ``root/train/<class>/<image>`` with
``root/test``, or ``root/<class>/<image>``, of which every fifth image is a test image. Files are
read by ``read_image``: 16-bit images are scaled by their type's range, and a file that cannot be
decoded or holds non-finite pixels is refused by name.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

# Measured on the 60000 Fashion-MNIST training images (all pixels, scaled to [0, 1]).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Per data set, the ``mean`` and ``std`` of its pixels scaled to [0, 1], one value per channel.
NORMALIZE = {
    "fashion_mnist": {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD},
    "cifar10": {"mean": CIFAR10_MEAN, "std": CIFAR10_STD},
    "imagenet": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}

#: The ten Fashion-MNIST class names, in label order.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: (images, labels) file names per split (``True``: train), without the ".gz" suffix.
FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
ENV_VAR = "VITSSL_DATA"

# IDX type codes (third magic byte) -> big-endian NumPy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Transform = Callable[[torch.Tensor], torch.Tensor]


class DatasetNotFoundError(FileNotFoundError):
    """The data files are in none of the folders searched and could not be downloaded."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain) into a native-endian array of its shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path} is not a valid gzip file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{path} is not an IDX file: magic bytes {raw[:4].hex()!r}; expected "
            f"00 00 <type in {sorted(hex(c) for c in _IDX_DTYPES)}> <ndim >= 1>"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, header needs {header}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(f"{path} is {what}: {len(raw)} bytes, expected {expected} for shape {shape} of {dtype.str}")
    data = np.frombuffer(raw, dtype=dtype, offset=header)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)  # writable copy


def cache_dir() -> Path:
    """The user cache folder for Fashion-MNIST: ``$XDG_CACHE_HOME/vitssl/fashion-mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitssl" / "fashion-mnist"


def fashion_mnist_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for the Fashion-MNIST IDX files, in order."""
    dirs = []
    if root is not None:
        dirs.append(Path(root))
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [Path(env), Path(env) / "FashionMNIST" / "raw"]  # torchvision's layout
    cache = cache_dir()
    dirs += [Path(DEBIAN_DIR), cache, cache / "FashionMNIST" / "raw"]
    return dirs


def _find_split(folder: Path, train: bool) -> tuple[Path, Path] | None:
    """The (images, labels) files of one split in ``folder``, plain or gzip; None if absent."""
    found = []
    for name in FASHION_MNIST_FILES[train]:
        candidates = [folder / name, folder / f"{name}.gz"]  # plain first: no decompression
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _missing_message(dirs: list[Path], train: bool, reason: str) -> str:
    files = ", ".join(f"{n}.gz" for split in (True, False) for n in FASHION_MNIST_FILES[split])
    searched = "\n".join(f"  - {d}" for d in dirs)
    return (
        f"Fashion-MNIST ({'train' if train else 'test'} split) not found. Folders searched:\n"
        f"{searched}\n{reason}\nTo get the data, do one of:\n"
        f"  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
        f"(installs the files in {DEBIAN_DIR});\n"
        f"  - put the four files ({files}, gzip or not) in a folder and set "
        f"{ENV_VAR}=that/folder, or pass root=that/folder;\n"
        f"  - allow torchvision to download them: download=True with network access "
        f"(they go to {cache_dir()})."
    )


def _locate_fashion_mnist(root, train: bool, download: bool) -> tuple[Path, Path]:
    dirs = fashion_mnist_dirs(root)
    for folder in dirs:
        if (hit := _find_split(folder, train)) is not None:
            return hit
    if not download:
        reason = "download=False, so no download was tried."
        raise DatasetNotFoundError(_missing_message(dirs, train, reason))
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    try:  # downloads into cache_dir()/FashionMNIST/raw, which is the last folder searched
        TorchvisionFashionMNIST(root=str(cache_dir()), train=train, download=True)
    except Exception as err:  # no network, proxy, disk full: all end in the same advice
        reason = f"Download with torchvision failed: {type(err).__name__}: {err}"
        raise DatasetNotFoundError(_missing_message(dirs, train, reason)) from err
    hit = _find_split(cache_dir() / "FashionMNIST" / "raw", train)
    if hit is None:
        reason = "torchvision reported success but left no IDX files there."
        raise DatasetNotFoundError(_missing_message(dirs, train, reason))
    return hit


def _check_transform(transform) -> None:
    if transform is not None and not callable(transform):
        raise TypeError(f"transform={transform!r} is not callable; pass a callable or None")


class FashionMNIST(Dataset):
    """Fashion-MNIST held in memory as uint8 (N, 28, 28); items are ((1, 28, 28) float, label).

    ``transform`` receives the float32 (1, 28, 28) tensor in [0, 1], not a PIL image.
    """

    classes = list(FASHION_MNIST_CLASSES)

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        train: bool = True,
        transform: Transform | None = None,
        download: bool = True,
    ) -> None:
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root={root!r} must be a path (str or os.PathLike) or None")
        if not isinstance(train, bool):
            raise TypeError(f"train={train!r} must be a bool (True: 60000 images, False: 10000)")
        if not isinstance(download, bool):
            raise TypeError(f"download={download!r} must be a bool")
        _check_transform(transform)
        images_path, labels_path = _locate_fashion_mnist(root, train, download)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{images_path} holds {images.dtype} {images.shape}; expected uint8 (N, 28, 28)")
        if labels.shape != (len(images),):
            raise ValueError(f"{labels_path} holds shape {labels.shape}; expected ({len(images)},)")
        self.root = images_path.parent
        self.train = train
        self.transform = transform
        self.data = torch.from_numpy(images)  # (N, 28, 28) uint8
        self.targets = torch.from_numpy(labels.astype(np.int64))  # (N,) int64

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.data[index].unsqueeze(0).float().div_(255)  # (1, 28, 28) in [0, 1]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def load_fashion_mnist_tensors(
    train: bool = True, root: str | os.PathLike | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as tensors: images uint8 (N, 28, 28), labels int64 (N,)."""
    ds = FashionMNIST(root=root, train=train, download=download)
    return ds.data, ds.targets


def _to_float() -> list:
    """v2 steps turning a PIL image into a float32 (C, H, W) tensor in [0, 1]."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def cifar10(
    root: str | os.PathLike,
    train: bool = True,
    transform: Transform | None = None,
    download: bool = False,
) -> Dataset:
    """CIFAR-10 via torchvision; items are ((3, 32, 32) float in [0, 1], then transform, label)."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root={root!r} must be a path (str or os.PathLike)")
    if not isinstance(train, bool):
        raise TypeError(f"train={train!r} must be a bool")
    _check_transform(transform)
    from torchvision.datasets import CIFAR10

    steps = _to_float() + ([transform] if transform is not None else [])
    advice = (
        f"CIFAR-10 not found in root={str(root)!r} "
        f"(expected the folder {Path(root) / 'cifar-10-batches-py'}). "
        "Pass download=True with network access, or extract cifar-10-python.tar.gz "
        "(https://www.cs.toronto.edu/~kriz/cifar.html) into that folder."
    )
    if not download and not (Path(root) / "cifar-10-batches-py").is_dir():
        raise DatasetNotFoundError(advice)
    try:
        return CIFAR10(str(root), train=train, transform=v2.Compose(steps), download=download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted"
        raise DatasetNotFoundError(f"{advice} ({type(err).__name__}: {err})") from err


# PIL modes read as numbers rather than 8-bit colours: 16-bit integers, 32-bit integers, 32-bit floats.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# What PIL raises for a file it cannot decode: truncated, not an image, a header that lies, too big.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable(path, err: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable image ({type(err).__name__}: {err}); remove or replace the file")


def read_image(path: str | os.PathLike) -> Image.Image | torch.Tensor:
    """One image file, as ``ImageFolder``'s loader: an RGB PIL image, or a (3, H, W) float tensor in [0, 1].

    8-bit images (any PIL mode) become RGB as torchvision does. 16-bit and 32-bit integer images
    are scaled by the 16-bit range (divided by 65535, whatever the image's own values), float
    images are taken as they are; both become a float tensor, grey repeated over 3 channels.
    Raises ``ValueError`` naming the file if it cannot be decoded (truncated, not an image) or
    holds non-finite pixels or pixels outside the type's range.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in _WIDE_MODES:
                return img.convert("RGB")
            pixels = np.asarray(img, dtype=np.float64)  # (H, W)
            mode = img.mode
    except _UNREADABLE as err:
        raise _unreadable(path, err) from None
    if not np.isfinite(pixels).all():
        raise ValueError(f"{path} holds non-finite pixels (NaN or inf); remove or repair the file")
    if mode != "F":
        pixels = pixels / 65535.0
    if pixels.min() < 0 or pixels.max() > 1:
        what = "float pixels outside [0, 1]" if mode == "F" else f"{mode} pixels outside [0, 65535]"
        raise ValueError(f"{path} holds {what}; save it as an 8-bit or 16-bit image")
    return torch.from_numpy(pixels.astype(np.float32)).unsqueeze(0).repeat(3, 1, 1)  # (3, H, W)


def image_folder(
    root: str | os.PathLike,
    transform: Transform | None = None,
    img_size: int | None = None,
) -> Dataset:
    """``root/<class>/<image>`` via torchvision's ImageFolder; items are ((3, H, W) float, label).

    With ``img_size`` the shorter side is resized to it and the centre square cropped. Images are
    read by ``read_image`` (16-bit ones scaled by their type's range); every file is checked once
    here (16-bit and float ones decoded), so a truncated or fake image or one with non-finite
    pixels is refused, by name, before any training (``ValueError``), as are a root without class
    folders and class folders without images.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root={root!r} must be a path (str or os.PathLike)")
    bad_size = isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0
    if img_size is not None and bad_size:
        raise ValueError(f"img_size={img_size!r} must be a positive int or None")
    _check_transform(transform)
    if not Path(root).is_dir():
        raise DatasetNotFoundError(
            f"root={str(root)!r} is not a folder; image_folder expects root/<class name>/<image files>"
        )
    from torchvision.datasets import ImageFolder

    steps = [v2.ToImage()]
    if img_size is not None:
        steps += [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    steps += [transform] if transform is not None else []
    try:
        folder = ImageFolder(str(root), transform=v2.Compose(steps), loader=read_image)
    except FileNotFoundError as err:  # "Couldn't find any class folder", "Found no valid file for the classes"
        raise ValueError(
            f"{root}: {str(err).split('. Supported')[0]}; an image folder holds <class>/<image> "
            f"(e.g. {Path(root) / 'cat' / '0001.png'})"
        ) from None
    for path, _ in folder.samples:  # the header and chunks of every file, without decoding 8-bit pixels
        try:
            with Image.open(path) as img:
                wide = img.mode in _WIDE_MODES
                img.verify()
        except _UNREADABLE as err:
            raise _unreadable(path, err) from None
        if wide:  # NaN or out-of-range values show only in the decoded pixels
            read_image(path)
    return folder


# The two layouts of folder:PATH. Split: PATH/train/<class>/<image> and PATH/test (or PATH/val).
# Flat: PATH/<class>/<image>, from which every TEST_EVERY-th image (in sorted order) is the test split.
FOLDER_SPLITS = ("train", ("test", "val"))
TEST_EVERY = 5


def folder_split(root: str | os.PathLike, train: bool, img_size: int | None = None) -> Dataset:
    """The training or test split of an image folder in either layout; items are ((3, H, W) float, label).

    ``root/train/<class>/<image>`` with ``root/test/`` or ``root/val/``: that split's folder.
    ``root/<class>/<image>`` (no ``train`` sub-folder): every fifth image, in sorted order, is a
    test image and the other four-fifths train, so ``vitssl pretrain`` and ``vitssl evaluate``
    read the same training images in both layouts. The result has ``classes`` and ``targets``.
    """
    if not isinstance(train, bool):
        raise TypeError(f"train={train!r} must be a bool")
    root = Path(root)
    if (root / "train").is_dir():
        names = ("train",) if train else FOLDER_SPLITS[1]
        split = next((root / n for n in names if (root / n).is_dir()), None)
        if split is None:
            raise ValueError(
                f"{root} holds train/ but neither test/ nor val/; give PATH/train and PATH/test "
                "(each <class>/<image>), or put the classes directly in PATH"
            )
        return image_folder(split, img_size=img_size)
    full = image_folder(root, img_size=img_size)
    keep = [i for i in range(len(full)) if (i % TEST_EVERY == TEST_EVERY - 1) != train]
    if not keep:
        raise ValueError(f"{root} holds {len(full)} image(s): too few for a test split of every {TEST_EVERY}th")
    part = Subset(full, keep)
    part.classes, part.targets = full.classes, [full.targets[i] for i in keep]
    return part


def normalize(dataset_name: str) -> v2.Normalize:
    """The ``v2.Normalize`` with the mean/std of ``dataset_name`` (a key of ``NORMALIZE``)."""
    if not isinstance(dataset_name, str) or dataset_name not in NORMALIZE:
        raise ValueError(f"dataset_name={dataset_name!r} is unknown; allowed: {sorted(NORMALIZE)}")
    stats = NORMALIZE[dataset_name]
    return v2.Normalize(mean=list(stats["mean"]), std=list(stats["std"]))
