"""Tests for vitssl_core.masking: patchify round trips, MAE's random masking, SimMIM's unit masking,
BEiT's block masking."""

import math
import random

import pytest
import torch

from vitssl_core.masking import block_masking, default_min_block, patchify, random_masking, unit_masking, unpatchify


# --------------------------------------------------------------------------- patchify
def test_patchify_matches_mae_pixel_order():
    """Same order as facebookresearch/mae: reshape + einsum 'nchpwq->nhwpqc'."""
    imgs = torch.randn(2, 3, 8, 12)
    p = 4
    ref = imgs.reshape(2, 3, 2, p, 3, p)
    ref = torch.einsum("nchpwq->nhwpqc", ref).reshape(2, 2 * 3, p * p * 3)
    assert torch.equal(patchify(imgs, p), ref)


def test_patchify_unpatchify_round_trip_exact():
    imgs = torch.randn(3, 2, 12, 12)
    x = patchify(imgs, 4)
    assert x.shape == (3, 9, 4 * 4 * 2)
    assert torch.equal(unpatchify(x, 4, 2), imgs)
    rect = torch.randn(1, 1, 8, 12)  # a non-square grid needs grid_size
    assert torch.equal(unpatchify(patchify(rect, 4), 4, 1, grid_size=(2, 3)), rect)


def test_patchify_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        patchify(torch.zeros(1, 1, 30, 28), 4)
    with pytest.raises(ValueError, match="patch_size"):
        patchify(torch.zeros(1, 1, 28, 28), 0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patchify(torch.zeros(1, 28, 28), 4)
    with pytest.raises(ValueError, match="need 16"):
        unpatchify(torch.zeros(1, 49, 15), 4, 1)
    with pytest.raises(ValueError, match="not a square grid"):
        unpatchify(torch.zeros(1, 6, 16), 4, 1)


# --------------------------------------------------------------------------- random masking
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_random_masking_exact_counts(ratio):
    B, L = 5, 49
    ids_keep, mask, ids_restore = random_masking(B, L, ratio)
    len_keep = int(L * (1 - ratio))
    assert ids_keep.shape == (B, len_keep) and mask.shape == (B, L) and ids_restore.shape == (B, L)
    assert mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - len_keep)))
    # the kept ids are exactly the visible (mask == 0) patches
    visible = torch.zeros(B, L).scatter_(1, ids_keep, 1.0)
    assert torch.equal(visible, 1 - mask)


def test_masks_differ_between_samples():
    _, mask, _ = random_masking(8, 49, 0.75, generator=torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_ids_restore_inverts_the_shuffle():
    B, L = 4, 16
    noise = torch.rand(B, L)
    ids_keep, _, ids_restore = random_masking(B, L, 0.75, noise=noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(L).expand(B, L))
    # what MAE's decoder does: shuffled tokens gathered with ids_restore are back in patch order
    tokens = torch.randn(B, L, 3)
    shuffled = tokens.gather(1, ids_shuffle[..., None].expand(-1, -1, 3))
    assert torch.equal(shuffled.gather(1, ids_restore[..., None].expand(-1, -1, 3)), tokens)
    assert torch.equal(ids_keep, ids_shuffle[:, : ids_keep.shape[1]])


def test_fixed_noise_gives_a_fixed_mask():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ids_keep, mask, _ = random_masking(1, 4, 0.5, noise=noise)
    assert ids_keep.tolist() == [[1, 3]]  # the two smallest noises are kept, smallest first
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(random_masking(2, 49, 0.75, generator=g1)[1], random_masking(2, 49, 0.75, generator=g2)[1])


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, True])
def test_bad_ratios_raise(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 49, ratio)


def test_random_masking_input_errors():
    with pytest.raises(ValueError, match="noise must be"):
        random_masking(2, 49, 0.5, noise=torch.rand(2, 48))
    with pytest.raises(ValueError, match="keeps no patch"):
        random_masking(2, 4, 0.8)
    with pytest.raises(ValueError, match="batch_size"):
        random_masking(0, 4, 0.5)


