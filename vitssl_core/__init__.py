"""vitssl_core: self-supervised Vision Transformers, small and tested.

The public API the book and users import, bottom-up (dependencies point down this list):

1. ``vit``: the backbone (timm parameter names), presets, positional embeddings.
2. ``data`` (+ ``scenes``), ``augment`` (per image) and ``batch_augment`` (per batch, on the
   training device), ``masking``, ``losses``, ``schedules``, ``distributed``, ``runtime``
   (device, precision, seeding): pure pieces.
3. Methods: ``contrastive`` (SimCLR, MoCo v3), ``dino`` (DINO), ``mae`` (MAE),
   ``masked`` (SimMIM, BEiT), ``supervised`` (the labelled baseline).
4. ``train`` and ``checkpoint``: one loop for every method, checkpoints that survive a crash;
   ``pretrained``: the backbones shipped with the package, loaded by name;
   ``recipes``: each method's small-image defaults, shared by the CLI and Python users.
5. Evaluation, one concern per module: ``features`` (frozen features, kNN), ``probes`` (linear
   probe, fine-tuning, label efficiency), ``paired`` (McNemar's test), ``interpret`` (attention
   maps, attention distance, PCA colours); ``dense``: detection and segmentation heads;
   ``export``: folders that transformers and timm load; ``curves`` and ``visualize`` (figures;
   imported on their own, so the package needs matplotlib only for them).
6. ``python -m vitssl_core`` (the ``vitssl`` command) wires them together.
"""

from . import data
from ._version import __version__
from .augment import MultiCrop, TwoViews, asymmetric_augment, dino_augment, local_crop_augment, simclr_augment
from .batch_augment import BatchView, BatchViews, batch_asymmetric_views, batch_dino_views, batch_simclr_views
from .checkpoint import load_backbone, load_checkpoint, save_backbone
from .contrastive import MoCoV3, SimCLR
from .dense import (
    DetectionHead,
    SegmentationHead,
    detection_map,
    evaluate_detection,
    evaluate_segmentation,
    mean_iou,
    train_dense,
)
from .dino import DINO, DINOHead
from .features import choose_feature, extract_features, knn_accuracy, knn_classify, pixel_features
from .interpret import attention_distance, attention_maps, pca_rgb
from .paired import correct_from_hex, correct_to_hex, mcnemar
from .probes import class_balanced_subset, finetune, label_efficiency, linear_probe, run_protocol
from .export import save_hf, save_timm
from .losses import info_nce, info_nce_article, moco_infonce
from .mae import MAE
from .masked import BEiT, PatchTokenizer, SimMIM, masked_token_cross_entropy
from .masking import block_masking, default_min_block, patchify, random_masking, unit_masking, unpatchify
from .pretrained import compare_cards, list_pretrained, load_pretrained, resolve_checkpoint
from .schedules import cosine_momentum, cosine_schedule
from .supervised import Supervised
from .train import TrainConfig, train
from .vit import (
    ViT,
    resample_pos_embed,
    sincos_pos_embed_2d,
    vit_base,
    vit_mini_28,
    vit_small,
    vit_small_28,
    vit_small_32,
    vit_tiny,
    vit_tiny_28,
    vit_tiny_32,
)
