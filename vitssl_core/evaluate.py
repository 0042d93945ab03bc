"""Downstream evaluation of a frozen or fine-tuned ViT, and pictures of what it attends to.

The protocols are the ones self-supervised papers report:

- weighted k-nearest neighbours on frozen features (Wu et al., 2018; DINO, Caron et al., 2021:
  cosine similarity, k=20, votes weighted by exp(sim / 0.07), summed per class);
- a linear probe on frozen features (MAE, He et al., 2022: BatchNorm without affine
  parameters in front of one linear layer);
- end-to-end fine-tuning (BEiT / MAE recipe: AdamW, layer-wise learning-rate decay 0.75,
  stochastic depth, label smoothing, optional MixUp / CutMix, warm-up then cosine);
- label efficiency: the same probes on class-balanced 1 % / 10 % / 100 % label subsets, with
  raw pixels as the baseline any pre-training must beat.

Interpretability: the class token's last-layer attention per head (DINO, Fig. 1/3), a PCA of
patch features shown as colours (DINOv2, Oquab et al., 2024, Fig. 1), and the mean attention
distance per layer and head (Dosovitskiy et al., 2021, Fig. 7).

Only the backbone's public API is used (``forward_features``, ``get_intermediate_layers``,
``get_last_selfattention``, ``get_selfattentions``, ``reset_classifier``, ``blocks``), except
that ``finetune`` sets the stochastic-depth rate of the copy's ``DropPath`` modules.
Image inputs are uint8 (scaled to [0, 1]) or float tensors (N, H, W) / (N, C, H, W), or a
Dataset of ``(image, label)``; ``normalize={"mean": ..., "std": ...}`` is applied to [0, 1] pixels.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2
from tqdm import tqdm

from . import data
from .augment import _check_scale
from .batch_augment import crop_boxes, resized_crop
from .runtime import autocast
from .schedules import cosine_schedule, decays
from .vit import DropPath, ViT

__all__ = [
    "extract_features",
    "pixel_features",
    "knn_classify",
    "knn_accuracy",
    "choose_feature",
    "KNNMonitor",
    "linear_probe",
    "layer_decay_param_groups",
    "finetune",
    "mcnemar",
    "correct_to_hex",
    "correct_from_hex",
    "class_balanced_subset",
    "label_efficiency",
    "attention_maps",
    "attention_distance",
    "pca_rgb",
    "run_protocol",
]

FEATURES = ("cls", "avg", "cls+avg")
PROTOCOLS = ("knn", "linear", "finetune", "label_efficiency")
Images = Tensor | Dataset


# --------------------------------------------------------------------------- checks and plumbing
def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")


def _check_positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a number > 0")


def _check_unit(name: str, value, hi_open: bool = True) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and 0.0 <= value
        and (value < 1.0 if hi_open else value <= 1.0)
    )
    if not ok:
        raise ValueError(f"{name}={value!r} must be a number in [0, {'1)' if hi_open else '1]'}")


def _check_features(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a float tensor of shape (N, F), got {type(x).__name__}")
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape (N, F), got {x.dtype} {tuple(x.shape)}")


def _check_labels(name: str, labels, n: int, feat_name: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape (N,), got {type(labels).__name__}")
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"{name} must be an integer tensor of shape (N,), got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries but {feat_name} has {n} rows; they must match")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} holds a negative label {int(labels.min())}; labels must be 0..num_classes-1")
    return labels.long()


def _num_classes(labels: Tensor, num_classes: int | None) -> int:
    top = int(labels.max()) + 1 if len(labels) else 0
    if num_classes is None:
        return top
    _check_positive_int("num_classes", num_classes)
    if top > num_classes:
        raise ValueError(f"num_classes={num_classes} but the labels go up to {top - 1}")
    return num_classes


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_normalize(normalize) -> None:
    if normalize is None:
        return
    if not isinstance(normalize, dict) or set(normalize) != {"mean", "std"}:
        raise ValueError(f"normalize={normalize!r} must be None or a dict with keys 'mean' and 'std'")
    for key in ("mean", "std"):  # a std of 0 or NaN turns every image into inf or NaN: chance-level scores
        try:
            values = torch.as_tensor(normalize[key], dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"normalize[{key!r}]={normalize[key]!r} must be a number or a list of numbers") from None
        if values.numel() == 0 or not torch.isfinite(values).all() or (key == "std" and (values <= 0).any()):
            allowed = "finite numbers > 0" if key == "std" else "finite numbers"
            raise ValueError(f"normalize[{key!r}]={normalize[key]!r} must be one or more {allowed}")


def _prepare(x: Tensor, device: torch.device, normalize: dict | None) -> Tensor:
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


def _batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    """Raw image batches from a tensor (sliced) or a Dataset of (image, label) (DataLoader, no shuffle)."""
    _check_positive_int("batch_size", batch_size)
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


def _as_dataset(name: str, data) -> Dataset:
    """A Dataset, or an (images, labels) pair of tensors wrapped as one."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise ValueError(f"{name}: {len(data[0])} images but {len(data[1])} labels; they must match")
        return TensorDataset(data[0], data[1].long())
    raise TypeError(f"{name} must be a Dataset of (image, label) or an (images, labels) pair of tensors")


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode and no_grad inside; the caller's train/eval mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device, small: bool = True):
    """One intra-op thread inside, for ``small`` work on the CPU: a probe's (B, F) x (F, C) matmuls
    gain nothing from threads, and on a busy 2-core machine synchronising them made each step
    ~10x slower. The caller's thread count is restored afterwards."""
    if device.type != "cpu" or not small:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    _check_positive_int("n_last", n_last)
    if n_last > len(backbone.blocks):
        raise ValueError(f"n_last={n_last} exceeds the backbone's depth={len(backbone.blocks)}")
    _check_normalize(normalize)
    device = _device_of(backbone)
    out = []
    with _eval_mode(backbone):
        for x in _batches(images, batch_size):
            x = _prepare(x, device, normalize)
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
    parts = [_prepare(x, torch.device("cpu"), None).flatten(1) for x in _batches(images, batch_size)]
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
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    labels = _check_labels("train_labels", train_labels, len(train_features), "train_features")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have {train_features.shape[1]} dims but test_features "
            f"{test_features.shape[1]}; they must match"
        )
    _check_positive_int("k", k)
    if k > len(train_features):
        raise ValueError(f"k={k} is larger than the training set ({len(train_features)} samples)")
    _check_positive_float("temperature", temperature)
    _check_positive_int("chunk_size", chunk_size)
    C = _num_classes(labels, num_classes)
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
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    train_labels = _check_labels("train_labels", train_labels, len(train_features), "train_features")
    test_labels = _check_labels("test_labels", test_labels, len(test_features), "test_features")
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
        labels = _labels_of(images)
    n = len(images)
    labels = _check_labels("labels", labels, n, "images")
    _check_positive_int("validation", validation)
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
            _check_positive_int(name, value)
        _check_normalize(normalize)
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
    labels = _check_labels("labels", labels, n, "both")
    _check_positive_int("validation", validation)
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


