"""Probes and fine-tuning: what a frozen or fine-tuned ViT scores with labels.

The protocols self-supervised papers report:

- a linear probe on frozen features (MAE, He et al., 2022: BatchNorm without affine
  parameters in front of one linear layer);
- end-to-end fine-tuning (BEiT / MAE recipe: AdamW, layer-wise learning-rate decay 0.75,
  stochastic depth, label smoothing, optional MixUp / CutMix, warm-up then cosine);
- label efficiency: the same probes on class-balanced 1 % / 10 % / 100 % label subsets, with
  raw pixels as the baseline any pre-training must beat;
- ``run_protocol``: one of them (or kNN, from ``features``) on a named data set, as
  ``vitssl evaluate`` runs it.

Only the backbone's public API is used (``forward_features``, ``reset_classifier``, ``blocks``),
except that ``finetune`` sets the stochastic-depth rate of the copy's ``DropPath`` modules.
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
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from . import data, optim, validate
from .augment import _check_scale
from .batch_augment import crop_boxes, resized_crop
from .features import (
    FEATURES,
    Images,
    as_dataset,
    eval_mode,
    extract_features,
    knn_accuracy,
    labels_of,
    prepare_images,
)
from .runtime import autocast
from .schedules import cosine_schedule
from .vit import DropPath, ViT

__all__ = [
    "PROTOCOLS",
    "linear_probe",
    "layer_decay_param_groups",
    "finetune",
    "class_balanced_subset",
    "label_efficiency",
    "run_protocol",
]

PROTOCOLS = ("knn", "linear", "finetune", "label_efficiency")


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
    ``weight_decay`` applies to the weight, not the bias (``optim.decays``, every loop's rule).
    """
    validate.feature_matrix("train_features", train_features)
    validate.feature_matrix("test_features", test_features)
    y_train = validate.label_vector("train_labels", train_labels, len(train_features), "train_features")
    y_test = validate.label_vector("test_labels", test_labels, len(test_features), "test_features")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have {train_features.shape[1]} dims but test_features "
            f"{test_features.shape[1]}; they must match"
        )
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        validate.positive_int(name, v)
    validate.positive_number("lr", lr)
    validate.non_negative_number("weight_decay", weight_decay)
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer={optimizer!r} is not one of ('adamw', 'sgd')")
    n = len(train_features)
    if n < 2 and batchnorm:
        raise ValueError(f"the training set has {n} sample(s); standardising needs at least 2 (or batchnorm=False)")
    if len(y_test) == 0:
        raise ValueError("test_features is empty; accuracy is undefined")
    C = validate.class_count(torch.cat([y_train, y_test]), num_classes)
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
    groups = optim.param_groups(linear, weight_decay)  # the package's rule: no bias decay
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    bs = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        perm = torch.randperm(n, generator=gen).to(device)
        z, y = z_train[perm], y_train[perm]  # one shuffle per epoch, then contiguous slices (views)
        for start in range(0, n, bs):
            yield z[start : start + bs], y[start : start + bs]

    def loss_of(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        z, y = batch
        return F.cross_entropy(linear(z), y), len(y)

    schedule = cosine_schedule(lr, 0.0, epochs * math.ceil(n / bs))
    with _one_cpu_thread(device, small=dim * C <= 65536):
        history = optim.fit(opt, schedule, epochs, batches, loss_of, what="linear_probe")
    with eval_mode(probe):

        def hits(x: Tensor, y: Tensor) -> Tensor:
            preds = torch.cat([probe(x[i : i + 8192].to(device).float()).argmax(1) for i in range(0, len(x), 8192)])
            return preds.cpu() == y.cpu()

        correct = hits(test_features, y_test)
        out = {
            "top1": 100.0 * correct.float().mean().item(),
            "train_top1": 100.0 * hits(x_train, y_train).float().mean().item(),
            "loss": sum(loss * m for loss, m in history[-1]) / n,
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
    depth + 1 (full lr). Weight decay follows the trainer's rule (``optim.decays``): none for
    1-D parameters, biases, pos_embed, cls_token, mask_token and the model's ``no_weight_decay()``.
    Each group carries ``lr_scale`` (to re-apply a schedule), ``layer_id`` and ``param_names``.
    """
    if not hasattr(model, "blocks"):
        raise TypeError(f"model must have a .blocks list of Transformer blocks (a ViT), got {type(model).__name__}")
    validate.positive_number("base_lr", base_lr)
    validate.non_negative_number("weight_decay", weight_decay)
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay={layer_decay!r} must be in (0, 1] (1 disables the decay)")
    depth = len(model.blocks)
    exempt = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # e.g. a frozen sin-cos pos_embed
            continue
        lid, decay = _layer_id(name, depth), optim.decays(name, param, exempt)  # the trainer's weight-decay rule
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
    device, hits = next(model.parameters()).device, []
    with eval_mode(model):
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            with autocast(device, precision):  # the package's one precision rule (runtime)
                logits = model(prepare_images(x, device, normalize))
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
    ``seed`` fixes the batches, drop path, crops and MixUp/CutMix; the new head is drawn from the
    caller's generator before that, as the shipped fine-tune numbers were, so call
    ``torch.manual_seed`` first for a run that repeats exactly.
    """
    if not isinstance(backbone, nn.Module) or not hasattr(backbone, "reset_classifier"):
        raise TypeError(f"backbone must be a vitssl_core.ViT, got {type(backbone).__name__}")
    train_set, test_set = as_dataset("train_set", train_set), as_dataset("test_set", test_set)
    for name, v in (("num_classes", num_classes), ("epochs", epochs), ("batch_size", batch_size)):
        validate.positive_int(name, v)
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs={warmup_epochs!r} must be an int in [0, epochs={epochs}]")
    validate.positive_number("lr", lr)
    validate.fraction("drop_path", drop_path)
    validate.fraction("label_smoothing", label_smoothing)
    for name, alpha in (("mixup", mixup), ("cutmix", cutmix), ("min_lr", min_lr)):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise ValueError(f"{name}={alpha!r} must be a number >= 0 (0 turns it off)")
    validate.normalize_stats(normalize)
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
    device = next(model.parameters()).device

    def loss_of(batch) -> tuple[Tensor, int]:
        x, y = augment(prepare_images(batch[0], device, normalize), torch.as_tensor(batch[1]).long().to(device))
        with autocast(device, precision):  # the package's one precision rule (runtime)
            logits = model(x)  # (B, num_classes)
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), len(x)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # drop path, crops and MixUp/CutMix draws, without moving the caller's RNG
        model.train()
        history = optim.fit(opt, schedule, epochs, lambda: loader, loss_of, what="finetune", progress=progress)
    epoch_loss = sum(loss * n for loss, n in history[-1]) / max(sum(n for _, n in history[-1]), 1)
    step = sum(len(h) for h in history)
    correct = _correct(model, test_set, max(batch_size, 256), normalize, precision)
    out = {"top1": 100.0 * correct.float().mean().item(), "train_loss": epoch_loss, "epochs": epochs, "steps": step}
    if return_correct:
        out["correct"] = correct
    return out


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
    labels = validate.label_vector("labels", labels, len(labels), "labels")
    if (fraction is None) == (per_class is None):
        raise ValueError(f"give exactly one of fraction={fraction!r} and per_class={per_class!r}")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1
    ):
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    if per_class is not None:
        validate.positive_int("per_class", per_class)
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
    validate.feature_matrix("train_features", train_features)
    y = validate.label_vector("train_labels", train_labels, len(train_features), "train_features")
    result = {}
    for f in fractions:
        idx = class_balanced_subset(y, fraction=f, seed=seed).to(train_features.device)
        xs, ys = train_features[idx], y.to(train_features.device)[idx]
        if protocol == "knn":
            result[f] = knn_accuracy(xs, ys, test_features, test_labels, **kwargs)
        else:
            result[f] = linear_probe(xs, ys, test_features, test_labels, seed=seed, **kwargs)["top1"]
    return result


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


def _limit(images: Images, labels: Tensor, n: int | None) -> tuple[Images, Tensor]:
    if n is None or n >= len(labels):
        return images, labels
    validate.positive_int("max_train/max_test", n)
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
    validate.normalize_stats(normalize)
    data_root = kwargs.pop("data_root", None)
    max_train, max_test = kwargs.pop("max_train", None), kwargs.pop("max_test", None)
    if isinstance(dataset, str):
        img_size = backbone.img_size[0] if hasattr(backbone, "img_size") else None
        train, y_train = _load_split(dataset, True, data_root, img_size)
        test, y_test = _load_split(dataset, False, data_root, img_size)
    elif isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        train, test = as_dataset("dataset[0]", dataset[0]), as_dataset("dataset[1]", dataset[1])
        y_train, y_test = labels_of(train), labels_of(test)
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
