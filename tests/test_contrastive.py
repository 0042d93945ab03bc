"""Tests for vitssl_core.contrastive: SimCLR and MoCo v3 on real Fashion-MNIST views with a tiny ViT."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from vitssl_core import __main__ as cli
from vitssl_core import data
from vitssl_core.augment import TwoViews, asymmetric_augment, simclr_augment
from vitssl_core.contrastive import MoCoV3, SimCLR, mlp_head
from vitssl_core.losses import info_nce
from vitssl_core.schedules import cosine_momentum
from vitssl_core.vit import ViT, sincos_pos_embed_2d

MEAN, STD = data.NORMALIZE["fashion_mnist"]["mean"], data.NORMALIZE["fashion_mnist"]["std"]


def tiny_vit(**kw):
    return ViT(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, **kw)


@pytest.fixture(scope="module")
def fmnist(needs_fashion_mnist):
    return data.FashionMNIST(train=False, download=False)


@pytest.fixture(scope="module")
def batch(fmnist):
    """One batch ([v1, v2], labels) of 16 real images, as the trainer's DataLoader yields it."""
    torch.manual_seed(0)
    ds = TwoViews(fmnist, *asymmetric_augment(28, grayscale=True, mean=MEAN, std=STD))
    return next(iter(DataLoader(ds, batch_size=16, shuffle=True)))


def make(name):
    torch.manual_seed(0)
    if name == "simclr":
        return SimCLR(tiny_vit(), proj_dim=16, hidden_dim=64, temperature=0.2)
    return MoCoV3(tiny_vit(), proj_dim=16, hidden_dim=64, temperature=0.2, momentum=0.9)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_training_step_returns_finite_loss_and_logs(batch, name):
    model = make(name)
    loss, logs = model.training_step(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert logs["loss"] == pytest.approx(loss.item())
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    assert model.backbone is not None and isinstance(model.backbone, ViT)
    loss2, _ = model(batch)  # forward is training_step
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_bf16_autocast_step_is_close_to_fp32(batch, name):
    # The trainer runs training_step under bf16 autocast; the loss itself is computed in float32.
    model = make(name)
    ref = model.training_step(batch)[0].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.training_step(batch)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref, rel=5e-2)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable(model))


@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_every_trainable_parameter_gets_a_gradient(batch, name):
    model = make(name)
    model.training_step(batch)[0].backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []


@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_loss_falls_on_a_fixed_batch(batch, name):
    model = make(name)
    opt = torch.optim.AdamW(trainable(model), lr=1e-3, weight_decay=0.0)
    losses = []
    steps = 25
    for step in range(steps):
        loss, _ = model.training_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(model, "on_step_end"):
            model.on_step_end(step, steps)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3, losses


def test_simclr_loss_starts_near_chance(batch):
    # Untrained projections are nearly random, so the loss starts near log(2B - 1) and not below it.
    model = make("simclr")
    loss, _ = model.training_step(batch)
    assert 0.7 * math.log(31) < loss.item() < 1.5 * math.log(31)


def test_moco_momentum_encoder_is_frozen_and_a_copy():
    model = make("moco")
    mom = list(model.momentum_backbone.parameters()) + list(model.momentum_projector.parameters())
    assert all(not p.requires_grad for p in mom)
    ids = {id(p) for p in trainable(model)}
    assert not any(id(p) in ids for p in mom)  # never handed to the optimizer
    for (n, p), q in zip(model.backbone.named_parameters(), model.momentum_backbone.parameters()):
        assert torch.equal(p, q), n


def test_moco_ema_update_is_exact(batch):
    model = make("moco")
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    model.training_step(batch)[0].backward()
    opt.step()  # the online encoder now differs from the momentum encoder
    online = [p.detach().clone() for p in list(model.backbone.parameters()) + list(model.projector.parameters())]
    old = [
        p.detach().clone()
        for p in list(model.momentum_backbone.parameters()) + list(model.momentum_projector.parameters())
    ]
    assert any(not torch.equal(a, b) for a, b in zip(online, old))
    model.on_step_end(3, 10)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert model.momentum == pytest.approx(m)
    new = list(model.momentum_backbone.parameters()) + list(model.momentum_projector.parameters())
    for o, t_old, t_new in zip(online, old, new):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * o, atol=1e-7, rtol=1e-6)


def test_cosine_momentum_endpoints():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    values = [cosine_momentum(0.99, t, 100) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))  # rises monotonically
    with pytest.raises(ValueError, match="step=101"):
        cosine_momentum(0.99, 101, 100)
    with pytest.raises(ValueError, match="max_steps=0"):
        cosine_momentum(0.99, 0, 0)


