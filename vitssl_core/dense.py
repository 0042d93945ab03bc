"""Dense prediction on a ViT's patch grid: segmentation and FCOS-style detection heads.

A ViT turns a (B, C, H, W) image into one token per P x P patch. Laid back on their grid, the
patch tokens are a (B, D, H/P, W/P) feature map, and dense tasks read that map:

* ``SegmentationHead`` is the linear probe of SETR (Zheng et al., 2021) and DINOv2 (Oquab et
  al., 2023): a 1x1 convolution classifies every patch token and the logits are bilinearly
  upsampled to pixels; ``decoder="light"`` puts two conv + 2x-upsample stages in between.
  Scored with the mean intersection over union (mIoU) of a confusion matrix.
* ``DetectionHead`` is FCOS (Tian et al., 2019) on the patch grid alone, one scale for
  simplicity (ViTDet, Li et al., 2022, builds a simple feature pyramid from a plain ViT's last
  map instead): every patch centre that lies inside a box predicts
  that box's class (sigmoid focal loss, Lin et al., 2017), its distances (l, t, r, b) to the four
  sides (GIoU loss, Rezatofighi et al., 2019) and a centre-ness score; inference keeps confident
  locations and removes duplicates with class-wise NMS. Scored with COCO's mAP through
  torchmetrics' ``MeanAveragePrecision`` (pycocotools backend).

The heads touch the backbone only through its public API (``forward_features``,
``get_intermediate_layers``, ``patch_size``, ``embed_dim``, ``img_size``), and with
``freeze_backbone=True`` they are probes of a frozen self-supervised representation.

Targets use torchvision's format throughout: for an image, a dict with ``boxes`` (K, 4) float
xyxy in pixels, ``labels`` (K,) int64 with 0 reserved for background, and for segmentation a
``semantic`` (H, W) int64 map, or instance ``masks`` (K, H, W) painted in order, or the (H, W)
mask tensor itself. Pixels labelled 255 are ignored (VOC's object borders).
``vitssl_core.scenes.FashionScenes`` yields exactly this, and so do VOC and COCO once
wrapped by torchvision (internet needed for the download; images must share one size to be
batched, and match the backbone's ``img_size``)::

    from torchvision import datasets
    from torchvision.transforms import v2
    from vitssl_core import vit_small
    from vitssl_core.data import IMAGENET_MEAN, IMAGENET_STD

    tf = v2.Compose([v2.ToImage(), v2.Resize((224, 224)), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), v2.SanitizeBoundingBoxes()])
    voc = datasets.wrap_dataset_for_transforms_v2(
        datasets.VOCDetection(root, year="2012", image_set="train", download=True, transforms=tf))
    head = DetectionHead(vit_small(), num_classes=21)        # 20 VOC classes + background
    train_dense(head, voc, epochs=12, lr=1e-4, batch_size=16, task="detection")
    # COCO: datasets.CocoDetection(images, annotations, transforms=tf), wrapped with
    # target_keys=("boxes", "labels"); its labels are category ids 1..90, so num_classes=91.
    # Segmentation: VOCSegmentation(...) wrapped the same way yields (image, Mask) pairs whose
    # 255 borders are ignored; SegmentationHead(vit_small(), num_classes=21).

Shape vocabulary: B batch, C channels, H/W pixels, P patch size, gh x gw patch grid,
L = gh * gw locations, D width, K classes including background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

from . import optim, validate
from .scenes import collate_detection
from .runtime import autocast, to_device
from .schedules import cosine_schedule

__all__ = [
    "IGNORE_INDEX",
    "check_backbone_resolution",
    "patch_feature_map",
    "SegmentationHead",
    "semantic_targets",
    "confusion_matrix",
    "mean_iou",
    "DetectionHead",
    "patch_centers",
    "assign_targets",
    "fcos_targets",
    "detection_map",
    "train_dense",
    "evaluate_segmentation",
    "evaluate_detection",
]

IGNORE_INDEX = 255  # VOC marks object borders 255; such pixels count in no loss and no metric
_DECODERS = ("linear", "light")
_TASKS = ("segmentation", "detection")


# --------------------------------------------------------------------------- the patch feature map
def check_backbone_resolution(backbone: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The (gh, gw) patch grid for H x W images; ValueError if the backbone cannot take that size."""
    P = backbone.patch_size
    if height % P or width % P:
        raise ValueError(f"image size {height}x{width} is not divisible by the backbone's patch_size={P}")
    built = tuple(backbone.img_size)
    if not getattr(backbone, "dynamic_img_size", False) and (height, width) != built:
        raise ValueError(
            f"images are {height}x{width} but the backbone was built for img_size={built[0]}x{built[1]}; call "
            f"backbone.set_img_size({height}) to resample its positional embedding, or build it with "
            f"img_size={height} or dynamic_img_size=True"
        )
    return height // P, width // P


