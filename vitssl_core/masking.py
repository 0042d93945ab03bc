"""Patches and masks for masked image modelling: pure functions, no parameters.

``patchify`` / ``unpatchify`` cut images into flattened P x P patches and paste them back, in
the pixel order of facebookresearch/mae (He et al., 2022, "Masked Autoencoders Are Scalable
Vision Learners"): inside a patch the row p runs slowest, then the column q, then the channel c,
``(p q c)``. Three ways to choose the hidden patches: ``random_masking`` is MAE's per-sample
shuffle; ``unit_masking`` is SimMIM's (Xie et al., 2022), random squares of several patches;
``block_masking`` is BEiT's block-wise masking (Bao et al., 2022, "BEiT: BERT Pre-Training of
Image Transformers"), random rectangles.

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

from . import validate

__all__ = ["block_masking", "default_min_block", "patchify", "random_masking", "unit_masking", "unpatchify"]


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) images -> (B, L, P*P*C) flattened patches, row-major, pixels in (p q c) order."""
    validate.positive_int("patch_size", patch_size)
    if not isinstance(imgs, Tensor) or imgs.ndim != 4:
        shape = tuple(imgs.shape) if isinstance(imgs, Tensor) else type(imgs).__name__
        raise ValueError(f"imgs must be a (B, C, H, W) tensor, got {shape}")
    H, W = imgs.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size={patch_size}")
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(x: Tensor, patch_size: int, channels: int, grid_size: int | tuple[int, int] | None = None) -> Tensor:
    """(B, L, P*P*C) patches -> (B, C, H, W) images; the inverse of ``patchify``.

    ``grid_size`` (gh, gw) is needed only for non-square grids; by default L must be a square.
    """
    validate.positive_int("patch_size", patch_size)
    validate.positive_int("channels", channels)
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
    validate.positive_int("batch_size", batch_size)
    validate.positive_int("num_patches", num_patches)
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


def unit_masking(
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    unit: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """SimMIM's masking: hide ``ceil(U * mask_ratio)`` random squares of ``unit`` x ``unit`` patches.

    The (gh, gw) patch grid is cut into U = (gh / unit) * (gw / unit) aligned squares ("units");
    every sample hides its own random ``ceil(U * mask_ratio)`` of them (SimMIM's ``MaskGenerator``
    count, which can differ by one from MAE's ``L - int(L * (1 - r))``), and each hidden unit hides
    all its patches. SimMIM hides 32-pixel squares over 16-pixel patches: ``unit=2``.
    Returns a (B, L) float mask, 1 = hidden, in row-major patch order.
    """
    validate.positive_int("batch_size", batch_size)
    validate.positive_int("unit", unit)
    _check_ratio(mask_ratio)
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    validate.positive_int("grid_size", gh)
    validate.positive_int("grid_size", gw)
    if gh % unit or gw % unit:
        raise ValueError(f"grid_size={gh}x{gw} is not divisible by unit={unit} (patches per side of a mask unit)")
    uh, uw = gh // unit, gw // unit
    num_units = uh * uw
    num_hidden = math.ceil(num_units * mask_ratio)  # SimMIM: np.ceil(token_count * mask_ratio)
    if num_hidden >= num_units:
        raise ValueError(f"mask_ratio={mask_ratio} hides all {num_units} units of {unit}x{unit} patches; lower it")
    noise = torch.rand(batch_size, num_units, generator=generator).to(device)  # (B, U)
    hidden = noise.argsort(dim=1)[:, :num_hidden]  # a uniform random subset per sample
    coarse = torch.zeros(batch_size, num_units, device=device).scatter_(1, hidden, 1.0)  # (B, U)
    coarse = coarse.view(batch_size, uh, uw)
    fine = coarse.repeat_interleave(unit, dim=1).repeat_interleave(unit, dim=2)  # (B, gh, gw)
    return fine.reshape(batch_size, gh * gw)


def default_min_block(grid_size: int | tuple[int, int]) -> int:
    """BEiT's smallest block, 16 patches on its 14x14 grid, kept at the same share of a smaller grid.

    ``max(1, round(16 * L / 196))``: 16 on 14x14, 4 on 7x7, 5 on 8x8, 1 on 4x4.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    return max(1, round(16 * gh * gw / 196))


def _add_block(
    rng: random.Random, grid: list[list[int]], budget: int, min_block: float, log_aspect: tuple[float, float]
) -> int:
    """Hide one random rectangle that uncovers 1..``budget`` new patches; return how many (0: gave up).

    BEiT's ``MaskingGenerator._mask``: up to 10 tries, each with an area drawn uniformly in
    [min_block, budget] (either order), a log-uniform aspect ratio, a side strictly shorter than
    the grid's, and a random position; a try that would add nothing or overshoot is dropped.
    """
    gh, gw = len(grid), len(grid[0])
    for _ in range(10):
        area = rng.uniform(min_block, budget)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        if h >= gh or w >= gw:  # BEiT: never a block as tall or as wide as the grid
            continue
        top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
        rows, cols = range(top, top + h), range(left, left + w)
        new = sum(1 - grid[i][j] for i in rows for j in cols)
        if 0 < new <= budget:
            for i in rows:
                for j in cols:
                    grid[i][j] = 1
            return new
    return 0


def _one_block_mask(
    rng: random.Random,
    gh: int,
    gw: int,
    num_masked: int,
    min_block: int,
    max_block: int,
    log_aspect: tuple[float, float],
) -> list[list[int]]:
    """One (gh, gw) 0/1 grid with at most ``num_masked`` ones: blocks until the count or a failure."""
    grid = [[0] * gw for _ in range(gh)]
    count = 0
    while count < num_masked:
        added = _add_block(rng, grid, min(num_masked - count, max_block), min_block, log_aspect)
        if added == 0:  # BEiT stops here, short of num_masked, rather than force a block in
            break
        count += added
    return grid


def block_masking(
    batch_size: int,
    grid_size: int | tuple[int, int],
    num_masked: int,
    min_block: int | None = None,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """BEiT's block-wise masking: (B, L) float mask, 1 = hidden, at most ``num_masked`` ones per row.

    The algorithm of unilm ``beit/masking_generator.py``: rectangles are added one at a time,
    each uncovering at most the patches still missing (and at most ``max_block``, default
    ``num_masked``), with an area of about ``min_block``..(patches missing), an aspect ratio
    drawn log-uniformly in [min_aspect, max_aspect] (default 1/min_aspect) and both sides
    strictly shorter than the grid's; a rectangle may overlap earlier ones. When 10 tries in a
    row fail to place one, the mask is returned as it is, short of ``num_masked`` (BEiT: 74.5 of
    75 on average at 14x14, as few as about 66). ``min_block`` defaults to ``default_min_block``
    (BEiT's 16 of 196 patches, rescaled to the grid). Randomness comes from ``generator`` (or
    torch's global RNG).
    """
    validate.positive_int("batch_size", batch_size)
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    validate.positive_int("grid_size", gh)
    validate.positive_int("grid_size", gw)
    L = gh * gw
    if isinstance(num_masked, bool) or not isinstance(num_masked, int) or not 0 <= num_masked < L:
        raise ValueError(f"num_masked={num_masked!r} must be an int in [0, L={L})")
    min_block = default_min_block((gh, gw)) if min_block is None else min_block
    validate.positive_int("min_block", min_block)
    max_block = max(1, num_masked) if max_block is None else max_block
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
