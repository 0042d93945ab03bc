"""The ViT backbone: agreement with timm, shapes, hooks, interpolation and errors."""

import json
import math

import pytest
import timm
import torch
from torch import nn

import vitssl_core
from vitssl_core import ViT
from vitssl_core.vit import Attention, resample_pos_embed, sincos_pos_embed_2d

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=48, depth=2, num_heads=3)


def tiny(**kw):
    torch.manual_seed(0)
    return ViT(**{**TINY, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        dict(img_size=28, patch_size=4, in_chans=1, embed_dim=48, depth=2, num_heads=3, num_classes=10),
        dict(
            img_size=32,
            patch_size=4,
            in_chans=3,
            embed_dim=64,
            depth=3,
            num_heads=4,
            global_pool="avg",
            init_values=1e-4,
            num_classes=5,
        ),
        dict(
            img_size=32,
            patch_size=8,
            in_chans=3,
            embed_dim=32,
            depth=1,
            num_heads=2,
            qkv_bias=False,
            mlp_ratio=2.0,
            num_classes=0,
        ),
        dict(img_size=28, patch_size=4, in_chans=1, embed_dim=48, depth=2, num_heads=3, fc_norm=True, num_classes=10),
    ],
)
def test_matches_timm_keys_and_outputs(kw):
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(**kw).eval()
    ours = ViT(**kw).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, kw["in_chans"], kw["img_size"], kw["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ours.forward_head(ours.forward_features(x), pre_logits=True),
            ref.forward_head(ref.forward_features(x), pre_logits=True),
            atol=1e-5,
            rtol=0,
        )


def test_loads_into_timm_and_back():
    ours = tiny(num_classes=10).eval()
    ref = timm.models.vision_transformer.VisionTransformer(**TINY, num_classes=10).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_presets_match_timm_parameter_counts():
    for ours, name in [
        (vitssl_core.vit_tiny, "vit_tiny_patch16_224"),
        (vitssl_core.vit_small, "vit_small_patch16_224"),
        (vitssl_core.vit_base, "vit_base_patch16_224"),
    ]:
        ref = timm.create_model(name, pretrained=False, num_classes=0)
        m = ours()
        assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
        assert list(m.state_dict()) == list(ref.state_dict())


def test_small_image_presets_shapes():
    x28, x32 = torch.rand(2, 1, 28, 28), torch.rand(2, 3, 32, 32)
    for build, x, n in [
        (vitssl_core.vit_tiny_28, x28, 50),
        (vitssl_core.vit_small_28, x28, 50),
        (vitssl_core.vit_tiny_32, x32, 65),
        (vitssl_core.vit_small_32, x32, 65),
        (vitssl_core.vit_mini_28, x28, 17),
    ]:
        m = build(depth=1)
        tokens = m.forward_features(x)
        assert tokens.shape == (2, n, m.embed_dim)
        assert m(x).shape == (2, m.embed_dim)  # num_classes=0 gives features
    assert vitssl_core.vit_tiny_28(num_classes=10, depth=1)(x28).shape == (2, 10)


def test_architecture_rebuilds_the_structure():
    from vitssl_core.vit import architecture

    for model in (
        vitssl_core.vit_mini_28(),
        tiny(depth=2, init_values=1e-5, global_pool="avg"),
        vitssl_core.vit_tiny_28(depth=1, pos_embed="sincos", dynamic_img_size=True),
    ):
        kwargs = architecture(model)
        json.dumps(kwargs)  # a card is JSON
        rebuilt = ViT(**kwargs)
        rebuilt.load_state_dict(model.state_dict())  # strict: same keys, same shapes
        assert architecture(rebuilt) == kwargs
    assert sum(p.numel() for p in vitssl_core.vit_mini_28().parameters()) == 1_198_592
    with pytest.raises(TypeError, match="vitssl_core.ViT"):
        architecture(torch.nn.Linear(2, 2))


def test_fused_and_manual_attention_agree():
    m = tiny(depth=3).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        fused = m.forward_features(x)
        Attention.fused_attn = False
        try:
            manual = m.forward_features(x)
        finally:
            Attention.fused_attn = True
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)


def test_manual_attention_equals_hand_computation():
    attn = Attention(dim=8, num_heads=2).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        out, weights = attn(x, return_attention=True)
        q, k, v = attn.qkv(x).chunk(3, dim=-1)  # each (1, 5, 8): heads are 4-wide slices
        heads = []
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), dim=-1)
            torch.testing.assert_close(a, weights[:, h])
            heads.append(a @ v[..., s])
        expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5))


def test_last_selfattention_and_intermediate_layers():
    m = tiny(depth=3).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        attn = m.get_last_selfattention(x)
        assert attn.shape == (2, 3, 50, 50)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 50))
        layers = m.get_intermediate_layers(x, n=2)
        assert len(layers) == 2 and all(t.shape == (2, 50, 48) for t in layers)
        torch.testing.assert_close(layers[-1], m.forward_features(x))
        maps = m.get_selfattentions(x)
        assert len(maps) == 3
        torch.testing.assert_close(maps[-1], attn)
    with pytest.raises(ValueError, match="n=4"):
        m.get_intermediate_layers(x, n=4)


