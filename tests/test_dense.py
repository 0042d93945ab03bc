"""Tests for vitssl_core.dense: segmentation and FCOS heads, their losses, mIoU, mAP and training."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from vitssl_core import dense
from vitssl_core.dense import (
    DetectionHead,
    SegmentationHead,
    assign_targets,
    confusion_matrix,
    detection_map,
    evaluate_detection,
    evaluate_segmentation,
    fcos_targets,
    mean_iou,
    patch_centers,
    patch_feature_map,
    semantic_targets,
    train_dense,
)
from vitssl_core.scenes import FashionScenes, collate_detection
from vitssl_core.vit import ViT


def tiny_vit(**overrides):
    torch.manual_seed(0)
    kwargs = dict(img_size=64, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    return ViT(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def scenes(needs_fashion_mnist):
    return FashionScenes("train", num_scenes=16, seed=0)


@pytest.fixture(scope="module")
def batch(scenes):
    return collate_detection([scenes[i] for i in range(8)])


# --------------------------------------------------------------------------- feature map and shapes
def test_patch_feature_map_puts_tokens_on_their_grid(batch):
    vit = tiny_vit().eval()
    images = batch[0][:2]
    fmap = patch_feature_map(vit, images)  # (B, D, gh, gw)
    tokens = vit.forward_features(images)  # (B, 1 + L, D)
    assert fmap.shape == (2, 32, 8, 8)
    i, j = 3, 5
    torch.testing.assert_close(fmap[:, :, i, j], tokens[:, 1 + i * 8 + j])
    assert patch_feature_map(vit, images, n_layers=2).shape == (2, 64, 8, 8)


@pytest.mark.parametrize("decoder", ["linear", "light"])
def test_segmentation_head_shapes_and_gradients(decoder, batch):
    images, targets = batch
    head = SegmentationHead(tiny_vit(), num_classes=11, decoder=decoder)
    logits = head(images)
    assert logits.shape == (8, 11, 64, 64)
    head.loss(logits, targets)["loss"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.predict(images).shape == (8, 64, 64)


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval(batch):
    images, targets = batch
    head = SegmentationHead(tiny_vit(), num_classes=11, freeze_backbone=True).train()
    assert not head.backbone.training and head.decoder.training
    head.loss(head(images), targets)["loss"].backward()
    assert all(p.grad is None for p in head.backbone.parameters())
    assert head.decoder.weight.grad is not None


def test_detection_head_output_shapes(batch):
    head = DetectionHead(tiny_vit(), num_classes=11)
    out = head(batch[0])
    assert out["cls_logits"].shape == (8, 64, 10)  # K - 1 foreground scores per location
    assert out["ltrb"].shape == (8, 64, 4) and (out["ltrb"] > 0).all()
    assert out["centerness"].shape == (8, 64)
    assert out["points"].shape == (64, 2) and out["image_size"] == (64, 64)
    # untrained: every class starts at the focal-loss prior probability
    torch.testing.assert_close(out["cls_logits"].sigmoid().mean(), torch.tensor(0.01), atol=2e-3, rtol=0)


def test_detection_loss_gives_every_parameter_a_gradient(batch):
    images, targets = batch
    head = DetectionHead(tiny_vit(), num_classes=11)
    losses = head.loss(head(images), targets)
    assert all(torch.isfinite(losses[k]) for k in ("loss", "cls", "box", "ctr"))
    assert losses["num_pos"] > 0
    losses["loss"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name


@pytest.mark.parametrize("head_cls", [SegmentationHead, DetectionHead])
def test_resolution_mismatch_raises_with_advice(head_cls, batch):
    head = head_cls(tiny_vit(img_size=32), num_classes=11).eval()
    dynamic = head_cls(tiny_vit(img_size=32, dynamic_img_size=True), num_classes=11).eval()
    dynamic.load_state_dict(head.state_dict())  # the same weights, 32 px positions
    with pytest.raises(ValueError, match=r"set_img_size\(64\).*dynamic_img_size=True"):
        head(batch[0])
    head.backbone.set_img_size(64)  # the suggested fix works, and both fixes agree
    with torch.no_grad():
        fixed, resized = head(batch[0]), dynamic(batch[0])
    if head_cls is SegmentationHead:
        assert fixed.shape == (8, 11, 64, 64)
    else:  # one prediction per patch of the 8 x 8 grid, for the 10 foreground classes
        assert fixed["cls_logits"].shape == (8, 64, 10) and fixed["ltrb"].shape == (8, 64, 4)
    torch.testing.assert_close(fixed, resized)


def test_bad_head_arguments_raise():
    with pytest.raises(ValueError, match="decoder='deep'"):
        SegmentationHead(tiny_vit(), 11, decoder="deep")
    with pytest.raises(ValueError, match="num_classes=1"):
        DetectionHead(tiny_vit(), 1)
    with pytest.raises(ValueError, match="n_layers=0"):
        SegmentationHead(tiny_vit(), 11, n_layers=0)
    with pytest.raises(ValueError, match="depth=2"):  # the backbone itself knows its depth
        SegmentationHead(tiny_vit(), 11, n_layers=3)(torch.zeros(1, 1, 64, 64))
    with pytest.raises(TypeError, match="backbone"):
        DetectionHead(torch.nn.Linear(2, 2), 11)


# --------------------------------------------------------------------------- losses fall
def fit(head, images, targets, steps=25, lr=2e-3):
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        losses = head.loss(head(images), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return history


def test_detection_losses_fall_on_a_fixed_batch(batch):
    images, targets = batch
    history = fit(DetectionHead(tiny_vit(), num_classes=11), images, targets)
    first, last = history[0], history[-1]
    assert all(math.isfinite(h["loss"]) for h in history)
    assert last["loss"] < 0.6 * first["loss"]
    assert last["cls"] < first["cls"] and last["box"] < first["box"]  # focal and GIoU both fall


def test_segmentation_loss_falls_on_a_fixed_batch(batch):
    images, targets = batch
    history = fit(SegmentationHead(tiny_vit(), num_classes=11, decoder="light"), images, targets)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]


# --------------------------------------------------------------------------- FCOS target assignment
def test_assignment_on_hand_built_boxes():
    points = patch_centers((4, 4), 8)  # centres at 4, 12, 20, 28 px, row by row
    assert torch.equal(points[:5], torch.tensor([[4.0, 4], [12, 4], [20, 4], [28, 4], [4, 12]]))
    small = [0.0, 0.0, 16.0, 16.0]  # holds the centres (4|12, 4|12)
    large = [8.0, 8.0, 32.0, 32.0]  # holds the centres (12|20|28, 12|20|28)
    matched = assign_targets(points, torch.tensor([large, small]))
    expected = torch.full((16,), -1)
    expected[[0, 1, 4]] = 1
    expected[[6, 7, 9, 10, 11, 13, 14, 15]] = 0
    expected[5] = 1  # (12, 12) lies in both: the smaller box wins
    assert torch.equal(matched, expected)
    # a centre exactly on a box side is outside
    assert (assign_targets(points, torch.tensor([[0.0, 0.0, 12.0, 12.0]])) >= 0).sum() == 1


def test_fcos_targets_distances_and_centerness():
    points = patch_centers((4, 4), 8)
    t = fcos_targets(points, torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([7]))
    assert torch.equal(t["labels"][[0, 1, 2, 4, 5]], torch.tensor([7, 7, 0, 7, 7]))
    torch.testing.assert_close(t["ltrb"][0], torch.tensor([4.0, 4.0, 12.0, 12.0]))  # from (4, 4)
    torch.testing.assert_close(t["centerness"][0], torch.tensor(1 / 3))  # sqrt(4/12 * 4/12)
    torch.testing.assert_close(t["boxes"][5], torch.tensor([0.0, 0.0, 16.0, 16.0]))
    assert t["centerness"][2] == 0 and (t["ltrb"][2] == 0).all()
    empty = fcos_targets(points, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert (empty["labels"] == 0).all()


def test_detection_loss_rejects_background_labels(batch):
    head = DetectionHead(tiny_vit(), num_classes=11)
    bad = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])}] * 8
    with pytest.raises(ValueError, match="0 is background"):
        head.loss(head(batch[0]), bad)


# --------------------------------------------------------------------------- decoding and predict
def test_postprocess_decodes_distances_and_suppresses_duplicates():
    head = DetectionHead(tiny_vit(), num_classes=4)
    points = torch.tensor([[20.0, 20.0], [21.0, 20.0], [50.0, 50.0]])
    cls = torch.full((1, 3, 3), -10.0)
    cls[0, 0, 1] = 5.0  # location 0: label 2, the best
    cls[0, 1, 1] = 4.0  # location 1: the same object again, to be suppressed by NMS
    cls[0, 2, 0] = 3.0  # location 2: label 1
    ltrb = torch.tensor([[[2.0, 3.0, 4.0, 5.0], [3.0, 3.0, 3.0, 5.0], [1.0, 1.0, 100.0, 1.0]]])
    out = {
        "cls_logits": cls,
        "ltrb": ltrb,
        "centerness": torch.full((1, 3), 10.0),
        "points": points,
        "image_size": (64, 64),
    }
    (result,) = head.postprocess(out, score_thresh=0.5, nms_iou=0.5)
    assert torch.equal(result["labels"], torch.tensor([2, 1]))
    torch.testing.assert_close(result["boxes"], torch.tensor([[18.0, 17.0, 24.0, 25.0], [49.0, 49.0, 64.0, 51.0]]))
    assert result["scores"][0] > result["scores"][1]


def test_predict_returns_torchvision_format(batch):
    head = DetectionHead(tiny_vit(), num_classes=11).eval()
    predictions = head.predict(batch[0], score_thresh=0.0, nms_iou=0.5, max_det=7)
    assert isinstance(predictions, list) and len(predictions) == 8
    for p in predictions:
        assert set(p) == {"boxes", "scores", "labels"}
        n = len(p["scores"])
        assert 0 < n <= 7
        assert p["boxes"].shape == (n, 4) and p["boxes"].dtype == torch.float32
        assert p["labels"].dtype == torch.int64 and p["labels"].min() >= 1 and p["labels"].max() <= 10
        assert (p["scores"][:-1] >= p["scores"][1:]).all()
        assert p["boxes"].min() >= 0 and p["boxes"].max() <= 64
    assert all(len(p["scores"]) == 0 for p in head.predict(batch[0], score_thresh=1.0))
    with pytest.raises(ValueError, match="max_det=0"):
        head.predict(batch[0], max_det=0)


# --------------------------------------------------------------------------- mIoU
def test_mean_iou_on_a_hand_example():
    target = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 2]]])
    # class 0: TP 1, union 2 -> 1/2; class 1: TP 2, union 3 -> 2/3; class 2: 1; class 3 absent
    miou, per_class = mean_iou(pred, target, num_classes=4)
    torch.testing.assert_close(per_class[:3], torch.tensor([0.5, 2 / 3, 1.0], dtype=torch.float64))
    assert math.isnan(per_class[3])
    assert miou == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert mean_iou(pred, target, 4, ignore_background=True)[0] == pytest.approx((2 / 3 + 1.0) / 2)
    reference = jaccard_score(target.flatten(), pred.flatten(), labels=[0, 1, 2], average=None)
    torch.testing.assert_close(per_class[:3], torch.tensor(reference, dtype=torch.float64))


def test_confusion_matrix_counts_and_ignores_255():
    target = torch.tensor([0, 1, 1, 255, 2])
    pred = torch.tensor([0, 1, 2, 0, 2])
    cm = confusion_matrix(pred, target, 3)
    assert torch.equal(cm, torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]]))
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)


def test_semantic_targets_from_instance_masks_match_the_scene_maps(batch):
    _, targets = batch
    from_masks = semantic_targets([{"masks": t["masks"], "labels": t["labels"]} for t in targets])
    assert torch.equal(from_masks, semantic_targets(targets))
    assert torch.equal(semantic_targets([t["semantic"] for t in targets]), from_masks)


# --------------------------------------------------------------------------- mAP
def test_map_of_perfect_predictions_is_one(batch):
    _, targets = batch
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in targets]
    assert detection_map(perfect, targets) == {"map_50": 1.0, "map": 1.0}


def test_map_on_hand_examples():
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    # shifted one pixel: IoU = 90 / 110 = 0.818, a hit at thresholds 0.50..0.80 (7 of 10)
    shifted = [
        {"boxes": torch.tensor([[1.0, 0.0, 11.0, 10.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    ]
    result = detection_map(shifted, gt)
    assert result["map_50"] == pytest.approx(1.0) and result["map"] == pytest.approx(0.7)
    # a false positive ranked above the hit: precision 1/2 at every recall -> AP 0.5
    ranked = [
        {
            "boxes": torch.tensor([[30.0, 30.0, 40.0, 40.0], [0.0, 0.0, 10.0, 10.0]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([1, 1]),
        }
    ]
    assert detection_map(ranked, gt) == pytest.approx({"map_50": 0.5, "map": 0.5})
    wrong_class = [{**shifted[0], "labels": torch.tensor([2])}]
    assert detection_map(wrong_class, gt)["map_50"] == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        detection_map(ranked * 2, gt)


# --------------------------------------------------------------------------- training helpers
def test_train_dense_segmentation_history_and_evaluation(scenes):
    head = SegmentationHead(tiny_vit(), num_classes=11)
    history = train_dense(head, scenes, epochs=3, lr=3e-3, batch_size=8, task="segmentation", seed=0)
    assert len(history["loss"]) == len(history["lr"]) == 6 and len(history["epoch_loss"]) == 3
    assert history["epoch_loss"][-1] < history["epoch_loss"][0]
    result = evaluate_segmentation(head, scenes, batch_size=5)  # batches of 5, 5, 5 and 1
    assert set(result) == {"miou", "miou_foreground", "pixel_accuracy", "per_class_iou"}
    assert head.training  # evaluation restores the mode
    # The reference: every image predicted alone, all pixels of the data set pooled by torchmetrics.
    head.eval()
    preds = torch.cat([head.predict(scenes[i][0][None]) for i in range(len(scenes))])  # (16, H, W)
    head.train()
    truth = semantic_targets([scenes[i][1] for i in range(len(scenes))], preds.shape[-2:])
    iou = MulticlassJaccardIndex(11, average="none", ignore_index=dense.IGNORE_INDEX, zero_division=float("nan"))(
        preds, truth
    ).double()
    torch.testing.assert_close(torch.tensor(result["per_class_iou"], dtype=torch.float64), iou, equal_nan=True)
    assert result["miou"] == pytest.approx(float(iou.nanmean()))
    assert result["miou_foreground"] == pytest.approx(float(iou[1:].nanmean()))
    accuracy = MulticlassAccuracy(11, average="micro", ignore_index=dense.IGNORE_INDEX)(preds, truth)
    assert result["pixel_accuracy"] == pytest.approx(float(accuracy))


def test_train_dense_detection_with_frozen_backbone_and_bf16(scenes):
    head = DetectionHead(tiny_vit(), num_classes=11, freeze_backbone=True)
    before = {k: v.clone() for k, v in head.backbone.state_dict().items()}
    history = train_dense(head, scenes, epochs=1, lr=1e-3, batch_size=8, task="detection", amp=True)
    assert len(history["loss"]) == 2 and all(math.isfinite(x) for x in history["loss"])
    assert all(torch.equal(v, head.backbone.state_dict()[k]) for k, v in before.items())
    result = evaluate_detection(head, scenes, batch_size=5)  # batches of 5, 5, 5 and 1
    assert set(result) == {"map_50", "map"}
    # The reference: every image predicted alone, one COCO evaluation over the 16 images.
    head.eval()
    alone = [head.predict(scenes[i][0][None])[0] for i in range(len(scenes))]
    truths = [{"boxes": scenes[i][1]["boxes"], "labels": scenes[i][1]["labels"]} for i in range(len(scenes))]
    assert result == pytest.approx(detection_map(alone, truths), abs=1e-6)


# --------------------------------------------------------------------------- data-set-level metrics by hand
def _lookup(scenes):
    """Image pixels -> scene index, so a stand-in head can answer with that scene's own truth."""
    return {scenes[i][0].numpy().tobytes(): i for i in range(len(scenes))}


