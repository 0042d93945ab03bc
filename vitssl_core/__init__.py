"""vitssl_core: self-supervised Vision Transformers, small and tested.

The public API the book and users import. Modules, bottom-up:
``vit`` (the backbone), ``data`` (datasets and normalisation).
"""

from .vit import (
    ViT,
    resample_pos_embed,
    sincos_pos_embed_2d,
    vit_base,
    vit_small,
    vit_small_28,
    vit_small_32,
    vit_tiny,
    vit_tiny_28,
    vit_tiny_32,
)

__version__ = "0.1.0"