# --------------------------------------------------------------------------- linear probe
def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    batchnorm: bool = True,
    optimizer: str = "adamw",
    num_classes: int | None = None,
    seed: int = 0,
    return_correct: bool = False,
) -> dict[str, float]:
    """A linear classifier on frozen features: {"top1": test %, "train_top1": train %, "loss": last epoch}.

    ``return_correct=True`` adds "correct": a bool tensor (M,), whether each test image was
    classified right (for paired comparisons, ``mcnemar``).

    MAE's probe: BatchNorm1d without affine parameters (it only standardises the features)
    then one Linear layer. Its mean and variance are those of the whole training set, computed
    once (what MAE's batch statistics estimate), so each step costs one small matmul: 60000 x
    192 features probe for 100 epochs in seconds on a CPU. The optimiser is AdamW by default
    (lr 1e-3, no weight decay: converges in a few dozen epochs), or "sgd" (momentum 0.9, DINO's
    linear eval; give it a larger lr, e.g. 0.1). Cosine lr schedule to 0, shuffled mini-batches.
    ``weight_decay`` applies to the weight, not the bias (``schedules.decays``, every loop's rule).
    """
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    y_train = _check_labels("train_labels", train_labels, len(train_features), "train_features")
    y_test = _check_labels("test_labels", test_labels, len(test_features), "test_features")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have {train_features.shape[1]} dims but test_features "
            f"{test_features.shape[1]}; they must match"
        )
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        _check_positive_int(name, v)
    _check_positive_float("lr", lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be a number >= 0")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer={optimizer!r} is not one of ('adamw', 'sgd')")
    n = len(train_features)
    if n < 2 and batchnorm:
        raise ValueError(f"the training set has {n} sample(s); standardising needs at least 2 (or batchnorm=False)")
    if len(y_test) == 0:
        raise ValueError("test_features is empty; accuracy is undefined")
    C = _num_classes(torch.cat([y_train, y_test]), num_classes)
    device, dim = train_features.device, train_features.shape[1]
    x_train, y_train = train_features.float(), y_train.to(device)
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device) if batchnorm else nn.Identity()
    if batchnorm:  # the statistics MAE's BatchNorm converges to, computed once: no BN cost per step
        norm.running_mean.copy_(x_train.mean(dim=0))
        norm.running_var.copy_(x_train.var(dim=0))
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        linear = nn.Linear(dim, C).to(device)
        nn.init.trunc_normal_(linear.weight, std=0.01)  # MAE's probe init
        nn.init.zeros_(linear.bias)
    probe = nn.Sequential(norm, linear).eval()
    with torch.no_grad():
        z_train = norm(x_train)  # (N, F) standardised once; only the linear layer trains
    groups = [
        {
            "params": [p for n, p in linear.named_parameters() if decays(n, p) == d],
            "weight_decay": weight_decay if d else 0.0,
        }
        for d in (True, False)
    ]  # the package's rule: no bias decay
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    bs = min(batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    schedule = cosine_schedule(lr, 0.0, epochs * steps_per_epoch).tolist()
    gen = torch.Generator().manual_seed(seed)
    step, loss_sum = 0, 0.0
    with _one_cpu_thread(device, small=dim * C <= 65536):
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            z, y = z_train[perm], y_train[perm]  # one shuffle per epoch, then contiguous slices (views)
            loss_sum = 0.0
            for start in range(0, n, bs):
                for group in opt.param_groups:
                    group["lr"] = schedule[step]
                step += 1
                loss = F.cross_entropy(linear(z[start : start + bs]), y[start : start + bs])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(y[start : start + bs])
    with _eval_mode(probe):

        def hits(x: Tensor, y: Tensor) -> Tensor:
            preds = torch.cat([probe(x[i : i + 8192].to(device).float()).argmax(1) for i in range(0, len(x), 8192)])
            return preds.cpu() == y.cpu()

        correct = hits(test_features, y_test)
        out = {
            "top1": 100.0 * correct.float().mean().item(),
            "train_top1": 100.0 * hits(x_train, y_train).float().mean().item(),
            "loss": float(loss_sum) / n,
        }
    if return_correct:
        out["correct"] = correct
    return out


# --------------------------------------------------------------------------- fine-tuning
def _layer_id(name: str, depth: int) -> int:
    """BEiT/MAE layer ids: patch_embed, cls_token, pos_embed -> 0; blocks.i -> i+1; the rest -> depth+1."""
    if match := re.search(r"(?:^|\.)blocks\.(\d+)\.", name):
        return int(match.group(1)) + 1
    if re.search(r"(?:^|\.)(patch_embed|cls_token|pos_embed|mask_token)(?:\.|$)", name):
        return 0
    return depth + 1


def layer_decay_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    layer_decay: float = 0.75,
) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (BEiT): lr = base_lr * layer_decay ** (depth + 1 - id).

    Layer ids: patch_embed / cls_token / pos_embed 0, block i is i + 1, the final norm and head
    depth + 1 (full lr). Weight decay follows the trainer's rule (``schedules.decays``): none for
    1-D parameters, biases, pos_embed, cls_token, mask_token and the model's ``no_weight_decay()``.
    Each group carries ``lr_scale`` (to re-apply a schedule), ``layer_id`` and ``param_names``.
    """
    if not hasattr(model, "blocks"):
        raise TypeError(f"model must have a .blocks list of Transformer blocks (a ViT), got {type(model).__name__}")
    _check_positive_float("base_lr", base_lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be a number >= 0")
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay={layer_decay!r} must be in (0, 1] (1 disables the decay)")
    depth = len(model.blocks)
    exempt = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # e.g. a frozen sin-cos pos_embed
            continue
        lid, decay = _layer_id(name, depth), decays(name, param, exempt)  # the trainer's weight-decay rule
        scale = layer_decay ** (depth + 1 - lid)
        group = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "param_names": [],
                "lr": base_lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "layer_id": lid,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def _correct(model: nn.Module, dataset: Dataset, batch_size: int, normalize, precision: str) -> Tensor:
    """(M,) bool: whether ``model`` classifies each image of ``dataset`` right."""
    device, hits = _device_of(model), []
    with _eval_mode(model):
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            with autocast(device, precision):  # the package's one precision rule (runtime)
                logits = model(_prepare(x, device, normalize))
            hits.append(logits.argmax(1).cpu() == torch.as_tensor(y))
    if not hits:
        raise ValueError("test_set is empty; accuracy is undefined")
    return torch.cat(hits)


def _finetune_copy(backbone: ViT, num_classes: int, drop_path: float) -> ViT:
    """A deep copy with a new ``num_classes`` head, a trainable pos_embed and stochastic depth 0 -> drop_path."""
    model = copy.deepcopy(backbone)
    model.reset_classifier(num_classes)
    model.pos_embed.requires_grad_(True)
    depth = len(model.blocks)
    for i, blk in enumerate(model.blocks):  # stochastic depth 0 -> drop_path over the blocks (timm's rule)
        for m in blk.modules():
            if isinstance(m, DropPath):
                m.drop_prob = drop_path * i / max(depth - 1, 1)
    return model


def _batch_mixer(mixup: float, cutmix: float, num_classes: int):
    """MixUp / CutMix on a whole batch, (images, int labels) -> (mixed images, soft labels); None if both are 0."""
    mixers = ([v2.MixUp(alpha=float(mixup), num_classes=num_classes)] if mixup > 0 else []) + (
        [v2.CutMix(alpha=float(cutmix), num_classes=num_classes)] if cutmix > 0 else []
    )
    return v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)


def _finetune_augment(crop_scale: tuple[float, float] | None, mix):
    """(x, y) -> (x, y): a random resized crop and flip per image (if ``crop_scale``), then ``mix`` (if any)."""

    def augment(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if crop_scale is not None:  # crop and flip commute with the per-channel normalisation
            B, _, H, W = x.shape
            x = resized_crop(x, crop_boxes(B, H, W, crop_scale, x.device), H, torch.rand(B, device=x.device) < 0.5)
        if mix is not None:
            x, y = mix(x, y)  # y becomes soft targets (B, num_classes)
        return x, y

    return augment


def finetune(
    backbone: ViT,
    train_set,
    test_set,
    num_classes: int,
    epochs: int = 10,
    lr: float = 5e-4,
    layer_decay: float = 0.75,
    drop_path: float = 0.1,
    label_smoothing: float = 0.1,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    warmup_epochs: int = 1,
    weight_decay: float = 0.05,
    batch_size: int = 128,
    min_lr: float = 1e-6,
    normalize: dict | None = None,
    precision: str = "auto",
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = False,
    crop_scale: Sequence[float] | None = None,
    return_correct: bool = False,
) -> dict[str, float]:
    """Fine-tune a deep copy of ``backbone`` end to end: {"top1": test %, "train_loss", "epochs", "steps"}.

    The caller's backbone is never touched. The copy gets a new ``num_classes`` head, stochastic
    depth rising linearly to ``drop_path``, AdamW with ``layer_decay_param_groups``, linear
    warm-up then cosine to ``min_lr`` per step, label smoothing, and MixUp (alpha ``mixup``) /
    CutMix (alpha ``cutmix``) from torchvision.transforms.v2 (one of them per batch when both
    are > 0). ``crop_scale=(lo, hi)`` adds a random resized crop of that area fraction and a
    horizontal flip to every training image, drawn per image (``batch_augment``); None trains on
    the images as they are. A fixed sin-cos ``pos_embed`` is trained in the copy, as MAE's
    fine-tuning does. ``train_set`` / ``test_set``: Datasets of (image, label) or (images,
    labels) tensors. ``return_correct=True`` adds "correct", a bool tensor (M,) per test image.
    """
    if not isinstance(backbone, nn.Module) or not hasattr(backbone, "reset_classifier"):
        raise TypeError(f"backbone must be a vitssl_core.ViT, got {type(backbone).__name__}")
    train_set, test_set = _as_dataset("train_set", train_set), _as_dataset("test_set", test_set)
    for name, v in (("num_classes", num_classes), ("epochs", epochs), ("batch_size", batch_size)):
        _check_positive_int(name, v)
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs={warmup_epochs!r} must be an int in [0, epochs={epochs}]")
    _check_positive_float("lr", lr)
    _check_unit("drop_path", drop_path)
    _check_unit("label_smoothing", label_smoothing)
    for name, alpha in (("mixup", mixup), ("cutmix", cutmix), ("min_lr", min_lr)):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise ValueError(f"{name}={alpha!r} must be a number >= 0 (0 turns it off)")
    _check_normalize(normalize)
    if crop_scale is not None:
        crop_scale = _check_scale("crop_scale", crop_scale)
    if len(train_set) == 0:
        raise ValueError("train_set is empty")

    model = _finetune_copy(backbone, num_classes, drop_path)
    opt = torch.optim.AdamW(layer_decay_param_groups(model, lr, weight_decay, layer_decay), lr=lr)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_set) > batch_size,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
    )
    schedule = cosine_schedule(lr, min_lr, epochs * len(loader), warmup_epochs * len(loader))
    augment = _finetune_augment(crop_scale, _batch_mixer(mixup, cutmix, num_classes))
    device = _device_of(model)
    bar = tqdm(total=epochs * len(loader), disable=not progress, desc="finetune")
    step, epoch_loss = 0, float("nan")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # drop path, crops and MixUp/CutMix draws, without moving the caller's RNG
        model.train()
        for _ in range(epochs):
            loss_sum, seen = 0.0, 0
            for x, y in loader:
                x, y = augment(_prepare(x, device, normalize), torch.as_tensor(y).long().to(device))
                for group in opt.param_groups:
                    group["lr"] = float(schedule[step]) * group["lr_scale"]
                with autocast(device, precision):  # the package's one precision rule (runtime)
                    logits = model(x)  # (B, num_classes)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum, seen = loss_sum + loss.item() * len(x), seen + len(x)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            epoch_loss = loss_sum / max(seen, 1)
    bar.close()
    correct = _correct(model, test_set, max(batch_size, 256), normalize, precision)
    out = {"top1": 100.0 * correct.float().mean().item(), "train_loss": epoch_loss, "epochs": epochs, "steps": step}
    if return_correct:
        out["correct"] = correct
    return out


# --------------------------------------------------------------------------- paired comparison
def correct_to_hex(correct: Tensor) -> str:
    """Per-image correctness (M,) bool -> a hex string of its bits (M / 4 characters): fits in a JSON card."""
    bits = correct.bool().cpu().flatten()
    padded = torch.cat([bits, bits.new_zeros(-len(bits) % 8)]).view(-1, 8)
    values = (padded.long() << torch.arange(7, -1, -1)).sum(1)  # (M/8,) bytes, first image in the top bit
    return bytes(values.tolist()).hex()


def correct_from_hex(text: str, n: int) -> Tensor:
    """Inverse of ``correct_to_hex``: the first ``n`` bits as a bool tensor (n,)."""
    try:
        raw = torch.tensor(list(bytes.fromhex(text)), dtype=torch.long)
    except (TypeError, ValueError) as err:
        raise ValueError(f"text is not the hex string correct_to_hex writes ({err})") from None
    if not 0 <= n <= 8 * len(raw):
        raise ValueError(f"n={n} does not fit the {8 * len(raw)} bits of text")
    return ((raw[:, None] >> torch.arange(7, -1, -1)) & 1).flatten()[:n].bool()


def mcnemar(correct_a: Tensor, correct_b: Tensor) -> dict[str, float]:
    """McNemar's exact test of two classifiers scored on the same test images.

    ``correct_a``, ``correct_b``: bool (M,), per image. Only the discordant images count: ``a_only``
    (A right, B wrong) and ``b_only``; under "A and B are equally good" each discordant image is
    a fair coin. Returns {"a_only", "b_only", "difference" (points, A - B), "p_value" (two-sided)}.
    """
    for name, c in (("correct_a", correct_a), ("correct_b", correct_b)):
        if not isinstance(c, Tensor) or c.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-D tensor of per-image correctness, got {tuple(getattr(c, 'shape', ()))}"
            )
    if correct_a.shape != correct_b.shape or len(correct_a) == 0:
        raise ValueError(
            f"correct_a {tuple(correct_a.shape)} and correct_b {tuple(correct_b.shape)} must score "
            "the same, non-empty test set"
        )
    a, b = correct_a.bool().cpu(), correct_b.bool().cpu()
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    # P(X <= k) for X ~ Binomial(n, 1/2), in log space (n can be thousands), doubled for two sides.
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)
    ]
    top = max(log_terms)
    p = min(1.0, 2 * math.exp(top) * sum(math.exp(t - top) for t in log_terms)) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "difference": 100.0 * (a_only - b_only) / len(a), "p_value": p}


# --------------------------------------------------------------------------- label efficiency
def class_balanced_subset(
    labels: Tensor,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Sorted indices (M,) int64 of a class-balanced subset, the same for the same seed.

    ``fraction``: round-half-up(fraction * count) samples of each class, at least 1;
    ``per_class``: exactly that many of each class. Give exactly one of the two.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be an integer tensor of shape (N,), got {type(labels).__name__}")
    labels = _check_labels("labels", labels, len(labels), "labels")
    if (fraction is None) == (per_class is None):
        raise ValueError(f"give exactly one of fraction={fraction!r} and per_class={per_class!r}")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1
    ):
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    if per_class is not None:
        _check_positive_int("per_class", per_class)
    if len(labels) == 0:
        raise ValueError("labels is empty; the subset would be empty")
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)  # (count,)
        count = len(members)
        take = per_class if per_class is not None else max(1, math.floor(fraction * count + 0.5))
        if take > count:
            raise ValueError(f"per_class={per_class} but class {c} has only {count} samples")
        chosen.append(members[torch.randperm(count, generator=gen)[:take]])
    return torch.cat(chosen).sort().values


def label_efficiency(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    protocol: str = "linear",
    seed: int = 0,
    **kwargs,
) -> dict[float, float]:
    """{fraction: top-1 %} of a kNN or linear probe trained on class-balanced label subsets.

    ``kwargs`` go to ``knn_accuracy`` or ``linear_probe``. Pass ``pixel_features`` for the
    raw-pixel baseline, ``extract_features`` of a backbone for the representation.
    """
    if protocol not in ("linear", "knn"):
        raise ValueError(f"protocol={protocol!r} is not one of ('linear', 'knn')")
    if isinstance(fractions, (int, float)) or len(fractions) == 0:
        raise ValueError(f"fractions={fractions!r} must be a non-empty sequence of numbers in (0, 1]")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"fractions contains {f!r}; every fraction must be in (0, 1]")
    _check_features("train_features", train_features)
    y = _check_labels("train_labels", train_labels, len(train_features), "train_features")
    result = {}
    for f in fractions:
        idx = class_balanced_subset(y, fraction=f, seed=seed).to(train_features.device)
        xs, ys = train_features[idx], y.to(train_features.device)[idx]
        if protocol == "knn":
            result[f] = knn_accuracy(xs, ys, test_features, test_labels, **kwargs)
        else:
            result[f] = linear_probe(xs, ys, test_features, test_labels, seed=seed, **kwargs)["top1"]
    return result


# --------------------------------------------------------------------------- interpretability
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
    _check_normalize(normalize)
    device = _device_of(backbone)
    x = _prepare(images, device, normalize)
    with _eval_mode(backbone):
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
    _check_normalize(normalize)
    device = _device_of(backbone)
    total, count = None, 0
    with _eval_mode(backbone):
        for raw in _batches(images, batch_size):
            x = _prepare(raw, device, normalize)
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
    _check_positive_int("n_components", n_components)
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


# --------------------------------------------------------------------------- the CLI's entry point
_EXTRACT_KWARGS = ("n_last", "precision", "extract_batch_size")


def _load_split(dataset: str, train: bool, data_root, img_size: int) -> tuple[Images, Tensor]:
    """(images or Dataset, labels (N,)) of one split of a named data set."""
    if dataset == "fashion_mnist":
        return data.load_fashion_mnist_tensors(train=train, root=data_root)
    if dataset == "cifar10":
        if data_root is None:
            raise ValueError("dataset='cifar10' needs data_root=<folder holding cifar-10-batches-py>")
        ds = data.cifar10(data_root, train=train)
    elif dataset.startswith("folder:") and len(dataset) > len("folder:"):
        ds = data.folder_split(dataset[len("folder:") :], train=train, img_size=img_size)
    else:
        raise ValueError(
            f"dataset={dataset!r} is not 'fashion_mnist', 'cifar10', 'folder:PATH' "
            "or a (train, test) pair of Datasets / (images, labels) tensors"
        )
    return ds, torch.as_tensor(ds.targets)


def _labels_of(ds: Dataset) -> Tensor:
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets).long()
    if isinstance(ds, torch.utils.data.Subset) and hasattr(ds.dataset, "targets"):
        return torch.as_tensor(ds.dataset.targets).long()[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    return torch.tensor([int(item[1]) for item in ds])


def _limit(images: Images, labels: Tensor, n: int | None) -> tuple[Images, Tensor]:
    if n is None or n >= len(labels):
        return images, labels
    _check_positive_int("max_train/max_test", n)
    if isinstance(images, Tensor):
        return images[:n], labels[:n]
    return torch.utils.data.Subset(images, range(n)), labels[:n]


def _with_labels(images: Images, labels: Tensor) -> Images | tuple[Tensor, Tensor]:
    """An (images, labels) pair for image tensors; a Dataset already holds its labels."""
    return (images, labels) if isinstance(images, Tensor) else images


def run_protocol(
    protocol: str,
    backbone: ViT,
    feature: str = "cls",
    normalize: dict | None = None,
    dataset: str | tuple = "fashion_mnist",
    **kwargs,
) -> dict:
    """Evaluate ``backbone`` with one protocol; returns a dict of metrics (top-1 in percent).

    ``protocol``: "knn", "linear", "finetune" or "label_efficiency". ``dataset``: a name
    ("fashion_mnist", "cifar10" with ``data_root=``, "folder:PATH" in either layout of
    ``data.folder_split``, resized to the backbone's img_size) or a pair (train, test), each a Dataset of
    (image, label) or (images, labels) tensors. ``normalize`` is applied to [0, 1] pixels (None:
    none; pass ``data.NORMALIZE[name]`` if pre-training normalised). Keyword arguments:
    ``data_root``, ``max_train`` / ``max_test`` (first n images), ``n_last`` / ``precision`` /
    ``extract_batch_size`` (feature extraction), ``probe`` ("linear" or "knn", for
    label_efficiency); the rest go to ``knn_accuracy``, ``linear_probe``, ``finetune`` or
    ``label_efficiency``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not one of {PROTOCOLS}")
    if feature not in FEATURES:
        raise ValueError(f"feature={feature!r} is not one of {FEATURES}")
    _check_normalize(normalize)
    data_root = kwargs.pop("data_root", None)
    max_train, max_test = kwargs.pop("max_train", None), kwargs.pop("max_test", None)
    if isinstance(dataset, str):
        img_size = backbone.img_size[0] if hasattr(backbone, "img_size") else None
        train, y_train = _load_split(dataset, True, data_root, img_size)
        test, y_test = _load_split(dataset, False, data_root, img_size)
    elif isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        train, test = _as_dataset("dataset[0]", dataset[0]), _as_dataset("dataset[1]", dataset[1])
        y_train, y_test = _labels_of(train), _labels_of(test)
    else:
        raise ValueError(f"dataset={dataset!r} must be a name or a (train, test) pair")
    train, y_train = _limit(train, y_train, max_train)
    test, y_test = _limit(test, y_test, max_test)
    out: dict = {"protocol": protocol, "n_train": len(y_train), "n_test": len(y_test)}

    if protocol == "finetune":
        num_classes = kwargs.pop("num_classes", int(max(y_train.max(), y_test.max())) + 1)
        return {
            **out,
            **finetune(
                backbone,
                _with_labels(train, y_train),
                _with_labels(test, y_test),
                num_classes,
                normalize=normalize,
                **kwargs,
            ),
        }

    extract = {k: kwargs.pop(k) for k in _EXTRACT_KWARGS if k in kwargs}
    bs = extract.pop("extract_batch_size", 256)
    f_train = extract_features(backbone, train, feature, batch_size=bs, normalize=normalize, **extract)
    f_test = extract_features(backbone, test, feature, batch_size=bs, normalize=normalize, **extract)
    y_train, y_test = y_train.to(f_train.device), y_test.to(f_train.device)
    out["feature"] = feature
    if protocol == "knn":
        k, t = kwargs.pop("k", 20), kwargs.pop("temperature", 0.07)
        return {
            **out,
            "k": k,
            "temperature": t,
            "top1": knn_accuracy(f_train, y_train, f_test, y_test, k=k, temperature=t, **kwargs),
        }
    if protocol == "linear":
        return {**out, **linear_probe(f_train, y_train, f_test, y_test, **kwargs)}
    probe = kwargs.pop("probe", "linear")
    scores = label_efficiency(f_train, y_train, f_test, y_test, protocol=probe, **kwargs)
    return {**out, "probe": probe, **{f"top1@{f:g}": v for f, v in scores.items()}}