class OracleSegmentation(SegmentationHead):
    """Predicts the true class map for the scenes in ``known`` and all background for the others."""

    def __init__(self, scenes, known):
        super().__init__(tiny_vit(), num_classes=11)
        self.scenes, self.known, self.index = scenes, set(known), _lookup(scenes)

    def predict(self, images):
        maps = []
        for image in images:
            i = self.index[image.numpy().tobytes()]
            truth = semantic_targets([self.scenes[i][1]])[0]
            maps.append(truth if i in self.known else torch.zeros_like(truth))
        return torch.stack(maps)


class OracleDetection(DetectionHead):
    """Predicts the true boxes (score 1) for the scenes in ``known`` and nothing for the others."""

    def __init__(self, scenes, known):
        super().__init__(tiny_vit(), num_classes=11)
        self.scenes, self.known, self.index = scenes, set(known), _lookup(scenes)

    def predict(self, images, score_thresh=0.05, nms_iou=0.5, max_det=100):
        out = []
        for image in images:
            i = self.index[image.numpy().tobytes()]
            boxes, labels = self.scenes[i][1]["boxes"], self.scenes[i][1]["labels"]
            keep = slice(None) if i in self.known else slice(0)
            out.append({"boxes": boxes[keep], "scores": torch.ones(len(labels))[keep], "labels": labels[keep]})
        return out


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_evaluate_segmentation_pools_pixels_over_every_batch(scenes, batch_size):
    n = len(scenes)
    truth = semantic_targets([scenes[i][1] for i in range(n)])  # (16, H, W)
    assert evaluate_segmentation(OracleSegmentation(scenes, range(n)), scenes, batch_size)["miou"] == 1.0
    # Right on the even scenes, all background on the odd ones. By hand, per class c >= 1:
    # IoU = (its pixels in even scenes) / (its pixels anywhere); background: every background pixel
    # is right, and the odd scenes' foreground pixels are wrongly background too.
    even, odd = truth[0::2], truth[1::2]
    counts = lambda maps: torch.bincount(maps.reshape(-1), minlength=11).double()  # noqa: E731
    iou = counts(even) / counts(truth)
    iou[0] = counts(truth)[0] / (counts(truth)[0] + counts(odd)[1:].sum())
    iou[counts(truth) == 0] = float("nan")
    result = evaluate_segmentation(OracleSegmentation(scenes, range(0, n, 2)), scenes, batch_size)
    torch.testing.assert_close(torch.tensor(result["per_class_iou"], dtype=torch.float64), iou, equal_nan=True)
    assert result["miou"] == pytest.approx(float(iou.nanmean()))
    assert result["miou_foreground"] == pytest.approx(float(iou[1:].nanmean()))
    right = counts(truth)[0] + counts(even)[1:].sum()
    assert result["pixel_accuracy"] == pytest.approx(float(right / truth.numel()))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_evaluate_detection_pools_images_over_every_batch(scenes, batch_size):
    n = len(scenes)
    assert evaluate_detection(OracleDetection(scenes, range(n)), scenes, batch_size) == {"map_50": 1.0, "map": 1.0}
    # Exact boxes on the even scenes, none on the odd ones. By hand, class c is found with
    # precision 1 up to recall r_c = (its boxes in even scenes) / (its boxes), and never after:
    # COCO's AP is the share of its 101 recall thresholds t = 0, 0.01, ..., 1 with t <= r_c (0 for
    # a class never detected). torchmetrics hands pycocotools the thresholds in float32, so
    # t = 0.6 is 0.6000000238 and a recall of 3/5 falls short of it. Exact boxes have IoU 1, so
    # every IoU threshold gives the same AP.
    labels = [scenes[i][1]["labels"] for i in range(n)]
    total = torch.bincount(torch.cat(labels), minlength=11).numpy()
    found = torch.bincount(torch.cat(labels[0::2]), minlength=11).numpy()
    thresholds = torch.linspace(0.0, 1.0, 101).double().numpy()  # float32 values, as torchmetrics gives them
    ap = [(thresholds <= found[c] / total[c]).mean() if found[c] else 0.0 for c in range(11) if total[c] > 0]
    assert 0 < found.sum() < total.sum()  # not a trivial case: part of the recall is lost
    result = evaluate_detection(OracleDetection(scenes, range(0, n, 2)), scenes, batch_size)
    assert result == pytest.approx({"map_50": float(np.mean(ap)), "map": float(np.mean(ap))}, abs=1e-6)