def _check_backbone(backbone) -> None:
    needed = ("forward_features", "get_intermediate_layers", "patch_size", "embed_dim", "img_size")
    missing = [name for name in needed if not hasattr(backbone, name)]
    if not isinstance(backbone, nn.Module) or missing:
        raise TypeError(
            f"backbone must be a vitssl_core.ViT (an nn.Module with {', '.join(needed)}); "
            f"got {type(backbone).__name__}" + (f" lacking {missing}" if missing else "")
        )


def _check_images(images) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")


def patch_feature_map(backbone: nn.Module, images: Tensor, n_layers: int = 1) -> Tensor:
    """(B, C, H, W) -> (B, n_layers * D, gh, gw): patch tokens of the last n blocks on their grid."""
    _check_images(images)
    gh, gw = check_backbone_resolution(backbone, *images.shape[-2:])
    if n_layers == 1:
        tokens = backbone.forward_features(images)  # (B, N, D)
    else:  # DINOv2's linear probe concatenates the last blocks' tokens
        tokens = torch.cat(backbone.get_intermediate_layers(images, n_layers), dim=-1)  # (B, N, n*D)
    patches = tokens[:, -gh * gw :]  # (B, L, n*D): patch tokens come after the class token
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


class _BackboneHead(nn.Module):
    """Shared plumbing: holds the backbone and reads its patch feature map.

    ``freeze_backbone=True`` turns off ``requires_grad`` on the backbone's parameters (the
    backbone object passed in is changed), computes its features without autograd and keeps
    it in eval mode whatever ``train()`` is called with: a probe of a fixed representation.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, freeze_backbone: bool, n_layers: int) -> None:
        super().__init__()
        _check_backbone(backbone)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 2 (it counts background as class 0)")
        if not isinstance(freeze_backbone, bool):
            raise TypeError(f"freeze_backbone={freeze_backbone!r} must be a bool")
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers={n_layers!r} must be a positive int (at most the backbone's depth)")
        self.backbone = backbone
        self.num_classes = num_classes
        self.freeze_backbone = freeze_backbone
        self.n_layers = n_layers
        self.feature_dim = n_layers * backbone.embed_dim
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True) -> "_BackboneHead":
        super().train(mode)
        if self.freeze_backbone:  # a frozen backbone stays in eval mode (no dropout, no drop-path)
            self.backbone.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, n_layers * D, gh, gw), without autograd through a frozen backbone."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return patch_feature_map(self.backbone, images, self.n_layers)


def _conv_norm_act(cin: int, cout: int, act: type[nn.Module] = nn.GELU) -> list[nn.Module]:
    groups = math.gcd(cout, 8)  # GroupNorm: batch-size independent, fine for tiny batches
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), act()]


# --------------------------------------------------------------------------- segmentation
class SegmentationHead(_BackboneHead):
    """Per-pixel class logits from the patch grid: (B, C, H, W) -> (B, K, H, W).

    ``decoder="linear"``: one 1x1 conv on the tokens, then bilinear upsampling by P (the linear
    probe). ``decoder="light"``: conv + GroupNorm + GELU, 2x upsampling, twice, then a 1x1 conv.
    ``num_classes`` K counts the background (11 for ``FashionScenes``, 21 for VOC).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        decoder: str = "linear",
        freeze_backbone: bool = False,
        n_layers: int = 1,
        hidden_dim: int = 64,
    ) -> None:
        super().__init__(backbone, num_classes, freeze_backbone, n_layers)
        if decoder not in _DECODERS:
            raise ValueError(f"decoder={decoder!r} is not one of {_DECODERS}")
        validate.positive_int("hidden_dim", hidden_dim)
        self.decoder_type = decoder
        D = self.feature_dim
        if decoder == "linear":
            self.decoder = nn.Conv2d(D, num_classes, kernel_size=1)
        else:
            up = dict(scale_factor=2, mode="bilinear", align_corners=False)
            self.decoder = nn.Sequential(
                *_conv_norm_act(D, hidden_dim),
                nn.Upsample(**up),
                *_conv_norm_act(hidden_dim, hidden_dim),
                nn.Upsample(**up),
                nn.Conv2d(hidden_dim, num_classes, kernel_size=1),
            )

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, K, H, W) logits."""
        logits = self.decoder(self.features(images))  # (B, K, gh, gw) or (B, K, 4gh, 4gw)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def loss(self, logits: Tensor, targets) -> dict[str, Tensor]:
        """Pixel cross-entropy, 255 ignored: {"loss": scalar}. ``targets`` as in ``semantic_targets``."""
        target = semantic_targets(targets, logits.shape[-2:]).to(logits.device)  # (B, H, W)
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"{target.shape[0]} targets for a batch of {logits.shape[0]} logits")
        return {"loss": F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, H, W) int64 class per pixel."""
        return self(images).argmax(dim=1)