# --------------------------------------------------------------------------- unit masking (SimMIM)
@pytest.mark.parametrize(
    "grid,unit,ratio",
    [
        (4, 2, 0.6),  # vit_mini_28: a 2x2 grid of units, ceil(2.4) = 3 hidden
        (8, 2, 0.6),
        (8, 4, 0.5),
        ((4, 6), 2, 0.6),  # a non-square grid: 2x3 units
        (10, 2, 0.8),  # ceil(25 * 0.8) = 20 units; MAE's L - int(L * (1 - r)) would hide 21
        (7, 1, 0.75),  # unit 1 is per-patch masking: ceil(36.75) = 37
    ],
)
def test_unit_masking_hides_whole_aligned_units(grid, unit, ratio):
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    B = 32
    mask = unit_masking(B, grid, ratio, unit, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (B, gh * gw) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    units = mask.view(B, gh // unit, unit, gw // unit, unit)  # (B, uh, p, uw, q): one unit per (uh, uw)
    per_unit_max, per_unit_min = units.amax(dim=(2, 4)), units.amin(dim=(2, 4))
    assert torch.equal(per_unit_max, per_unit_min)  # every unit is all hidden or all visible
    num_units = (gh // unit) * (gw // unit)
    hidden_units = per_unit_max.sum(dim=(1, 2))
    assert torch.equal(hidden_units, torch.full((B,), float(math.ceil(num_units * ratio))))  # SimMIM's count
    assert torch.equal(mask.sum(dim=1), hidden_units * unit * unit)
    assert len({tuple(m.tolist()) for m in mask}) > 1  # each sample draws its own units


def test_unit_masking_covers_every_unit_uniformly_and_is_reproducible():
    a = unit_masking(4000, 4, 0.6, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[:8], unit_masking(8, 4, 0.6, 2, generator=torch.Generator().manual_seed(1))[:8])
    share = a.view(4000, 2, 2, 2, 2).amax(dim=(2, 4)).mean(dim=0)  # how often each of the 4 units is hidden
    assert torch.allclose(share, torch.full((2, 2), 0.75), atol=0.03)


def test_unit_masking_errors():
    with pytest.raises(ValueError, match="grid_size=4x4 is not divisible by unit=3"):
        unit_masking(2, 4, 0.6, 3)
    with pytest.raises(ValueError, match="hides all 4 units"):
        unit_masking(2, 4, 0.8, 2)  # ceil(3.2) = 4 of 4
    with pytest.raises(ValueError, match="mask_ratio"):
        unit_masking(2, 4, 1.0, 1)
    with pytest.raises(ValueError, match="unit=0"):
        unit_masking(2, 4, 0.5, 0)


# --------------------------------------------------------------------------- block masking (BEiT)
def _beit_reference(rng, gh, gw, num_masked, min_block, max_block=None, min_aspect=0.3):
    """Our transcription of unilm beit/masking_generator.py (MaskingGenerator.__call__ and _mask),
    written out independently of vitssl_core. Returns (grid as lists, hidden count)."""
    max_block = num_masked if max_block is None else max_block
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    grid = [[0] * gw for _ in range(gh)]
    total = 0
    while total < num_masked:
        room = min(num_masked - total, max_block)
        gained = 0
        for _attempt in range(10):
            target = rng.uniform(min_block, room)
            ratio = math.exp(rng.uniform(lo, hi))
            h, w = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if w < gw and h < gh:
                r0, c0 = rng.randint(0, gh - h), rng.randint(0, gw - w)
                already = sum(grid[r][c] for r in range(r0, r0 + h) for c in range(c0, c0 + w))
                if 0 < h * w - already <= room:
                    for r in range(r0, r0 + h):
                        for c in range(c0, c0 + w):
                            if not grid[r][c]:
                                grid[r][c] = 1
                                gained += 1
                if gained > 0:
                    break
        if gained == 0:
            break  # BEiT gives up and returns fewer than num_masked
        total += gained
    return grid, total


def _has_full_line(grid):
    """Does a 2-D 0/1 list grid have a fully hidden row or column?"""
    return any(all(row) for row in grid) or any(all(col) for col in zip(*grid))


def _components(grid):
    """4-connected components of the ones of a 2-D 0/1 list grid."""
    gh, gw = len(grid), len(grid[0])
    seen, comps = set(), []
    for i in range(gh):
        for j in range(gw):
            if grid[i][j] and (i, j) not in seen:
                stack, comp = [(i, j)], []
                seen.add((i, j))
                while stack:
                    a, b = stack.pop()
                    comp.append((a, b))
                    for c, d in ((a - 1, b), (a + 1, b), (a, b - 1), (a, b + 1)):
                        if 0 <= c < gh and 0 <= d < gw and grid[c][d] and (c, d) not in seen:
                            seen.add((c, d))
                            stack.append((c, d))
                comps.append(comp)
    return comps


@pytest.mark.parametrize("grid,num", [(7, 20), (14, 75), ((6, 8), 2), ((6, 8), 30), (4, 6)])
def test_block_masking_never_overshoots(grid, num):
    mask = block_masking(64, grid, num, generator=torch.Generator().manual_seed(0))
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    assert mask.shape == (64, gh * gw)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    counts = mask.sum(1)
    assert (counts <= num).all()  # BEiT never hides more than asked ...
    assert counts.mean() > 0.9 * num  # ... and rarely much fewer


def test_block_masking_statistics_match_beit_reference():
    """BEiT's recipe on its own 14x14 grid (75 hidden, blocks of at least 16): the hidden count
    falls short as often and by as much as in BEiT's code (mean about 74.5, no top-up)."""
    n = 1500
    rng = random.Random(0)
    ref = [_beit_reference(rng, 14, 14, 75, 16) for _ in range(n)]
    ref_counts = torch.tensor([c for _, c in ref], dtype=torch.float32)
    masks = block_masking(n, 14, 75, min_block=16, generator=torch.Generator().manual_seed(0))
    counts = masks.sum(1)
    assert counts.max() <= 75 and ref_counts.max() <= 75
    assert abs(counts.mean() - ref_counts.mean()) < 0.15  # about 4 standard errors; a top-up gives +0.5
    assert abs((counts == 75).float().mean() - (ref_counts == 75).float().mean()) < 0.07  # about 2/3 exact
    assert counts.min() < 72 and ref_counts.min() < 72  # both sometimes stop well short
    assert default_min_block(14) == 16  # the default is BEiT's value on its own grid
    ref_full = sum(_has_full_line(g) for g, _ in ref) / n
    full = sum(_has_full_line(g) for g in masks.view(n, 14, 14).tolist()) / n
    assert abs(full - ref_full) < 0.03  # a fully hidden row or column is rare and only a union of blocks


def test_blocks_are_strictly_smaller_than_the_grid():
    """BEiT keeps every block shorter and narrower than the grid (h < height, w < width)."""
    # on a grid one patch tall no block fits at all, so nothing is hidden
    assert block_masking(16, (1, 8), 3, min_block=2, generator=torch.Generator().manual_seed(0)).sum() == 0
    # on a small grid full rows or columns come only from unions of blocks, as often as in BEiT
    n = 3000
    rng = random.Random(1)
    ref_full = sum(_has_full_line(_beit_reference(rng, 4, 4, 6, 4)[0]) for _ in range(n)) / n
    masks = block_masking(n, 4, 6, min_block=4, generator=torch.Generator().manual_seed(1)).view(n, 4, 4)
    full = sum(_has_full_line(g) for g in masks.tolist()) / n
    assert abs(full - ref_full) < 0.04, (full, ref_full)  # about 0.13; blocks as tall as the grid give 0.3


def test_default_min_block_keeps_beits_share_of_the_grid():
    assert [default_min_block(g) for g in (14, 7, 8, 4, (6, 8), 1)] == [16, 4, 5, 1, 4, 1]


def test_block_masks_are_blocky():
    """Hidden patches clump: almost none stands alone (BEiT's own masks have about 0.05 % at 14x14),
    and they form far fewer connected regions than the same number of random patches do."""
    gh = gw = 14
    num = 75
    masks = block_masking(200, gh, num, generator=torch.Generator().manual_seed(1)).view(200, gh, gw)
    block_comps, alone = [], 0
    for m in masks.tolist():
        comps = _components(m)
        alone += sum(len(c) == 1 for c in comps)
        block_comps.append(len(comps))
    assert alone / masks.sum() < 0.005
    ranks = torch.rand(200, gh * gw, generator=torch.Generator().manual_seed(1)).argsort(1).argsort(1)
    rand = (ranks < num).float()  # num patches hidden uniformly at random
    rand_comps = [len(_components(m)) for m in rand.view(200, gh, gw).tolist()]
    assert sum(block_comps) / 200 < 0.3 * sum(rand_comps) / 200


def test_block_masking_is_reproducible_and_random():
    a = block_masking(4, 7, 20, generator=torch.Generator().manual_seed(5))
    b = block_masking(4, 7, 20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert len({tuple(m.tolist()) for m in a}) == 4


def test_block_masking_errors():
    with pytest.raises(ValueError, match="num_masked=49"):
        block_masking(2, 7, 49)
    with pytest.raises(ValueError, match="min_aspect"):
        block_masking(2, 7, 10, min_aspect=0.0)
    with pytest.raises(ValueError, match="grid_size"):
        block_masking(2, 0, 10)
