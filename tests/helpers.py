"""What several test files share: the tiny ViT they train, as constructor arguments and as CLI flags.

pytest puts tests/ on sys.path (no __init__.py here), so a test file imports it as ``helpers``.
"""

TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2)


def model_args(**overrides) -> list[str]:
    """``--model-arg k=v`` flags for `vitssl pretrain`: TINY's shape (the CLI knows the image size and
    channels from the dataset), with ``overrides`` changing or adding ViT arguments."""
    shape = {k: v for k, v in TINY.items() if k not in ("img_size", "in_chans")}
    return [flag for k, v in {**shape, **overrides}.items() for flag in ("--model-arg", f"{k}={v}")]