def _paint_instances(target: dict, size: tuple[int, int]) -> Tensor:
    masks, labels = target["masks"], torch.as_tensor(target["labels"])
    semantic = torch.zeros(size, dtype=torch.int64, device=labels.device)
    for mask, label in zip(masks, labels):  # later instances on top, as in the scenes
        semantic[mask.bool()] = label
    return semantic


def semantic_targets(targets, size: Sequence[int] | None = None) -> Tensor:
    """Targets -> (B, H, W) int64 class map.

    Accepts a (B, H, W) or (B, 1, H, W) tensor, or a list of per-image (H, W) tensors, or a
    list of dicts with ``semantic`` (H, W) or with instance ``masks`` (K, H, W) and ``labels``.
    """
    if isinstance(targets, Tensor):
        maps = targets.squeeze(1) if targets.ndim == 4 and targets.shape[1] == 1 else targets
        if maps.ndim != 3:
            raise ValueError(f"a target tensor must have shape (B, H, W) or (B, 1, H, W), got {tuple(targets.shape)}")
    else:
        if not isinstance(targets, (list, tuple)) or len(targets) == 0:
            raise TypeError(f"targets must be a tensor or a non-empty list, got {type(targets).__name__}")
        per_image = []
        for i, t in enumerate(targets):
            if isinstance(t, dict) and "semantic" in t:
                m = t["semantic"]
            elif isinstance(t, dict) and "masks" in t and "labels" in t:
                m = _paint_instances(t, tuple(t["masks"].shape[-2:]))
            elif isinstance(t, Tensor):
                m = t.squeeze(0) if t.ndim == 3 and t.shape[0] == 1 else t
            else:
                raise ValueError(
                    f"targets[{i}] must be an (H, W) tensor or a dict with 'semantic' or 'masks' + 'labels'; "
                    f"got {type(t).__name__}" + (f" with keys {sorted(t)}" if isinstance(t, dict) else "")
                )
            per_image.append(torch.as_tensor(m).as_subclass(Tensor))
        maps = torch.stack(per_image)
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        raise ValueError(f"target maps are {tuple(maps.shape[-2:])} but the predictions are {tuple(size)}")
    return maps.long()


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(K, K) int64 counts, rows = target class, columns = predicted class; ignore_index skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    for name, t in (("pred", pred), ("target", target)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(
                f"{name} holds values in [{int(t.min())}, {int(t.max())}], outside 0..num_classes-1={num_classes - 1}"
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def mean_iou(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_background: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[float, Tensor]:
    """mIoU of (N, H, W) class maps: (mean over present classes, (K,) float64 IoU, NaN if absent).

    IoU_c = TP / (TP + FP + FN) from the confusion matrix. A class absent from both prediction
    and target has no IoU (NaN) and is left out of the mean; ``ignore_background`` leaves class 0
    out of the mean too (its IoU is still reported).
    """
    validate.positive_int("num_classes", num_classes)
    cm = confusion_matrix(pred, target, num_classes, ignore_index).cpu().double()  # float64 on the CPU: MPS has none
    return _iou_from_confusion(cm, ignore_background)


def _iou_from_confusion(cm: Tensor, ignore_background: bool) -> tuple[float, Tensor]:
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp  # predicted + true - both
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    counted = iou[1:] if ignore_background else iou
    counted = counted[~counted.isnan()]
    return (float(counted.mean()) if counted.numel() else float("nan")), iou


# --------------------------------------------------------------------------- detection
def patch_centers(grid_size: tuple[int, int], patch_size: int, device=None) -> Tensor:
    """(L, 2) pixel coordinates (x, y) of the patch centres, row by row like the tokens."""
    gh, gw = grid_size
    ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) * patch_size
    xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) * patch_size
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def assign_targets(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS assignment: (L,) index of the box each point is positive for, -1 for background.

    A point is positive for a box when it lies strictly inside it; if several boxes contain it,
    the smallest (by area) wins, as in FCOS.
    """
    if boxes.numel() == 0:
        return torch.full((points.shape[0],), -1, dtype=torch.int64, device=points.device)
    x, y = points[:, 0:1], points[:, 1:2]  # (L, 1)
    inside = (x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])  # (L, M)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (M,)
    area = torch.where(inside, area, torch.full_like(inside, float("inf"), dtype=area.dtype))  # (L, M)
    smallest, idx = area.min(dim=1)
    return torch.where(torch.isfinite(smallest), idx, torch.full_like(idx, -1))


def fcos_targets(points: Tensor, boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per-point training targets for one image.

    Returns ``labels`` (L,) int64 (0 = background), ``boxes`` (L, 4) the assigned box,
    ``ltrb`` (L, 4) distances from the point to its box's sides in pixels, and
    ``centerness`` (L,) = sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)), 0 off-box.
    """
    matched = assign_targets(points, boxes)  # (L,)
    positive = matched >= 0
    L = points.shape[0]
    box_t = torch.zeros(L, 4, device=points.device)
    label_t = torch.zeros(L, dtype=torch.int64, device=points.device)
    if positive.any():
        box_t[positive] = boxes[matched[positive]].float()
        label_t[positive] = labels[matched[positive]].long()
    ltrb = torch.cat([points - box_t[:, :2], box_t[:, 2:] - points], dim=1)  # (L, 4): l, t, r, b
    ltrb = ltrb * positive[:, None]
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    ratio = lr.min(1).values / lr.max(1).values.clamp(min=1e-6) * tb.min(1).values / tb.max(1).values.clamp(min=1e-6)
    centerness = torch.where(positive, ratio.clamp(min=0).sqrt(), torch.zeros_like(ratio))
    return {"labels": label_t, "boxes": box_t, "ltrb": ltrb, "centerness": centerness}


def _decode(points: Tensor, ltrb: Tensor) -> Tensor:
    """Distances (..., L, 4) from points (L, 2) -> boxes (..., L, 4) xyxy."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def _check_detection_targets(targets, batch: int, num_classes: int) -> None:
    if not isinstance(targets, (list, tuple)) or len(targets) != batch:
        got = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"targets must be a list of {batch} dicts (one per image), got {got}")
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' (K, 4) xyxy and 'labels' (K,)")
        boxes, labels = t["boxes"], t["labels"]
        if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
            raise ValueError(
                f"targets[{i}]: boxes {tuple(boxes.shape)} must be (K, 4) and labels {tuple(labels.shape)} (K,)"
            )
        if labels.numel() and (labels.min() < 1 or labels.max() >= num_classes):
            raise ValueError(
                f"targets[{i}]['labels'] holds values in [{int(labels.min())}, {int(labels.max())}]; "
                f"allowed 1..{num_classes - 1} (0 is background)"
            )


class DetectionHead(_BackboneHead):
    """FCOS on the patch grid: per location, class logits, (l, t, r, b) box distances, centre-ness.

    ``num_classes`` K counts the background, as in torchvision's detection models; the head
    predicts K - 1 sigmoid scores, channel c for label c + 1. Distances are
    ``P * exp(raw)``, so an untrained location predicts a box one patch wide on every side.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        hidden_dim: int = 64,
        num_convs: int = 2,
        freeze_backbone: bool = False,
        n_layers: int = 1,
        prior_prob: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__(backbone, num_classes, freeze_backbone, n_layers)
        validate.positive_int("hidden_dim", hidden_dim)
        if isinstance(num_convs, bool) or not isinstance(num_convs, int) or num_convs < 0:
            raise ValueError(f"num_convs={num_convs!r} must be an int >= 0")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob={prior_prob!r} must be in (0, 1)")
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

        def tower() -> nn.Sequential:
            layers, cin = [], self.feature_dim
            for _ in range(num_convs):
                layers += _conv_norm_act(cin, hidden_dim, nn.ReLU)
                cin = hidden_dim
            return nn.Sequential(*layers)

        width = hidden_dim if num_convs else self.feature_dim
        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(width, num_classes - 1, 3, padding=1)
        self.bbox_reg = nn.Conv2d(width, 4, 3, padding=1)
        self.centerness = nn.Conv2d(width, 1, 3, padding=1)  # on the box tower, as in later FCOS
        for conv in (self.cls_logits, self.bbox_reg, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        # Focal-loss prior: start every location at probability prior_prob, so the many
        # background locations do not swamp the first steps (RetinaNet, FCOS).
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, images: Tensor) -> dict:
        """(B, C, H, W) -> raw outputs: ``cls_logits`` (B, L, K-1), ``ltrb`` (B, L, 4) pixels,
        ``centerness`` (B, L) logits, ``points`` (L, 2) patch centres (x, y) px, ``image_size`` (H, W)."""
        feats = self.features(images)  # (B, D', gh, gw)
        gh, gw = feats.shape[-2:]
        P = self.backbone.patch_size
        cls_feat, box_feat = self.cls_tower(feats), self.box_tower(feats)
        cls = self.cls_logits(cls_feat).flatten(2).transpose(1, 2)  # (B, L, K-1)
        raw = self.bbox_reg(box_feat).flatten(2).transpose(1, 2).float()  # (B, L, 4)
        # clamp: no box side is ever further than the image diagonal; keeps exp finite
        ltrb = P * torch.exp(raw.clamp(max=math.log(2.0 * max(images.shape[-2:]) / P)))
        ctr = self.centerness(box_feat).flatten(2).squeeze(1)  # (B, L)
        points = patch_centers((gh, gw), P, device=images.device)
        return {
            "cls_logits": cls,
            "ltrb": ltrb,
            "centerness": ctr,
            "points": points,
            "image_size": tuple(images.shape[-2:]),
        }

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """FCOS losses, each summed and divided by the number of positive locations.

        Returns ``loss`` (the sum), ``cls`` (sigmoid focal), ``box`` (GIoU), ``ctr``
        (centre-ness BCE) as scalars and ``num_pos``.
        """
        cls, ltrb, ctr, points = (outputs[k] for k in ("cls_logits", "ltrb", "centerness", "points"))
        B = cls.shape[0]
        _check_detection_targets(targets, B, self.num_classes)
        per_image = [
            fcos_targets(
                points, t["boxes"].to(points.device).as_subclass(Tensor), torch.as_tensor(t["labels"]).to(points.device)
            )
            for t in targets
        ]
        labels = torch.stack([p["labels"] for p in per_image])  # (B, L)
        gt_boxes = torch.stack([p["boxes"] for p in per_image])  # (B, L, 4)
        gt_ctr = torch.stack([p["centerness"] for p in per_image])  # (B, L)
        pos = labels > 0
        num_pos = pos.sum()
        norm = num_pos.clamp(min=1).float()

        onehot = F.one_hot(labels, self.num_classes)[..., 1:].to(torch.float32)  # (B, L, K-1)
        loss_cls = sigmoid_focal_loss(cls.float(), onehot, self.focal_alpha, self.focal_gamma, "sum") / norm
        pred_boxes = _decode(points, ltrb.float())  # (B, L, 4)
        if num_pos > 0:
            loss_box = generalized_box_iou_loss(pred_boxes[pos], gt_boxes[pos], reduction="sum") / norm
            loss_ctr = F.binary_cross_entropy_with_logits(ctr.float()[pos], gt_ctr[pos], reduction="sum") / norm
        else:  # keep the graph connected so every parameter still gets a (zero) gradient
            loss_box = ltrb.sum() * 0.0
            loss_ctr = ctr.sum() * 0.0
        total = loss_cls + loss_box + loss_ctr
        return {"loss": total, "cls": loss_cls, "box": loss_box, "ctr": loss_ctr, "num_pos": num_pos}

    @torch.no_grad()
    def postprocess(
        self,
        outputs: dict,
        score_thresh: float = 0.05,
        nms_iou: float = 0.5,
        max_det: int = 100,
        pre_nms_top_n: int = 1000,
    ) -> list[dict[str, Tensor]]:
        """Raw outputs -> per image dict(boxes (n, 4) xyxy, scores (n,), labels (n,) in 1..K-1)."""
        cls, ltrb, ctr, points = (outputs[k] for k in ("cls_logits", "ltrb", "centerness", "points"))
        H, W = (int(s) for s in outputs["image_size"])
        # FCOS ranks by sqrt(class probability * centre-ness): off-centre boxes sink
        scores = (cls.float().sigmoid() * ctr.float().sigmoid()[..., None]).sqrt()  # (B, L, K-1)
        boxes_all = _decode(points, ltrb.float())  # (B, L, 4)
        results = []
        for s, boxes in zip(scores, boxes_all):
            flat = s.flatten()  # (L * (K-1),)
            keep = torch.nonzero(flat > score_thresh).squeeze(1)
            if keep.numel() > pre_nms_top_n:
                keep = keep[flat[keep].topk(pre_nms_top_n).indices]
            loc, cls_idx = keep // s.shape[1], keep % s.shape[1]
            b = boxes[loc]
            b[:, 0::2] = b[:, 0::2].clamp(0, W)
            b[:, 1::2] = b[:, 1::2].clamp(0, H)
            sc = flat[keep]
            kept = batched_nms(b, sc, cls_idx, nms_iou)[:max_det]
            results.append({"boxes": b[kept], "scores": sc[kept], "labels": cls_idx[kept] + 1})
        return results

    @torch.no_grad()
    def predict(
        self, images: Tensor, score_thresh: float = 0.05, nms_iou: float = 0.5, max_det: int = 100
    ) -> list[dict[str, Tensor]]:
        """(B, C, H, W) -> B dicts in torchvision's format: boxes (n, 4) xyxy px, scores, labels."""
        if not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"score_thresh={score_thresh!r} must be in [0, 1]")
        if not 0.0 <= nms_iou <= 1.0:
            raise ValueError(f"nms_iou={nms_iou!r} must be in [0, 1]")
        validate.positive_int("max_det", max_det)
        return self.postprocess(self(images), score_thresh, nms_iou, max_det)


def _plain(t) -> Tensor:
    """A detached CPU tensor without any tv_tensors subclass (metrics want plain tensors)."""
    return torch.as_tensor(t).as_subclass(Tensor).detach().cpu()


def detection_map(predictions: list[dict], targets: list[dict]) -> dict[str, float]:
    """COCO box mAP: {"map_50": AP at IoU 0.5, "map": AP averaged over IoU 0.50:0.05:0.95}.

    ``predictions``: per image dict(boxes (n, 4) xyxy, scores (n,), labels (n,)); ``targets``:
    per image dict(boxes, labels). Computed by torchmetrics' ``MeanAveragePrecision`` with the
    pycocotools backend (101-point interpolated precision, up to 100 detections per image).
    A value is -1 when there is no ground-truth box at all, as in pycocotools.
    """
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(
            "detection_map needs torchmetrics and pycocotools: pip install torchmetrics pycocotools"
        ) from err
    if not isinstance(predictions, (list, tuple)) or not isinstance(targets, (list, tuple)):
        raise TypeError("predictions and targets must be lists of dicts, one per image")
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets; need one of each per image")
    for i, p in enumerate(predictions):
        if not isinstance(p, dict) or not {"boxes", "scores", "labels"} <= set(p):
            raise ValueError(f"predictions[{i}] must be a dict with 'boxes', 'scores' and 'labels'")
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or not {"boxes", "labels"} <= set(t):
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' and 'labels'")
    metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy", backend="pycocotools")
    metric.update(
        [
            {
                "boxes": _plain(p["boxes"]).float().reshape(-1, 4),
                "scores": _plain(p["scores"]).float(),
                "labels": _plain(p["labels"]).long(),
            }
            for p in predictions
        ],
        [{"boxes": _plain(t["boxes"]).float().reshape(-1, 4), "labels": _plain(t["labels"]).long()} for t in targets],
    )
    result = metric.compute()
    return {"map_50": float(result["map_50"]), "map": float(result["map"])}


# --------------------------------------------------------------------------- training and evaluation
def _head_for(head, task: str) -> None:
    if task not in _TASKS:
        raise ValueError(f"task={task!r} is not one of {_TASKS}")
    wanted = SegmentationHead if task == "segmentation" else DetectionHead
    if not isinstance(head, wanted):
        raise TypeError(f"task={task!r} needs a {wanted.__name__}, got {type(head).__name__}")


def _check_dataset_size(head: _BackboneHead, dataset: Dataset) -> None:
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    image = dataset[0][0]
    check_backbone_resolution(head.backbone, *image.shape[-2:])  # fail before the first step


def _precision(device: torch.device, amp: bool | None) -> str:
    """``amp`` in the package's precision names: None is "auto" on CUDA and fp32 on CPUs, where
    bf16 is usually slower for heads this small; True and False force bf16 and fp32."""
    if amp is None:
        return "auto" if device.type == "cuda" else "fp32"
    return "bf16" if amp else "fp32"


def train_dense(
    head: nn.Module,
    dataset: Dataset,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 32,
    task: str = "segmentation",
    progress: bool = False,
    seed: int = 0,
    weight_decay: float = 0.05,
    warmup_steps: int | None = None,
    amp: bool | None = None,
    num_workers: int = 0,
) -> dict[str, list[float]]:
    """Train a head with AdamW and a cosine learning rate; returns the history.

    ``dataset`` yields ``(image (C, H, W), target)`` in torchvision's format. The head trains on
    its parameters' device; ``amp=None`` uses bf16 autocast on CUDA only. History:
    ``loss`` and ``lr`` per step, ``epoch_loss`` per epoch.
    """
    _head_for(head, task)
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        validate.positive_int(name, v)
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be > 0")
    _check_dataset_size(head, dataset)
    params = optim.param_groups(head, weight_decay)  # the package's one weight-decay rule
    device = next(head.parameters()).device
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_detection,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
    )
    total = epochs * len(loader)
    warm = min(total // 20, 500) if warmup_steps is None else warmup_steps
    schedule = cosine_schedule(lr, lr * 0.01, total, warmup_steps=warm)
    optimizer = torch.optim.AdamW(params, lr=lr)
    precision = _precision(device, amp)

    def loss_of(batch) -> tuple[Tensor, int]:
        images, targets = batch[0].to(device), to_device(batch[1], device)
        with autocast(device, precision):
            outputs = head(images)
        return head.loss(outputs, targets)["loss"], len(images)

    head.train()
    steps = optim.fit(optimizer, schedule, epochs, lambda: loader, loss_of, what=f"train {task}", progress=progress)
    losses = [loss for epoch in steps for loss, _ in epoch]
    return {
        "loss": losses,
        "lr": [float(v) for v in schedule[: len(losses)]],
        "epoch_loss": [sum(loss for loss, _ in epoch) / len(epoch) for epoch in steps],
    }


def _eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    validate.positive_int("batch_size", batch_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)


@torch.no_grad()
def evaluate_segmentation(head: SegmentationHead, dataset: Dataset, batch_size: int = 64) -> dict:
    """mIoU of the head on a dataset: {"miou", "miou_foreground", "pixel_accuracy", "per_class_iou"}."""
    _head_for(head, "segmentation")
    _check_dataset_size(head, dataset)
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    K = head.num_classes
    cm = torch.zeros(K, K, dtype=torch.int64)
    try:
        for images, targets in _eval_loader(dataset, batch_size):
            pred = head.predict(images.to(device))  # (B, H, W)
            cm += confusion_matrix(pred, semantic_targets(targets, pred.shape[-2:]).to(device), K)
    finally:  # the caller's mode, also when a batch fails
        head.train(was_training)
    cm = cm.double()
    miou, per_class = _iou_from_confusion(cm, ignore_background=False)
    miou_fg, _ = _iou_from_confusion(cm, ignore_background=True)
    accuracy = float(cm.diag().sum() / cm.sum().clamp(min=1))
    return {"miou": miou, "miou_foreground": miou_fg, "pixel_accuracy": accuracy, "per_class_iou": per_class.tolist()}


@torch.no_grad()
def evaluate_detection(
    head: DetectionHead,
    dataset: Dataset,
    batch_size: int = 64,
    score_thresh: float = 0.05,
    nms_iou: float = 0.5,
    max_det: int = 100,
) -> dict[str, float]:
    """COCO box mAP of the head on a dataset: {"map_50", "map"} (see ``detection_map``)."""
    _head_for(head, "detection")
    _check_dataset_size(head, dataset)
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    predictions, truths = [], []
    try:
        for images, targets in _eval_loader(dataset, batch_size):
            predictions += head.predict(images.to(device), score_thresh, nms_iou, max_det)
            truths += [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    finally:  # the caller's mode, also when a batch fails
        head.train(was_training)
    return detection_map(predictions, truths)
