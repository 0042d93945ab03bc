"""Tests for vitssl_core.mae: MAE's encoder sees only visible patches, its loss, its checkpoint keys."""

import math

import pytest
import torch

from vitssl_core.data import NORMALIZE, load_fashion_mnist_tensors
from vitssl_core.mae import MAE, decoder_state_dict, is_decoder_key
from vitssl_core.vit import ViT, sincos_pos_embed_2d


def tiny_encoder(**kw):
    cfg = {
        "img_size": 28,
        "patch_size": 4,
        "in_chans": 1,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "pos_embed": "sincos",
    }
    return ViT(**{**cfg, **kw})


def tiny_mae(**kw):
    torch.manual_seed(0)
    return MAE(tiny_encoder(), decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **kw)


@pytest.fixture(scope="module")
def fmnist(needs_fashion_mnist):
    """16 real Fashion-MNIST test images, normalised like the training data: (16, 1, 28, 28)."""
    images, _ = load_fashion_mnist_tensors(train=False)
    x = images[:16].float().div(255).unsqueeze(1)
    mean, std = NORMALIZE["fashion_mnist"]["mean"][0], NORMALIZE["fashion_mnist"]["std"][0]
    return (x - mean) / std


# --------------------------------------------------------------------------- checkpoint compatibility
def official_keys(depth, decoder_depth, D, Dd, L, P, C):
    """MaskedAutoencoderViT's state dict (facebookresearch/mae models_mae.py with timm's Block),
    written out by hand: key -> shape, in the order the official model lists them."""

    def block(prefix, d):
        return {
            f"{prefix}.norm1.weight": (d,),
            f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d),
            f"{prefix}.attn.qkv.bias": (3 * d,),
            f"{prefix}.attn.proj.weight": (d, d),
            f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,),
            f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (4 * d, d),
            f"{prefix}.mlp.fc1.bias": (4 * d,),
            f"{prefix}.mlp.fc2.weight": (d, 4 * d),
            f"{prefix}.mlp.fc2.bias": (d,),
        }

    keys = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + L, D),
        "mask_token": (1, 1, Dd),
        "decoder_pos_embed": (1, 1 + L, Dd),
        "patch_embed.proj.weight": (D, C, P, P),
        "patch_embed.proj.bias": (D,),
    }
    for i in range(depth):
        keys.update(block(f"blocks.{i}", D))
    keys.update({"norm.weight": (D,), "norm.bias": (D,), "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,)})
    for i in range(decoder_depth):
        keys.update(block(f"decoder_blocks.{i}", Dd))
    keys.update(
        {
            "decoder_norm.weight": (Dd,),
            "decoder_norm.bias": (Dd,),
            "decoder_pred.weight": (P * P * C, Dd),
            "decoder_pred.bias": (P * P * C,),
        }
    )
    return keys


def test_official_checkpoint_loads_strict_and_backbone_has_timm_keys():
    enc = ViT(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2, pos_embed="sincos")
    mae = MAE(enc, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    expected = official_keys(depth=2, decoder_depth=1, D=16, Dd=8, L=4, P=4, C=3)
    ours = mae.state_dict()
    assert list(ours) == list(expected)  # same names, same order
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected

    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(shape, generator=g) for k, shape in expected.items()}
    result = mae.load_state_dict(official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(mae.backbone.blocks[1].attn.qkv.weight, official["blocks.1.attn.qkv.weight"])
    assert torch.equal(mae.backbone.cls_token, official["cls_token"])
    assert torch.equal(mae.decoder_blocks[0].mlp.fc2.bias, official["decoder_blocks.0.mlp.fc2.bias"])
    assert torch.equal(mae.mask_token, official["mask_token"])

    # the decoder's keys, by the package's one rule, are the official ones the encoder does not hold
    decoder = decoder_state_dict(ours)
    assert set(decoder) == set(expected) - {k for k in expected if k in mae.backbone.state_dict()}
    assert list(decoder) == [k for k in ours if k.startswith(("decoder_", "mask_token"))]  # in order
    assert is_decoder_key("decoder_blocks.0.norm1.weight") and not is_decoder_key("blocks.0.norm1.weight")
    with pytest.raises(TypeError, match="key must be a str"):
        is_decoder_key(3)
    with pytest.raises(TypeError, match="state must be a dict"):
        decoder_state_dict([("mask_token", 1)])

    # the backbone exports plain timm keys, which timm's own ViT loads strictly
    timm_vit = pytest.importorskip("timm").models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=3, num_classes=0, embed_dim=16, depth=2, num_heads=2
    )
    backbone_sd = mae.backbone.state_dict()
    assert not any(k.startswith(("decoder", "mask_token", "backbone.")) for k in backbone_sd)
    timm_vit.load_state_dict(backbone_sd, strict=True)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(timm_vit.forward_features(x), mae.backbone.forward_features(x), atol=1e-5)


def test_state_dict_round_trip_and_nesting():
    a, b = tiny_mae(), MAE(tiny_encoder(), 32, 1, 2)
    b.load_state_dict(a.state_dict(), strict=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    wrapped = torch.nn.ModuleDict({"method": b})  # the renaming respects an outer prefix
    assert "method.blocks.0.attn.qkv.weight" in wrapped.state_dict()
    wrapped.load_state_dict(wrapped.state_dict(), strict=True)
    # parameters keep their module path; only the state dict is renamed
    assert "backbone.cls_token" in dict(a.named_parameters())


# --------------------------------------------------------------------------- the encoder sees visible patches only
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_encoder_processes_only_visible_tokens(ratio, fmnist):
    mae = tiny_mae()
    seen = {}
    hooks = [
        mae.backbone.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("enc", a[0].shape)),
        mae.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("dec", a[0].shape)),
    ]
    mae(fmnist[:4], mask_ratio=ratio)
    for h in hooks:
        h.remove()
    L = 49
    assert seen["enc"] == (4, 1 + int(L * (1 - ratio)), 32)  # ratio 0.75: 1 + 12 tokens, not 50
    assert seen["dec"] == (4, 1 + L, 32)


# --------------------------------------------------------------------------- the loss
def test_norm_pix_target_matches_hand_computation():
    mae = MAE(ViT(img_size=8, patch_size=4, in_chans=2, embed_dim=16, depth=1, num_heads=2), 8, 1, 2)
    imgs = torch.randn(2, 2, 8, 8)
    target = mae.target(imgs)
    for b in range(2):
        for gi in range(2):
            for gj in range(2):
                # pixels of patch (gi, gj) in (row, column, channel) order, written out
                vals = [float(imgs[b, c, 4 * gi + p, 4 * gj + q]) for p in range(4) for q in range(4) for c in range(2)]
                n = len(vals)
                mean = sum(vals) / n
                var = sum((v - mean) ** 2 for v in vals) / (n - 1)  # unbiased, as torch.var / MAE
                hand = torch.tensor([(v - mean) / (var + 1e-6) ** 0.5 for v in vals])
                assert torch.allclose(target[b, gi * 2 + gj], hand, atol=1e-5)
    mae.norm_pix_loss = False
    assert torch.equal(mae.target(imgs), mae.patchify(imgs))


def test_loss_counts_only_masked_patches(fmnist):
    mae = tiny_mae()
    loss, pred, mask = mae(fmnist[:4])
    target = mae.target(fmnist[:4])
    hand = sum(((pred[b, i] - target[b, i]) ** 2).mean() for b in range(4) for i in range(49) if mask[b, i] == 1)
    assert torch.allclose(loss, hand / mask.sum(), atol=1e-6)
    visible = (1 - mask).unsqueeze(-1)
    changed = pred + 100.0 * visible  # wreck the visible predictions only
    assert torch.allclose(mae.forward_loss(fmnist[:4], changed, mask), loss, atol=1e-6)
    hidden_changed = pred + 1.0 * mask.unsqueeze(-1)
    assert not torch.allclose(mae.forward_loss(fmnist[:4], hidden_changed, mask), loss)


def test_fixed_noise_fixes_mask_and_loss(fmnist):
    mae = tiny_mae().eval()
    noise = torch.rand(4, 49, generator=torch.Generator().manual_seed(0))
    l1, _, m1 = mae(fmnist[:4], noise=noise)
    l2, _, m2 = mae(fmnist[:4], noise=noise)
    assert torch.equal(m1, m2) and torch.equal(l1, l2)
    assert torch.equal(m1.sum(1), torch.full((4,), 37.0))


# --------------------------------------------------------------------------- training
def test_every_trainable_parameter_gets_a_gradient(fmnist):
    mae = tiny_mae()
    loss, logs = mae.training_step((fmnist[:8], torch.zeros(8)))
    assert torch.isfinite(loss) and isinstance(logs["loss"], float)
    loss.backward()
    frozen = {n for n, p in mae.named_parameters() if not p.requires_grad}
    assert frozen == {"decoder_pos_embed", "backbone.pos_embed"}  # the two fixed sin-cos tables
    for name, p in mae.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_falls_on_a_fixed_batch(fmnist):
    mae = tiny_mae()
    noise = torch.rand(16, 49, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = mae(fmnist, noise=noise)[0].item()
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.05)
    for _ in range(20):
        loss, _ = mae.training_step((fmnist, None))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = mae(fmnist, noise=noise)[0].item()
    assert after < 0.85 * before, (before, after)


def test_encoder_is_set_up_as_models_mae_does(fmnist):
    """Default: fixed sin-cos positions and xavier-uniform linears in the encoder (models_mae.py)."""
    encoder = tiny_encoder(pos_embed="learned")
    mae = MAE(encoder, 32, 1, 2)
    assert encoder.pos_embed_type == "sincos" and not encoder.pos_embed.requires_grad
    assert torch.equal(encoder.pos_embed[0], sincos_pos_embed_2d(32, 7))
    fc1 = encoder.blocks[0].mlp.fc1.weight  # (128, 32): xavier bound sqrt(6 / 160) = 0.19; std 0.11
    assert abs(fc1.std().item() - math.sqrt(2 / 160)) < 0.01 and fc1.abs().max() <= math.sqrt(6 / 160)
    assert torch.count_nonzero(encoder.blocks[0].attn.qkv.bias) == 0
    mae(fmnist[:2])[0].backward()
    assert encoder.pos_embed.grad is None


def test_init_encoder_false_keeps_the_given_encoder(fmnist):
    encoder = tiny_encoder(pos_embed="learned")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    mae = MAE(encoder, 32, 1, 2, init_encoder=False)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    mae(fmnist[:2])[0].backward()
    assert encoder.pos_embed.requires_grad and encoder.pos_embed.grad is not None


# --------------------------------------------------------------------------- figures
def test_reconstruct_pastes_visible_patches_and_unnormalises(fmnist):
    mae = tiny_mae().eval()
    x = fmnist[:3]
    noise = torch.rand(3, 49, generator=torch.Generator().manual_seed(2))
    masked, recon, pasted = mae.reconstruct(x, 0.75, noise=noise)
    assert masked.shape == recon.shape == pasted.shape == x.shape
    mask = mae(x, noise=noise)[2]
    m = mae.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 16))  # (B, 1, 28, 28), 1 on hidden pixels
    assert torch.equal(pasted * (1 - m), x * (1 - m))  # visible pixels are the input's
    assert torch.equal(masked * m, torch.zeros_like(x))
    assert torch.equal(pasted * m, recon * m)
    # a perfect norm-pix prediction must come back as the image itself
    mae.forward_decoder = lambda latent, ids_restore: mae.target(x)
    _, recon, pasted = mae.reconstruct(x, 0.75, noise=noise)
    assert torch.allclose(recon, x, atol=1e-4) and torch.allclose(pasted, x, atol=1e-4)


# --------------------------------------------------------------------------- errors
def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="encoder must be a vitssl_core.ViT"):
        MAE(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="decoder_embed_dim=30 is not divisible by decoder_num_heads=4"):
        MAE(tiny_encoder(), decoder_embed_dim=30, decoder_num_heads=4)
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(tiny_encoder(), 32, 1, 2, mask_ratio=1.0)
    mae = tiny_mae()
    with pytest.raises(ValueError, match=r"imgs must be \(B, 1, 28, 28\)"):
        mae(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="mask_ratio"):
        mae(torch.zeros(2, 1, 28, 28), mask_ratio=-0.5)
