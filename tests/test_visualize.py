"""vitssl_core.visualize: hand-computed cases for every analysis, the shipped checkpoints on real
Fashion-MNIST, and ``vitssl show`` through the real entry point."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from vitssl_core import ViT, attention_distance, load_pretrained
from vitssl_core import visualize as vz
from vitssl_core.mae import MAE
from vitssl_core.pretrained import PRETRAINED

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = PRETRAINED  # the cards shipped inside the package


def tiny_vit(**kw) -> ViT:
    torch.manual_seed(0)
    cfg = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2)
    return ViT(**{**cfg, **kw}).eval()


# --------------------------------------------------------------------------- attention distance by hand
def test_patch_distances_on_a_2x2_grid():
    d = vz.patch_distances(2, 3)  # centres (0,0) (0,3) (3,0) (3,3) px
    expected = torch.tensor(
        [
            [0, 3, 3, 3 * math.sqrt(2)],
            [3, 0, 3 * math.sqrt(2), 3],
            [3, 3 * math.sqrt(2), 0, 3],
            [3 * math.sqrt(2), 3, 3, 0],
        ]
    )
    torch.testing.assert_close(d, expected.float())


def test_uniform_attention_gives_the_analytic_mean_distance():
    # 2x2 grid, P = 1: from any patch the distances are 0, 1, 1, sqrt(2) -> mean (2 + sqrt 2) / 4
    attn = torch.full((3, 2, 4, 4), 0.25)
    torch.testing.assert_close(vz.mean_attention_distance(attn, 2, 1), torch.full((2,), (2 + math.sqrt(2)) / 4))
    assert vz.uniform_attention_distance(2, 1) == pytest.approx((2 + math.sqrt(2)) / 4)
    # the review's number: uniform attention on the 7x7 grid of 4-px patches reaches 14.44 px
    assert vz.uniform_attention_distance(7, 4) == pytest.approx(14.4379, abs=1e-3)


def test_one_hot_attention_gives_an_exact_distance_and_the_class_token_is_left_out():
    # a 1x3 row of 5-px patches; every query looks only at the last patch: distances 10, 5, 0
    L, N = 3, 4
    attn = torch.zeros(1, 1, N, N)
    attn[0, 0, :, -1] = 0.5
    attn[0, 0, :, 0] = 0.5  # half the weight on the class token, which must not count
    torch.testing.assert_close(vz.mean_attention_distance(attn, (1, 3), 5), torch.tensor([5.0]))
    # head 0 looks at itself (distance 0), head 1 at a fixed neighbour of distance 5 from the middle
    a = torch.zeros(2, 2, L, L)
    a[:, 0] = torch.eye(L)
    a[:, 1, :, 1] = 1.0  # everyone looks at the middle patch: 5, 0, 5 -> 10/3
    torch.testing.assert_close(vz.mean_attention_distance(a, (1, 3), 5), torch.tensor([0.0, 10 / 3]))


def test_layer_attention_distance_agrees_with_evaluate_and_is_per_layer_and_head(needs_fashion_mnist):
    from vitssl_core.data import FashionMNIST

    backbone, card = load_pretrained(CHECKPOINTS / "supervised.json")
    x = FashionMNIST(train=False).data[:64]
    ours = vz.layer_attention_distance(backbone, x, card["normalize"], batch_size=24)  # uneven last batch
    assert ours.shape == (len(backbone.blocks), backbone.blocks[0].attn.num_heads)
    torch.testing.assert_close(ours, attention_distance(backbone, x, normalize=card["normalize"]), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- DINO's mask by hand
def test_attention_mask_keeps_the_fewest_patches_holding_the_mass():
    maps = torch.tensor([[0.5, 0.3], [0.1, 0.1]])  # ascending 0.1 0.1 0.3 0.5, cumsum > 0.4 from 0.3 on
    assert vz.attention_mask(maps, 0.6).tolist() == [[True, True], [False, False]]
    assert vz.attention_mask(maps, 0.5).tolist() == [[True, False], [False, False]]  # 0.5 alone holds 0.5
    assert vz.attention_mask(maps, 1.0).all()
    # unnormalised maps and leading dimensions: each map on its own
    two = torch.stack([maps * 7, maps.flip(-1)])[None]  # (1, 2, 2, 2)
    got = vz.attention_mask(two, 0.6)
    assert got[0, 0].tolist() == [[True, True], [False, False]]
    assert got[0, 1].tolist() == [[True, True], [False, False]]


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_attention_mask_is_minimal_on_random_maps(keep):
    maps = torch.rand(50, 4, 4, generator=torch.Generator().manual_seed(0)) ** 3
    mask = vz.attention_mask(maps, keep)
    p = maps.flatten(1) / maps.flatten(1).sum(1, keepdim=True)
    m = mask.flatten(1)
    kept = (p * m).sum(1)
    assert (kept >= keep - 1e-6).all()
    smallest_kept = torch.where(m, p, torch.inf).min(1).values
    assert (kept - smallest_kept < keep).all()  # dropping the weakest kept patch falls below the share


@pytest.mark.parametrize(
    "maps, keep, error",
    [
        (torch.ones(4), 0.6, ValueError),
        (torch.ones(2, 2), 0.0, ValueError),
        (torch.ones(2, 2), 1.5, ValueError),
        (-torch.ones(2, 2), 0.6, ValueError),
        (torch.ones(2, 2, dtype=torch.long), 0.6, ValueError),
    ],
)
def test_attention_mask_rejects_bad_input(maps, keep, error):
    with pytest.raises(error):
        vz.attention_mask(maps, keep)


# --------------------------------------------------------------------------- positions
def test_position_similarity_of_a_hand_made_table():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # a 2x2 grid
    sim = vz.position_similarity(table, (2, 2))
    assert sim.shape == (2, 2, 2, 2)
    assert sim[0, 0, 0, 1].item() == pytest.approx(0.0)
    assert sim[0, 0, 1, 0].item() == pytest.approx(1 / math.sqrt(2))
    assert sim[0, 0, 1, 1].item() == pytest.approx(-1.0)
    torch.testing.assert_close(torch.diagonal(sim.reshape(4, 4)), torch.ones(4))


def test_position_similarity_drops_the_class_token_row():
    model = tiny_vit()
    with torch.no_grad():
        model.pos_embed[0, 0] = 1e3  # a huge class row would dominate if it were kept
    sim = vz.position_similarity(model)
    table = model.pos_embed[0, 1:]
    torch.testing.assert_close(sim, vz.position_similarity(table, model.grid_size))
    with pytest.raises(ValueError, match="grid_size"):
        vz.position_similarity(table)
    with pytest.raises(ValueError, match="L = 16"):
        vz.position_similarity(table[:5], (4, 4))


# --------------------------------------------------------------------------- the shipped checkpoints
def test_class_token_attention_of_the_shipped_dino(needs_fashion_mnist):
    from vitssl_core.data import FashionMNIST

    backbone, card = load_pretrained(CHECKPOINTS / "dino.json")
    x = FashionMNIST(train=False).data[:8]
    maps = vz.class_token_attention(backbone, x, card["normalize"])
    heads, grid = backbone.blocks[-1].attn.num_heads, backbone.grid_size
    assert maps.shape == (8, heads, *grid)
    # by hand: row 0 of the last block's attention without the class column, renormalised
    with torch.no_grad():
        x_in = (x.float()[:, None] / 255 - card["normalize"]["mean"][0]) / card["normalize"]["std"][0]
        row = backbone.get_last_selfattention(x_in)[:, :, 0, 1:]
    torch.testing.assert_close(maps.flatten(2), row / row.sum(-1, keepdim=True))


def test_mae_reconstruction_from_the_shipped_encoder_and_decoder(needs_fashion_mnist):
    from vitssl_core.data import FashionMNIST

    mae, card = vz.load_mae("mae")
    assert isinstance(mae, MAE) and mae.norm_pix_loss
    x = FashionMNIST(train=False).data[:64]
    out = vz.mae_reconstruction(mae, x, 0.75, card["normalize"], seed=0)
    L = mae.backbone.num_patches
    assert out["mask"].sum(1).eq(L - int(L * 0.25)).all()
    original = x.float()[:, None] / 255
    torch.testing.assert_close(out["original"], original, atol=1e-5, rtol=0)
    hidden = mae.unpatchify(out["mask"][..., None].expand(-1, -1, mae.backbone.patch_size**2)).bool()
    # pasting keeps every visible pixel
    torch.testing.assert_close(out["pasted"][~hidden], original[~hidden], atol=1e-5, rtol=0)
    # the trained decoder beats a blank guess (each hidden patch at its true mean) by a wide margin
    err = ((out["reconstruction"] - original) ** 2)[hidden].mean()
    patches = mae.patchify(original)
    blank = mae.unpatchify(patches.mean(-1, keepdim=True).expand_as(patches))
    blank_err = ((blank - original) ** 2)[hidden].mean()
    assert err < 0.6 * blank_err, (err, blank_err)
    # with statistics from the visible patches only, no hidden pixel reaches the picture
    a = vz.mae_reconstruction(mae, x[:4], 0.75, card["normalize"], seed=1, stats="visible")
    changed = x[:4].clone()
    changed_hidden = mae.unpatchify(a["mask"][..., None].expand(-1, -1, mae.backbone.patch_size**2)).bool()[:, 0]
    changed[changed_hidden] = 255 - changed[changed_hidden]
    b = vz.mae_reconstruction(mae, changed, 0.75, card["normalize"], seed=1, stats="visible")
    torch.testing.assert_close(a["reconstruction"], b["reconstruction"], atol=1e-5, rtol=0)


def test_load_mae_refuses_a_card_without_a_decoder():
    with pytest.raises(ValueError, match="not an MAE card"):
        vz.load_mae("dino")
    with pytest.raises(ValueError, match="not a shipped backbone; shipped: .*mae"):
        vz.load_mae("no_such_card")


def test_drawing_helpers_return_figures(needs_fashion_mnist):
    from vitssl_core.data import FashionMNIST

    backbone, card = load_pretrained(CHECKPOINTS / "dino.json")
    x = FashionMNIST(train=False).data[:2]
    maps = vz.class_token_attention(backbone, x, card["normalize"])
    figs = [
        vz.draw_attention(x, maps, vz.attention_mask(maps)),
        vz.draw_attention_distance({"dino": torch.rand(6, 4)}, 14.0, 7),
        vz.draw_position_similarity(vz.position_similarity(backbone)),
    ]
    mae, card = vz.load_mae("mae")
    figs.append(vz.draw_reconstruction(vz.mae_reconstruction(mae, x, normalize=card["normalize"])))
    assert all(isinstance(f, Figure) and f.axes for f in figs)
    with pytest.raises(ValueError, match="B = 2"):
        vz.draw_attention(x, maps[:1])


# --------------------------------------------------------------------------- vitssl show
def _png(path: Path) -> Path:
    from PIL import Image

    from vitssl_core.data import FashionMNIST

    Image.fromarray(FashionMNIST(train=False).data[0].numpy()).save(path)
    return path


def _show(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitssl_core", "show", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )


def test_vitssl_show_draws_both_pictures(tmp_path, needs_fashion_mnist):
    from PIL import Image

    image = _png(tmp_path / "boot.png")
    shown = [
        ("attention", "dino"),
        ("attention", "simmim_p4"),
        ("attention", "dino_p4"),
        ("reconstruction", str(CHECKPOINTS / "mae.safetensors")),
        ("reconstruction", "mae_p4"),
    ]
    for kind, name in shown:  # the _p4 cards: 7x7 grid, 49 tokens
        out = tmp_path / f"{kind}.png"
        done = _show(kind, "--checkpoint", name, "--image", str(image), "--out", str(out), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        with Image.open(out) as im:
            assert im.size[0] > 200 and im.size[1] > 100


@pytest.mark.parametrize(
    "argv, message",
    [
        (["attention", "--checkpoint", "nope"], "not a shipped backbone"),
        (["reconstruction", "--checkpoint", "dino"], "not an MAE card"),
        (["attention", "--checkpoint", "dino", "--image", "missing.png"], "no such file"),
        (["attention", "--checkpoint", "dino", "--image", "text.png"], "not a readable PNG/JPEG"),
        (["attention", "--checkpoint", "dino", "--out", "x.jpg"], "must end in .png"),
        (["reconstruction", "--checkpoint", "mae", "--mask-ratio", "1.5"], "mask_ratio=1.5"),
        (["colour", "--checkpoint", "dino"], "invalid choice"),
    ],
)
def test_vitssl_show_bad_input_exits_2_with_one_line(argv, message, tmp_path, needs_fashion_mnist):
    image = _png(tmp_path / "boot.png")
    (tmp_path / "text.png").write_text("not an image")
    defaults = {"--image": str(image), "--out": str(tmp_path / "out.png")}
    for flag, value in defaults.items():
        if flag not in argv:
            argv = [*argv, flag, value]
    done = _show(*argv, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr, done.stderr


# --------------------------------------------------------------------------- item share, at pixel level
def test_item_share_is_one_for_uniform_attention_and_the_inverse_lit_fraction_at_most():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[0, :14] = 200  # the top half is lit: fraction 1/2
    images[1, :7, :7] = 255  # one corner patch: fraction 1/16
    uniform = torch.full((2, 3, 4, 4), 1 / 16)
    torch.testing.assert_close(vz.item_share(uniform, images), torch.ones(2, 3))
    focused = torch.zeros(2, 1, 4, 4)
    focused[:, 0, 0, 0] = 1.0  # all the mass on the top-left patch, which is lit in both images
    torch.testing.assert_close(vz.item_share(focused, images), torch.tensor([[2.0], [16.0]]))
    away = torch.zeros(2, 1, 4, 4)
    away[:, 0, 3, 3] = 1.0  # all the mass on the unlit bottom-right patch
    torch.testing.assert_close(vz.item_share(away, images), torch.zeros(2, 1))


def test_item_share_compares_grids_on_the_same_pixels():
    # a 4x4 map and the same map on a 28x28 grid of 1-pixel patches score the same
    torch.manual_seed(0)
    images = (torch.rand(3, 28, 28) > 0.6).to(torch.uint8) * 255
    coarse = torch.rand(3, 2, 4, 4)
    coarse = coarse / coarse.sum(dim=(-2, -1), keepdim=True)
    fine = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="nearest") / 49
    torch.testing.assert_close(vz.item_share(coarse, images), vz.item_share(fine, images))


def test_item_share_refuses_what_it_cannot_score():
    images = torch.zeros(1, 28, 28)
    with pytest.raises(ValueError, match="no pixel brighter than lit=0.1"):
        vz.item_share(torch.full((1, 1, 4, 4), 1 / 16), images)
    images[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="a 3x3 map does not tile a 28x28 image"):
        vz.item_share(torch.full((1, 1, 3, 3), 1 / 9), images)
    with pytest.raises(ValueError, match=r"lit=1\.5 must be a brightness threshold"):
        vz.item_share(torch.full((1, 1, 4, 4), 1 / 16), images, lit=1.5)
    with pytest.raises(ValueError, match="maps must be"):
        vz.item_share(torch.full((2, 1, 4, 4), 1 / 16), images)