def test_moco_freezes_the_random_patch_projection_by_default(batch):
    # MoCo v3's --stop-grad-conv1: the patch projection keeps its random init for the whole run.
    model = make("moco")
    frozen = [model.backbone.patch_embed.proj.weight, model.backbone.patch_embed.proj.bias]
    assert all(not p.requires_grad for p in frozen)
    before = [p.detach().clone() for p in frozen]
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    model.training_step(batch)[0].backward()
    opt.step()
    model.on_step_end(0, 10)
    assert all(p.grad is None for p in frozen)
    assert all(torch.equal(p, b) for p, b in zip(frozen, before))
    torch.testing.assert_close(model.momentum_backbone.patch_embed.proj.weight, before[0])  # EMA of a constant
    assert model.backbone.cls_token.grad is not None

    # Opting out: trainable again, and a given backbone is left exactly as it is.
    def proj(**kw):
        return MoCoV3(tiny_vit(), proj_dim=16, hidden_dim=64, **kw).backbone.patch_embed.proj

    assert proj(freeze_patch_embed=False).weight.requires_grad
    assert proj(init_backbone=False).bias.requires_grad
    assert not proj(init_backbone=False, freeze_patch_embed=True).weight.requires_grad
    with pytest.raises(ValueError, match="freeze_patch_embed='yes'"):
        MoCoV3(tiny_vit(), freeze_patch_embed="yes")