def test_every_parameter_gets_a_gradient():
    m = tiny(num_classes=10, init_values=1e-3, drop_path_rate=0.1)
    m(torch.randn(4, 1, 28, 28)).logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_sincos_pos_embed_is_fixed_and_matches_formula():
    m = tiny(pos_embed="sincos")
    assert not m.pos_embed.requires_grad
    table = sincos_pos_embed_2d(48, 7)
    assert table.shape == (50, 48)
    assert torch.all(table[0] == 0)
    # Patch at row r, column c: first half encodes c, second half r, each as [sin(pos*w), cos(pos*w)].
    r, c, d = 2, 5, 48
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    expected = torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega), torch.cos(r * omega)])
    torch.testing.assert_close(table[1 + r * 7 + c], expected.float())
    torch.testing.assert_close(m.pos_embed[0], table)
    assert set(m.no_weight_decay()) == {"pos_embed", "cls_token"}


def test_drop_path_is_linear_over_depth_and_off_in_eval():
    m = tiny(depth=4, drop_path_rate=0.3)
    rates = [blk.drop_path1.drop_prob for blk in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    m.eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(m(x), m(x))


def test_keep_idx_encodes_only_the_kept_patches():
    m = tiny().eval()
    x = torch.randn(2, 1, 28, 28)
    keep = torch.stack([torch.randperm(49)[:12] for _ in range(2)])  # (B, 12)
    with torch.no_grad():
        out = m.forward_features(x, keep_idx=keep)
        assert out.shape == (2, 13, 48)
        # Keeping every patch in order is the ordinary forward pass.
        torch.testing.assert_close(
            m.forward_features(x, keep_idx=torch.arange(49).expand(2, -1)), m.forward_features(x)
        )
        # The kept tokens are the same as embedding those patches directly: check the first layer input.
        tokens = m.prepare_tokens(x)
        kept = m.prepare_tokens(x, keep_idx=keep)
        torch.testing.assert_close(kept[:, 1:], torch.gather(tokens[:, 1:], 1, keep[..., None].expand(-1, -1, 48)))


def test_mask_token_replaces_hidden_patches():
    m = tiny().eval()
    x = torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 49)
    mask[:, :10] = 1
    token = torch.randn(1, 1, 48)
    with torch.no_grad():
        t = m.prepare_tokens(x, mask=mask, mask_token=token)
        plain = m.prepare_tokens(x)
        pos = m.pos_embed[:, 1:]
        torch.testing.assert_close(t[:, 1:11], (token + pos[:, :10]).expand(2, -1, -1))
        torch.testing.assert_close(t[:, 11:], plain[:, 11:])
    with pytest.raises(ValueError, match="mask_token"):
        m.forward_features(x, mask=mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        m.forward_features(x, mask=mask[:, :5], mask_token=token)


def test_resample_pos_embed_matches_timm():
    from timm.layers import resample_abs_pos_embed

    pe = torch.randn(1, 1 + 49, 16)
    ours = resample_pos_embed(pe, (14, 14), (7, 7))
    ref = resample_abs_pos_embed(pe, new_size=(14, 14), old_size=(7, 7), num_prefix_tokens=1)
    torch.testing.assert_close(ours, ref)
    assert resample_pos_embed(pe, (7, 7)) is pe


def test_set_img_size_and_dynamic_img_size():
    m = tiny().eval()
    x56 = torch.randn(2, 1, 56, 56)
    with pytest.raises(ValueError, match="set_img_size"):
        m(x56)
    dyn = tiny(dynamic_img_size=True).eval()
    dyn.load_state_dict(m.state_dict())
    with torch.no_grad():
        out_dyn = dyn.forward_features(x56)
        m.set_img_size(56)
        out_set = m.forward_features(x56)
    assert out_set.shape == (2, 1 + 196, 48)
    torch.testing.assert_close(out_dyn, out_set)
    # Back at the original size, the dynamic model is the plain model.
    x28 = torch.randn(2, 1, 28, 28)
    m2 = tiny().eval()
    with torch.no_grad():
        torch.testing.assert_close(dyn.forward_features(x28), m2.forward_features(x28))


def test_dynamic_sincos_gives_the_exact_table():
    m = tiny(pos_embed="sincos", dynamic_img_size=True)
    torch.testing.assert_close(m._pos_embed_for(56, 56)[0], sincos_pos_embed_2d(48, 14))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(img_size=30), "img_size=30 is not divisible by patch_size=4"),
        (dict(embed_dim=50), "embed_dim=50 is not divisible by num_heads=3"),
        (dict(pos_embed="rope"), "pos_embed='rope'"),
        (dict(global_pool="max"), "global_pool='max'"),
        (dict(depth=0), "depth=0"),
        (dict(num_classes=-1), "num_classes=-1"),
        (dict(drop_path_rate=1.5), "drop_path_rate=1.5"),
    ],
)
def test_bad_construction_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        ViT(**{**TINY, **kw})


def test_bad_inputs_raise_clear_errors():
    m = tiny()
    with pytest.raises(ValueError, match="3 channels but the model was built with in_chans=1"):
        m(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="4 dims"):
        m(torch.randn(1, 28, 28))
    with pytest.raises(ValueError, match="does not match the model's img_size=28"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([[0.0]])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        m.set_img_size(30)
    dyn = tiny(dynamic_img_size=True)
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        dyn(torch.randn(1, 1, 30, 30))


def test_reset_classifier():
    m = tiny()
    m.reset_classifier(7, global_pool="avg")
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    m.reset_classifier(0)
    assert isinstance(m.head, nn.Identity)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="sum")


def test_trains_on_a_fixed_batch():
    m = tiny(num_classes=10)
    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_close_to_fp32():
    m = tiny(num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
