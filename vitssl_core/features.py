"""Frozen features of a ViT and the k-nearest-neighbour classifier that reads them.

- ``extract_features``: the class token, the mean of the patch tokens, or both (DINO's
  ``avgpool_patchtokens``), optionally of the last n blocks; ``pixel_features``: raw pixels, the
  baseline every representation must beat.
- Weighted kNN on cosine similarity (Wu et al., 2018; DINO, Caron et al., 2021: k=20, votes
  weighted by exp(sim / 0.07), summed per class), with ``choose_feature`` picking the feature on
  held-out training images and ``KNNMonitor`` watching kNN accuracy and collapse while training.
- The image plumbing the other evaluation modules share: ``prepare_images``, ``image_batches``,
  ``as_dataset``, ``labels_of`` and ``eval_mode``.

Only the backbone's public API is used (``forward_features``, ``get_intermediate_layers``).
Image inputs are uint8 (scaled to [0, 1]) or float tensors (N, H, W) / (N, C, H, W), or a
Dataset of ``(image, label)``; ``normalize={"mean": ..., "std": ...}`` is applied to [0, 1] pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import validate
from .runtime import autocast
from .vit import ViT

__all__ = [
    "FEATURES",
    "extract_features",
    "pixel_features",
    "knn_classify",
    "knn_accuracy",
    "choose_feature",
    "choose_feature_from",
    "feature_view",
    "KNNMonitor",
    "prepare_images",
    "image_batches",
    "as_dataset",
    "labels_of",
    "eval_mode",
]

FEATURES = ("cls", "avg", "cls+avg")
Images = Tensor | Dataset


# --------------------------------------------------------------------------- image plumbing
def prepare_images(x: Tensor, device: torch.device, normalize: dict | None) -> Tensor:
    """A batch of images, uint8 or float, (B, H, W) or (B, C, H, W) -> float (B, C, H, W) on device."""
    if not isinstance(x, Tensor) or x.ndim not in (3, 4):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"images must be a tensor (N, H, W) or (N, C, H, W), got {shape}")
    if x.dtype != torch.uint8 and not x.is_floating_point():  # int64 or bool pixels would pass for [0, 1] floats
        raise TypeError(f"images have dtype {x.dtype}; give uint8 pixels in [0, 255] or float pixels in [0, 1]")
    x = x.to(device).float().div_(255) if x.dtype == torch.uint8 else x.to(device, torch.float32)
    if x.ndim == 3:
        x = x.unsqueeze(1)  # (B, 1, H, W): one grey channel
    if normalize is not None:
        mean = torch.as_tensor(normalize["mean"], dtype=torch.float32, device=device).reshape(-1)
        std = torch.as_tensor(normalize["std"], dtype=torch.float32, device=device).reshape(-1)
        C = x.shape[1]
        if mean.numel() not in (1, C) or std.numel() not in (1, C):
            raise ValueError(
                f"normalize has {mean.numel()} mean and {std.numel()} std value(s) but the images have "
                f"{C} channel(s); give one value per channel ({C}) or one for all"
            )
        x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x


def image_batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    """Raw image batches from a tensor (sliced) or a Dataset of (image, label) (DataLoader, no shuffle)."""
    validate.positive_int("batch_size", batch_size)
    if isinstance(images, Tensor):
        if images.ndim not in (3, 4):
            raise ValueError(f"images must have shape (N, H, W) or (N, C, H, W), got {tuple(images.shape)}")
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
    elif isinstance(images, Dataset):
        for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
            yield batch[0] if isinstance(batch, (list, tuple)) else batch
    else:
        raise TypeError(f"images must be a Tensor or a torch Dataset of (image, label), got {type(images).__name__}")


def as_dataset(name: str, data) -> Dataset:
    """A Dataset, or an (images, labels) pair of tensors wrapped as one."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise ValueError(f"{name}: {len(data[0])} images but {len(data[1])} labels; they must match")
        return TensorDataset(data[0], data[1].long())
    raise TypeError(f"{name} must be a Dataset of (image, label) or an (images, labels) pair of tensors")


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Eval mode and no_grad inside; the caller's train/eval mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def labels_of(ds: Dataset) -> Tensor:
    """The labels (N,) int64 of a Dataset of (image, label): its ``targets``, a Subset's or a TensorDataset's, else read item by item."""
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets).long()
    if isinstance(ds, torch.utils.data.Subset) and hasattr(ds.dataset, "targets"):
        return torch.as_tensor(ds.dataset.targets).long()[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    return torch.tensor([int(item[1]) for item in ds])


# --------------------------------------------------------------------------- features
def extract_features(
    backbone: ViT,
    images: Images,
    feature: str = "cls",
    n_last: int = 1,
    batch_size: int = 256,
    normalize: dict | None = None,
    precision: str = "auto",
) -> Tensor:
    """Frozen features (N, F) float32 on the backbone's device.

    ``feature``: "cls" (class token, F=D; with ``n_last`` > 1 the class tokens of the last
    n blocks concatenated, F=n*D, as DINO's linear eval), "avg" (mean of the last block's
    patch tokens, F=D), "cls+avg" (the two concatenated, DINO's ``avgpool_patchtokens``).
    """
    if feature not in FEATURES:
        raise ValueError(f"feature={feature!r} is not one of {FEATURES}")
    validate.positive_int("n_last", n_last)
    if n_last > len(backbone.blocks):
        raise ValueError(f"n_last={n_last} exceeds the backbone's depth={len(backbone.blocks)}")
    validate.normalize_stats(normalize)
    device = next(backbone.parameters()).device
    out = []
    with eval_mode(backbone):
        for x in image_batches(images, batch_size):
            x = prepare_images(x, device, normalize)
            with autocast(device, precision):  # the package's one precision rule (runtime)
                if n_last == 1:
                    layers = [backbone.forward_features(x)]  # [(B, N, D)]
                else:
                    layers = backbone.get_intermediate_layers(x, n_last)  # n x (B, N, D), normed
            parts = []
            if feature in ("cls", "cls+avg"):
                parts += [t[:, 0] for t in layers]  # n x (B, D)
            if feature in ("avg", "cls+avg"):
                parts.append(layers[-1][:, 1:].mean(dim=1))  # (B, D)
            out.append(torch.cat(parts, dim=-1).float())
    if not out:
        raise ValueError("images is empty; there is nothing to extract features from")
    return torch.cat(out)


def pixel_features(images: Images, batch_size: int = 4096) -> Tensor:
    """Raw pixels as features, (N, C*H*W) float32 in [0, 1]: the baseline for kNN and linear probes."""
    parts = [prepare_images(x, torch.device("cpu"), None).flatten(1) for x in image_batches(images, batch_size)]
    if not parts:
        raise ValueError("images is empty; there is nothing to turn into features")
    return torch.cat(parts)


# --------------------------------------------------------------------------- k-nearest neighbours
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Weighted cosine kNN (DINO): predictions (M,) int64 and vote shares (M, num_classes), rows summing to 1.

    Each of the k most cosine-similar training samples votes for its class with weight
    exp(sim / temperature). The test set is processed ``chunk_size`` rows at a time, so memory
    stays at chunk_size x N_train whatever the test size (1 image works as well as 10000).
    """
    validate.feature_matrix("train_features", train_features)
    validate.feature_matrix("test_features", test_features)
    labels = validate.label_vector("train_labels", train_labels, len(train_features), "train_features")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have {train_features.shape[1]} dims but test_features "
            f"{test_features.shape[1]}; they must match"
        )
    validate.positive_int("k", k)
    if k > len(train_features):
        raise ValueError(f"k={k} is larger than the training set ({len(train_features)} samples)")
    validate.positive_number("temperature", temperature)
    validate.positive_int("chunk_size", chunk_size)
    C = validate.class_count(labels, num_classes)
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)  # (N, F) unit rows: dot product = cosine
    labels = labels.to(device)
    preds, scores = [], []
    for start in range(0, len(test_features), chunk_size):
        q = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)  # (c, F)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (c, k) each
        # exp((sim - max) / T) is exp(sim / T) up to a per-row factor: same vote, no overflow at small T.
        w = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(q), C, device=device).scatter_add_(1, labels[idx], w)  # (c, C)
        votes = votes / votes.sum(dim=1, keepdim=True)
        preds.append(votes.argmax(dim=1))
        scores.append(votes)
    if not preds:
        return torch.empty(0, dtype=torch.long, device=device), torch.empty(0, C, device=device)
    return torch.cat(preds), torch.cat(scores)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in percent of ``knn_classify`` on (test_features, test_labels)."""
    validate.feature_matrix("train_features", train_features)
    validate.feature_matrix("test_features", test_features)
    train_labels = validate.label_vector("train_labels", train_labels, len(train_features), "train_features")
    test_labels = validate.label_vector("test_labels", test_labels, len(test_features), "test_features")
    if len(train_labels) == 0:
        raise ValueError("train_features is empty; there are no neighbours to vote")
    if len(test_labels) == 0:
        raise ValueError("test_features is empty; accuracy is undefined")
    if num_classes is None:
        num_classes = max(int(train_labels.max()), int(test_labels.max())) + 1
    preds, _ = knn_classify(train_features, train_labels, test_features, k, temperature, num_classes, chunk_size)
    return 100.0 * (preds.cpu() == test_labels.cpu()).float().mean().item()


def choose_feature(
    backbone: ViT,
    images: Images,
    labels: Tensor | None = None,
    validation: int = 5000,
    normalize: dict | None = None,
    k: int = 20,
    temperature: float = 0.07,
    precision: str = "auto",
    batch_size: int = 256,
) -> tuple[str, dict[str, float]]:
    """(best feature, {feature: kNN top-1 %}): which of ``FEATURES`` the probes should read, chosen on training data.

    The last ``validation`` images are held out and classified by weighted kNN (``knn_accuracy``,
    k = min(k, the rest)) against the features of all the images before them; the feature
    with the best accuracy wins (ties go to the first of "cls", "avg", "cls+avg"). Give training
    images only: the test set must play no part in a choice that is then measured on it.
    ``labels`` (N,) may be left out for a Dataset of (image, label).
    """
    if labels is None:
        if not isinstance(images, Dataset):
            raise ValueError("labels is needed when images is a tensor")
        labels = labels_of(images)
    n = len(images)
    labels = validate.label_vector("labels", labels, n, "images")
    validate.positive_int("validation", validation)
    if validation >= n:
        raise ValueError(
            f"validation={validation} leaves none of the {n} images to classify them by; "
            f"hold out fewer (e.g. {max(1, n // 5)})"
        )
    both = extract_features(
        backbone, images, "cls+avg", batch_size=batch_size, normalize=normalize, precision=precision
    )  # (N, 2D): the class token, then the patch mean
    return choose_feature_from(both, labels, validation, k=k, temperature=temperature)


class KNNMonitor:
    """An epoch-end monitor for ``train(..., epoch_end=monitor)``: kNN accuracy and collapse signal while training.

    Every ``every``-th epoch it reads the class token of ``backbone`` (the one the method exports;
    DINO's teacher) for training images only, in eval mode under ``no_grad`` (its mode restored
    after), and returns

    - ``knn_top1``: weighted kNN top-1 in % (k = 20, T = 0.07, ``knn_accuracy``) of the last
      ``val`` images of ``dataset`` (at most a fifth of it) against up to ``bank`` images before them;
    - ``embedding_std``: the standard deviation over those ``val`` images of the l2-normalised
      embeddings (N, D), averaged over the D dimensions (lightly's collapse signal). It falls
      towards 0 at collapse; features are anisotropic, so compare it with random weights, not 1/sqrt(D).

    Other epochs return None. The images are read from ``dataset`` (of (image, label), no
    augmentation) at the first call, not before, so building a monitor draws nothing from any RNG.
    Raises ValueError when ``dataset`` has fewer than 5 images.
    """

    def __init__(
        self,
        backbone: ViT,
        dataset: Dataset,
        every: int = 1,
        val: int = 2000,
        bank: int = 10000,
        normalize: dict | None = None,
        precision: str = "auto",
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 256,
    ):
        for name, value in (("every", every), ("val", val), ("bank", bank), ("k", k), ("batch_size", batch_size)):
            validate.positive_int(name, value)
        validate.normalize_stats(normalize)
        n = len(dataset)
        self.val = min(val, n // 5)
        if self.val == 0:
            raise ValueError(f"dataset has {n} images; the kNN monitor holds out a fifth and needs at least 5")
        self.bank = min(bank, n - self.val)
        self.backbone, self.dataset, self.every = backbone, dataset, every
        self.normalize, self.precision, self.k, self.temperature = normalize, precision, k, temperature
        self.batch_size = batch_size
        self._data: tuple[Tensor, Tensor] | None = None  # (images, labels): the bank, then the queries

    def _images(self) -> tuple[Tensor, Tensor]:
        if self._data is None:
            n = len(self.dataset)
            idx = [*range(self.bank), *range(n - self.val, n)]
            items = [self.dataset[i] for i in idx]
            self._data = torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items])
        return self._data

    def __call__(self, epoch: int) -> dict[str, float] | None:
        """{"knn_top1", "embedding_std"} after epoch ``epoch`` (epochs done) when ``every`` divides it, else None."""
        if epoch % self.every:
            return None
        images, labels = self._images()
        f = extract_features(
            self.backbone, images, "cls", batch_size=self.batch_size, normalize=self.normalize, precision=self.precision
        )  # (bank + val, D), eval mode and no_grad inside
        bank, queries = f[: self.bank], f[self.bank :]
        top1 = knn_accuracy(
            bank,
            labels[: self.bank],
            queries,
            labels[self.bank :],
            k=min(self.k, self.bank),
            temperature=self.temperature,
            num_classes=int(labels.max()) + 1,
        )
        spread = F.normalize(queries.float(), dim=1).std(dim=0).mean().item()  # mean over D of the std over images
        return {"knn_top1": round(top1, 2), "embedding_std": round(spread, 5)}


