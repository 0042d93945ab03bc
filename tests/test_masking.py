"""Tests for vitssl_core.masking: patchify round trips, MAE's random masking, BEiT's block masking."""

import pytest
import torch

from vitssl_core.masking import block_masking, patchify, random_masking, unpatchify


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


# --------------------------------------------------------------------------- block masking
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


@pytest.mark.parametrize("grid,num", [(7, 20), (14, 75), ((6, 8), 2), ((6, 8), 47)])
def test_block_masking_exact_counts(grid, num):
    mask = block_masking(64, grid, num, generator=torch.Generator().manual_seed(0))
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    assert mask.shape == (64, gh * gw)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.sum(1), torch.full((64,), float(num)))


def test_block_masks_are_blocky():
    """Every union of cells is trivially a union of rectangles, so we test what that wording is
    after: no hidden patch stands alone (each has a hidden 4-neighbour), and hidden patches
    clump into far fewer connected regions than the same number of random patches do."""
    gh = gw = 14
    num = 75
    masks = block_masking(200, gh, num, generator=torch.Generator().manual_seed(1)).view(200, gh, gw)
    block_comps = []
    for m in masks.tolist():
        for i in range(gh):
            for j in range(gw):
                if m[i][j]:
                    nbrs = [m[a][b] for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
                            if 0 <= a < gh and 0 <= b < gw]
                    assert max(nbrs) == 1, "an isolated hidden patch"
        block_comps.append(len(_components(m)))
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