def test_train_dense_checks_task_and_resolution_before_training(scenes):
    with pytest.raises(TypeError, match="DetectionHead"):
        train_dense(SegmentationHead(tiny_vit(), 11), scenes, task="detection")
    with pytest.raises(ValueError, match="task='depth'"):
        train_dense(SegmentationHead(tiny_vit(), 11), scenes, task="depth")
    with pytest.raises(ValueError, match="set_img_size"):
        train_dense(DetectionHead(tiny_vit(img_size=32), 11), scenes, task="detection")
    with pytest.raises(ValueError, match="epochs=0"):
        train_dense(SegmentationHead(tiny_vit(), 11), scenes, epochs=0)


def test_module_lists_its_public_api():
    assert all(hasattr(dense, name) for name in dense.__all__)


@pytest.mark.parametrize("head_cls", [SegmentationHead, DetectionHead])
def test_evaluation_restores_the_heads_mode_when_a_batch_fails(head_cls, scenes):
    class FailsAtItem1(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            if i == 1:
                raise OSError("the disk went away")
            return scenes[0]

    head = head_cls(tiny_vit(), num_classes=11).train()
    evaluate = evaluate_segmentation if head_cls is SegmentationHead else evaluate_detection
    with pytest.raises(OSError, match="disk went away"):
        evaluate(head, FailsAtItem1(), batch_size=1)
    assert head.training