def feature_view(both: Tensor, feature: str) -> Tensor:
    """The columns of ``feature`` (one of ``FEATURES``) in "cls+avg" features (N, 2D): class token, then patch mean."""
    if feature not in FEATURES:
        raise ValueError(f"feature={feature!r} is not one of {FEATURES}")
    if not isinstance(both, Tensor) or both.ndim != 2 or both.shape[1] % 2:
        raise ValueError(f"both must be (N, 2D) 'cls+avg' features, got {getattr(both, 'shape', type(both))}")
    dim = both.shape[1] // 2
    return {"cls": both[:, :dim], "avg": both[:, dim:], "cls+avg": both}[feature]


def choose_feature_from(
    both: Tensor, labels: Tensor, validation: int, k: int = 20, temperature: float = 0.07
) -> tuple[str, dict[str, float]]:
    """``choose_feature`` on "cls+avg" features (N, 2D) already extracted: the last ``validation``
    rows are classified by weighted kNN against the rows before them, per feature."""
    n = len(both)
    labels = validate.label_vector("labels", labels, n, "both")
    validate.positive_int("validation", validation)
    if validation >= n:
        raise ValueError(f"validation={validation} leaves none of the {n} rows to classify them by")
    fit, held_out = slice(0, n - validation), slice(n - validation, None)
    y = labels.to(both.device)
    k = min(k, n - validation)
    scores = {}
    for name in FEATURES:
        f = feature_view(both, name)
        scores[name] = knn_accuracy(f[fit], y[fit], f[held_out], y[held_out], k=k, temperature=temperature)
    return max(scores, key=scores.get), scores