def mocov3_sincos_table(dim, n):
    """MoCo v3's build_2d_sincos_position_embedding (vits.py) for an n x n grid, written out: (1 + n*n, dim)."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None]  # (n*n, dim/4)
    out_h = grid_h.flatten()[:, None] * omega[None]
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])


def test_moco_fixes_sincos_positions(batch):
    model = make("moco")
    pos = model.backbone.pos_embed
    assert not pos.requires_grad and model.backbone.pos_embed_type == "sincos"
    assert id(pos) not in {id(p) for p in trainable(model)}
    torch.testing.assert_close(pos[0], sincos_pos_embed_2d(32, 7))
    # The kept cosmetic deviation: MoCo v3's table is ours with the two halves of the channels swapped.
    torch.testing.assert_close(
        torch.cat([pos[0, :, 16:], pos[0, :, :16]], dim=1), mocov3_sincos_table(32, 7), atol=1e-5, rtol=0
    )
    before = pos.detach().clone()
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    model.training_step(batch)[0].backward()
    opt.step()
    assert torch.equal(pos, before)
    kept = tiny_vit()
    assert MoCoV3(kept, proj_dim=16, hidden_dim=64, init_backbone=False).backbone.pos_embed.requires_grad
    assert kept.pos_embed_type == "learned"


def test_moco_init_follows_vits_py():
    # Every tensor starts at 0.5, so each check below fails unless MoCoV3 re-initialised it.
    backbone = tiny_vit()
    with torch.no_grad():
        for p in backbone.parameters():
            p.fill_(0.5)
    model = MoCoV3(backbone, proj_dim=16, hidden_dim=64)
    b, D = model.backbone, 32

    def is_uniform(w, bound):  # inside +-bound and filling it
        return w.abs().max() <= bound * (1 + 1e-6) and w.abs().max() > 0.9 * bound and abs(w.mean()) < 0.1 * bound

    for name, m in b.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan = D + D if name.endswith("attn.qkv") else m.in_features + m.out_features  # qkv: one (D, D) projection
            assert is_uniform(m.weight, math.sqrt(6 / fan)), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones(D)) and torch.equal(m.bias, torch.zeros(D)), name
    C, P = 1, 4
    assert is_uniform(b.patch_embed.proj.weight, math.sqrt(6 / (C * P * P + D)))
    assert torch.equal(b.patch_embed.proj.bias, torch.zeros(D))
    assert 0 < b.cls_token.abs().max() < 1e-5  # normal, std 1e-6
    for p, q in zip(b.parameters(), model.momentum_backbone.parameters()):
        assert torch.equal(p, q)  # the key encoder starts from the same init

    kept = tiny_vit()
    state = {k: v.clone() for k, v in kept.state_dict().items()}
    MoCoV3(kept, proj_dim=16, hidden_dim=64, init_backbone=False)
    assert all(torch.equal(v, kept.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="init_backbone=1"):
        MoCoV3(tiny_vit(), init_backbone=1)


def test_moco_heads_are_moco_v3_vit_heads():
    # builder.py MoCo_ViT: projector _build_mlp(3, D, mlp_dim, dim), predictor _build_mlp(2, dim, mlp_dim, dim),
    # both with last_bn=True: Linear(no bias)-BN-ReLU blocks, then Linear and an affine-free BN.
    model = make("moco")
    kinds = [type(m).__name__ for m in model.predictor]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert [type(m).__name__ for m in model.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + kinds[-2:]
    for head in (model.projector, model.predictor):
        assert not head[-1].affine and head[-2].bias is None
    assert model.predictor[0].in_features == model.predictor[-2].out_features == 16


def test_cli_builds_the_moco_v3_vit_recipe():
    backbone = ViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    model = cli.METHODS["mocov3"].build(backbone, proj_dim=16)
    assert model.base_momentum == 0.99 and model.temperature == 0.2
    assert model.projector[0].out_features == 1024
    assert not backbone.patch_embed.proj.weight.requires_grad and not backbone.pos_embed.requires_grad
    assert isinstance(model.predictor[-1], torch.nn.BatchNorm1d)


@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_state_dict_round_trip(batch, name):
    model = make(name)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    model.training_step(batch)[0].backward()
    opt.step()
    if name == "moco":
        model.on_step_end(0, 10)
    clone = (
        MoCoV3(tiny_vit(), proj_dim=16, hidden_dim=64, temperature=0.2, momentum=0.9)
        if name == "moco"
        else SimCLR(tiny_vit(), proj_dim=16, hidden_dim=64, temperature=0.2)
    )
    clone.load_state_dict(model.state_dict(), strict=True)
    if name == "moco":
        assert any(k.startswith("momentum_backbone.") for k in model.state_dict())
    with torch.no_grad():
        assert clone.training_step(batch)[0].item() == pytest.approx(model.training_step(batch)[0].item(), abs=1e-6)


def test_simclr_with_per_sample_augmented_loader(fmnist):
    # A consumer test: TwoViews + simclr_augment + DataLoader straight into SimCLR.
    torch.manual_seed(1)
    loader = DataLoader(TwoViews(fmnist, simclr_augment(28, grayscale=True, mean=MEAN, std=STD)), batch_size=8)
    batch = next(iter(loader))
    model = make("simclr")
    loss, logs = model.training_step(batch)
    # The logged cosines, by brute force from the same projections (BatchNorm in training mode
    # normalises the 16 views with their own statistics, as inside training_step).
    (x1, x2), _ = batch
    with torch.no_grad():
        z1, z2 = model.project(torch.cat([x1, x2])).split(len(x1))
    cos = torch.nn.functional.cosine_similarity(z1[:, None], z2[None, :], dim=-1)  # (8, 8): cos(z1_i, z2_j)
    pairs = [(i, j) for i in range(8) for j in range(8) if i != j]
    assert logs["pos_cos"] == pytest.approx(sum(cos[i, i].item() for i in range(8)) / 8, abs=1e-5)
    assert logs["neg_cos"] == pytest.approx(sum(cos[i, j].item() for i, j in pairs) / len(pairs), abs=1e-5)
    assert logs["loss"] == loss.item() == pytest.approx(info_nce(z1, z2, model.temperature).item(), rel=1e-5)


def test_mlp_head_shapes():
    head = mlp_head(3, 32, 64, 16)
    assert head(torch.randn(4, 32)).shape == (4, 16)
    assert isinstance(head[-1], torch.nn.BatchNorm1d) and not head[-1].affine
    resnet_pred = mlp_head(2, 16, 64, 16, last_bn=False)  # MoCo v3's ResNet predictor; the ViT one keeps the BN
    assert isinstance(resnet_pred[-1], torch.nn.Linear)
    with pytest.raises(ValueError, match="hidden_dim=0"):
        mlp_head(2, 16, 0, 16)


def test_input_errors(batch):
    with pytest.raises(TypeError, match="backbone must be a vitssl_core.ViT"):
        SimCLR(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="temperature=0"):
        SimCLR(tiny_vit(), temperature=0)
    with pytest.raises(ValueError, match="momentum=1.5"):
        MoCoV3(tiny_vit(), momentum=1.5)
    model = make("simclr")
    (v1, v2), labels = batch
    with pytest.raises(ValueError, match="two"):
        model.training_step(([v1], labels))
    with pytest.raises(ValueError, match="one shape"):
        model.training_step(([v1, v2[:8]], labels))
    with pytest.raises(ValueError, match="batch size 1"):
        model.training_step(([v1[:1], v2[:1]], labels[:1]))
