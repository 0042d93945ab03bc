"""Patches and masks for masked image modelling: pure functions, no parameters.

``patchify`` / ``unpatchify`` cut images into flattened P x P patches and paste them back, in
the pixel order of facebookresearch/mae (He et al., 2022, "Masked Autoencoders Are Scalable
Vision Learners"): inside a patch the row p runs slowest, then the column q, then the channel c,
``(p q c)``. ``random_masking`` is MAE's per-sample shuffle; ``block_masking`` is BEiT's
block-wise masking (Bao et al., 2022, "BEiT: BERT Pre-Training of Image Transformers").

One convention for every mask in this package: **mask == 1 means hidden** (removed, replaced or
to be predicted), 0 means visible; masks are float (B, L) tensors of 0s and 1s in row-major patch
order. ``ids_restore`` undoes the shuffle: ``x_shuffled.gather(1, ids_restore)`` puts every patch
back at its place, so ``ids_shuffle.gather(1, ids_restore) == arange(L)``.

Shapes: B batch, C channels, H/W pixels, P patch size, L patches.
"""

from __future__ import annotations

import math
import random

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["block_masking", "patchify", "random_masking", "unpatchify"]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) images -> (B, L, P*P*C) flattened patches, row-major, pixels in (p q c) order."""
    _check_positive_int("patch_size", patch_size)
    if not isinstance(imgs, Tensor) or imgs.ndim != 4:
        shape = tuple(imgs.shape) if isinstance(imgs, Tensor) else type(imgs).__name__
        raise ValueError(f"imgs must be a (B, C, H, W) tensor, got {shape}")
    H, W = imgs.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size={patch_size}")
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(
    x: Tensor, patch_size: int, channels: int, grid_size: int | tuple[int, int] | None = None
) -> Tensor:
    """(B, L, P*P*C) patches -> (B, C, H, W) images; the inverse of ``patchify``.

    ``grid_size`` (gh, gw) is needed only for non-square grids; by default L must be a square.
    """
    _check_positive_int("patch_size", patch_size)
    _check_positive_int("channels", channels)
    if not isinstance(x, Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, L, P*P*C) tensor, got {shape}")
    L, D = x.shape[1:]
    if D != patch_size * patch_size * channels:
        raise ValueError(
            f"x has {D} values per patch but patch_size={patch_size} and channels={channels} "
            f"need {patch_size * patch_size * channels}"
        )
    if grid_size is None:
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"x has L={L} patches, not a square grid; pass grid_size=(gh, gw)")
        gh = gw = side
    else:
        gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        if gh * gw != L:
            raise ValueError(f"grid_size={grid_size} has {gh * gw} cells but x has L={L} patches")
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=gh, w=gw, p=patch_size, q=patch_size, c=channels)


def _check_ratio(mask_ratio) -> None:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r} must be a float in [0, 1)")


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking: keep exactly ``int(L * (1 - mask_ratio))`` patches per sample.

    Each sample's patches are shuffled by sorting uniform noise (small noise = keep), so every
    sample hides a different subset of the same size. Pass ``noise`` (B, L) to fix the mask.
    Returns ``ids_keep`` (B, L_keep) long, in shuffled order; ``mask`` (B, L) float, 1 = hidden;
    ``ids_restore`` (B, L) long, the inverse permutation of the shuffle.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("num_patches", num_patches)
    _check_ratio(mask_ratio)
    B, L = batch_size, num_patches
    len_keep = int(L * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch out of num_patches={L}; lower it")
    if noise is None:
        noise = torch.rand(B, L, generator=generator, device=device)  # in [0, 1)
    elif not isinstance(noise, Tensor) or noise.shape != (B, L):
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a (batch_size, num_patches)=({B}, {L}) tensor, got {shape}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the small-noise patches are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # the inverse permutation
    ids_keep = ids_shuffle[:, :len_keep]  # (B, L_keep)
    mask = torch.ones(B, L, device=noise.device)
    mask[:, :len_keep] = 0  # in shuffled order the first len_keep are visible ...
    mask = torch.gather(mask, 1, ids_restore)  # ... unshuffle to patch order: (B, L), 1 = hidden
    return ids_keep, mask, ids_restore


def _one_block_mask(
    rng: random.Random, gh: int, gw: int, num_masked: int, min_block: int, max_block: int, log_aspect: tuple[float, float]
) -> list[list[int]]:
    """One (gh, gw) 0/1 grid with exactly ``num_masked`` ones, grown from random rectangles."""
    grid = [[0] * gw for _ in range(gh)]
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):  # BEiT: up to 10 tries at a rectangle that adds 1..budget new patches
            area = rng.uniform(min_block, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if not (1 <= h <= gh and 1 <= w <= gw) or h * w < 2:
                continue
            top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
            new = sum(1 - grid[i][j] for i in range(top, top + h) for j in range(left, left + w))
            if 0 < new <= budget:
                for i in range(top, top + h):
                    for j in range(left, left + w):
                        grid[i][j] = 1
                added = new
                break
        if added == 0:
            # BEiT gives up here and returns fewer patches; we instead grow the masked region one
            # patch at a time along its border, so the count is exact and the mask stays blocky.
            border = [(i, j) for i in range(gh) for j in range(gw) if not grid[i][j] and (
                (i > 0 and grid[i - 1][j]) or (i < gh - 1 and grid[i + 1][j])
                or (j > 0 and grid[i][j - 1]) or (j < gw - 1 and grid[i][j + 1]))]
            if border:
                i, j = rng.choice(border)
                grid[i][j] = 1
                added = 1
            else:  # nothing masked yet: start with a domino (or one patch if that is all we need)
                i, j = rng.randrange(gh), rng.randrange(gw)
                grid[i][j] = 1
                added = 1
                nbrs = [(a, b) for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)) if 0 <= a < gh and 0 <= b < gw]
                if budget >= 2 and nbrs:
                    a, b = rng.choice(nbrs)
                    grid[a][b] = 1
                    added = 2
        count += added
    return grid


def block_masking(
    batch_size: int,
    grid_size: int | tuple[int, int],
    num_masked: int,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """BEiT's block-wise masking: (B, L) float mask, 1 = hidden, exactly ``num_masked`` ones per row.

    Rectangles of ``min_block``..``max_block`` patches with aspect ratio in
    [min_aspect, max_aspect] (default 1/min_aspect) are dropped at random positions until
    ``num_masked`` patches are hidden; a rectangle may overlap earlier ones but never overshoots.
    When no rectangle fits the remaining budget, the region grows patch by patch along its border
    (BEiT would stop short), so with ``num_masked >= 2`` every hidden patch has a hidden
    4-neighbour. Randomness comes from ``generator`` (or torch's global RNG).
    """
    _check_positive_int("batch_size", batch_size)
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    _check_positive_int("grid_size", gh)
    _check_positive_int("grid_size", gw)
    L = gh * gw
    if isinstance(num_masked, bool) or not isinstance(num_masked, int) or not 0 <= num_masked < L:
        raise ValueError(f"num_masked={num_masked!r} must be an int in [0, L={L})")
    _check_positive_int("min_block", min_block)
    max_block = num_masked if max_block is None else max_block
    if isinstance(max_block, bool) or not isinstance(max_block, int) or max_block < 1:
        raise ValueError(f"max_block={max_block!r} must be a positive int or None")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect={min_aspect!r} must be in (0, 1]")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if max_aspect < min_aspect:
        raise ValueError(f"max_aspect={max_aspect!r} must be >= min_aspect={min_aspect}")
    # One integer from torch's RNG seeds a Python RNG for the small scalar draws: reproducible
    # under torch.manual_seed / a generator, and far cheaper than a torch call per draw.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    rng = random.Random(seed)
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    masks = [_one_block_mask(rng, gh, gw, num_masked, min_block, max_block, log_aspect) for _ in range(batch_size)]
    return torch.tensor(masks, dtype=torch.float32, device=device).reshape(batch_size, L)
