"""Tests for vitssl_core.masked: the masked-token cross-entropy, SimMIM, the k-means tokenizer, BEiT."""

import math

import pytest
import torch

from vitssl_core.data import NORMALIZE, load_fashion_mnist_tensors
from vitssl_core.masked import BEiT, PatchTokenizer, SimMIM, masked_token_cross_entropy
from vitssl_core.vit import ViT


@pytest.fixture(scope="module")
def fmnist_uint8(needs_fashion_mnist):
    images, _ = load_fashion_mnist_tensors(train=False)
    return images.unsqueeze(1)  # (10000, 1, 28, 28) uint8


@pytest.fixture(scope="module")
def fmnist(fmnist_uint8):
    """16 real Fashion-MNIST test images, normalised like the training data: (16, 1, 28, 28)."""
    x = fmnist_uint8[:16].float().div(255)
    return (x - NORMALIZE["fashion_mnist"]["mean"][0]) / NORMALIZE["fashion_mnist"]["std"][0]


@pytest.fixture(scope="module")
def tokenizer(fmnist_uint8):
    x = fmnist_uint8[1000:1600].float().div(255)
    x = (x - NORMALIZE["fashion_mnist"]["mean"][0]) / NORMALIZE["fashion_mnist"]["std"][0]
    return PatchTokenizer.fit(x, patch_size=4, vocab_size=32, iters=10, seed=0)


def tiny_encoder(img_size=28, in_chans=1):
    torch.manual_seed(0)
    return ViT(img_size=img_size, patch_size=4, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2)


def train_steps(model, batch, steps, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    for _ in range(steps):
        loss, _ = model.training_step((batch, None))
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_all_trainable_get_grads(model, batch):
    loss, logs = model.training_step((batch, torch.zeros(len(batch))))
    assert torch.isfinite(loss) and all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    return logs


# --------------------------------------------------------------------------- the article's loss
def test_article_example_16_patches_4_masked():
    """Section 4.2.2: 16 patches, 4 hidden, L = -(y1 log y^1 + ... + y4 log y^4) with one-hot y."""
    g = torch.Generator().manual_seed(0)
    K = 8
    logits = torch.randn(1, 16, K, generator=g, dtype=torch.float64)
    target = torch.randint(0, K, (1, 16), generator=g)
    hidden = [2, 5, 11, 14]
    mask = torch.zeros(1, 16)
    mask[0, hidden] = 1
    hand = 0.0
    for i in hidden:
        row = logits[0, i].tolist()
        p_true = math.exp(row[target[0, i]]) / sum(math.exp(v) for v in row)  # softmax, by hand
        hand += -math.log(p_true)
    assert abs(masked_token_cross_entropy(logits, target, mask, reduction="sum").item() - hand) < 1e-6
    assert abs(masked_token_cross_entropy(logits, target, mask, reduction="mean").item() - hand / 4) < 1e-6
    f32 = masked_token_cross_entropy(logits.float(), target, mask, reduction="sum").item()
    assert abs(f32 - hand) < 1e-5 * hand
    # visible patches do not count, whatever is predicted there
    wrecked = logits.clone()
    wrecked[0, [0, 1, 3]] = 50.0 * torch.randn(3, K, dtype=torch.float64)
    assert abs(masked_token_cross_entropy(wrecked, target, mask, reduction="sum").item() - hand) < 1e-6


def test_cross_entropy_errors():
    with pytest.raises(ValueError, match="reduction='none' must be 'sum' or 'mean'"):
        masked_token_cross_entropy(torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), "none")
    with pytest.raises(ValueError, match="must both be"):
        masked_token_cross_entropy(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4))


# --------------------------------------------------------------------------- SimMIM
def test_simmim_loss_is_l1_on_hidden_patches(fmnist):
    model = SimMIM(tiny_encoder())
    loss, pred, mask = model(fmnist[:4])
    assert pred.shape == (4, 49, 16) and mask.shape == (4, 49)
    assert model.mask_unit == 1  # a 7x7 grid cannot hold 2x2 units: single patches
    assert torch.equal(mask.sum(1), torch.full((4,), float(math.ceil(49 * 0.6))))  # SimMIM's count, 30
    target = torch.nn.functional.unfold(fmnist[:4], 4, stride=4).transpose(1, 2)  # (4, 49, 16), 1 channel
    hand = sum((pred[b, i] - target[b, i]).abs().mean() for b in range(4) for i in range(49) if mask[b, i])
    assert torch.allclose(loss, hand / mask.sum(), atol=1e-6)


def test_simmim_encoder_sees_mask_token_at_hidden_patches(fmnist):
    model = SimMIM(tiny_encoder())
    mask = torch.zeros(2, 49)
    mask[:, :10] = 1
    seen = {}
    h = model.backbone.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    model(fmnist[:2], mask=mask)
    h.remove()
    x = seen["x"]  # (2, 1+49, D): every token, hidden ones replaced by mask_token + position
    assert x.shape == (2, 50, 32)
    pos = model.backbone.pos_embed[0, 1:11]
    assert torch.allclose(x[:, 1:11], (model.mask_token[0] + pos).expand(2, -1, -1), atol=1e-6)


def test_simmim_masks_2x2_patch_units_on_vit_mini_28(fmnist):
    """SimMIM hides 32-px squares over 16-px patches; on vit_mini_28's 4x4 grid of 7-px patches the
    default unit is 2x2 patches, a 2x2 grid of units, and ceil(4 * 0.6) = 3 of them are hidden."""
    torch.manual_seed(0)
    mini = ViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    model = SimMIM(mini)
    assert model.mask_unit == 2
    mask = model.random_mask(64)  # (64, 16)
    units = mask.view(64, 2, 2, 2, 2)  # (B, unit row, patch row in unit, unit col, patch col in unit)
    assert torch.equal(units.amax(dim=(2, 4)), units.amin(dim=(2, 4)))  # whole, aligned units only
    assert torch.equal(units.amax(dim=(2, 4)).sum(dim=(1, 2)), torch.full((64,), 3.0))
    assert torch.equal(mask.sum(1), torch.full((64,), 12.0))
    loss, pred, used = model(fmnist[:4])  # forward draws the same kind of mask
    assert torch.equal(used.sum(1), torch.full((4,), 12.0)) and torch.isfinite(loss)


def test_simmim_mask_unit_on_a_larger_grid():
    model = SimMIM(tiny_encoder(img_size=32, in_chans=3), mask_ratio=0.5, mask_unit=4)  # 8x8 grid, 2x2 units
    mask = model.random_mask(3).view(3, 8, 8)
    blocks = mask.unfold(1, 4, 4).unfold(2, 4, 4)  # (3, 2, 2, 4, 4): one 16-pixel square each
    assert torch.equal(blocks.amax(dim=(-1, -2)), blocks.amin(dim=(-1, -2)))  # constant per square
    assert torch.equal(mask.sum(dim=(1, 2)), torch.full((3,), 2 * 16.0))  # 2 of 4 squares hidden
    assert SimMIM(tiny_encoder(img_size=32, in_chans=3)).mask_unit == 2  # the default on an even grid


def test_simmim_mask_unit_errors():
    with pytest.raises(ValueError, match="mask_unit=2 .* must be a positive int that divides the 7x7 patch grid"):
        SimMIM(tiny_encoder(), mask_unit=2)
    with pytest.raises(ValueError, match="mask_unit=0"):
        SimMIM(tiny_encoder(), mask_unit=0)
    mini = ViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="hides all 4 units of 2x2 patches"):
        SimMIM(mini, mask_ratio=0.8)  # ceil(4 * 0.8) = 4


def test_simmim_gradients_and_loss_falls(fmnist):
    model = SimMIM(tiny_encoder())
    assert_all_trainable_get_grads(model, fmnist[:8])
    model.zero_grad()
    torch.manual_seed(1)
    fixed = model.random_mask(16)
    with torch.no_grad():
        before = model(fmnist, mask=fixed)[0].item()
    train_steps(model, fmnist, 20)
    with torch.no_grad():
        after = model(fmnist, mask=fixed)[0].item()
    assert after < 0.85 * before, (before, after)


# --------------------------------------------------------------------------- the tokenizer
def test_tokenizer_shapes_and_round_trip(tokenizer, fmnist):
    ids = tokenizer.encode(fmnist[:5])
    assert ids.shape == (5, 49) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 32
    dec = tokenizer.decode(ids)
    assert dec.shape == (5, 1, 28, 28)
    # normalize="patch" decodes to the normalised pattern of each code
    patches = torch.nn.functional.unfold(dec, 4, stride=4).transpose(1, 2)  # (5, 49, 16)
    assert torch.equal(patches, tokenizer.codebook[ids])
    assert tokenizer.code_usage(fmnist) > 0.5
    # normalize="global" decodes to pixels, and a decoded code encodes back to itself
    glob = PatchTokenizer.fit(fmnist, 4, vocab_size=16, iters=5, normalize="global")
    ids = glob.encode(fmnist[:5])
    assert torch.equal(glob.encode(glob.decode(ids)), ids)


def test_kmeans_reduces_distortion_against_random_codes(fmnist_uint8):
    x = fmnist_uint8[2000:2400]
    held_out = fmnist_uint8[3000:3200].float().div(255)
    for normalize in ("patch", "global"):
        fitted = PatchTokenizer.fit(x, 4, vocab_size=32, iters=10, seed=0, normalize=normalize)
        random_codes = PatchTokenizer.fit(x, 4, vocab_size=32, iters=0, seed=0, normalize=normalize, init="random")
        assert fitted.distortion(held_out) < 0.8 * random_codes.distortion(held_out), normalize
    # "global" decodes to images: the codes reconstruct held-out images better than their mean does
    recon = fitted.decode(fitted.encode(held_out))
    assert ((recon - held_out) ** 2).mean() < 0.5 * ((held_out - held_out.mean()) ** 2).mean()


def test_tokenizer_fit_is_deterministic(fmnist_uint8):
    x = fmnist_uint8[:200]
    a = PatchTokenizer.fit(x, 4, vocab_size=16, iters=3, seed=7)
    b = PatchTokenizer.fit(x, 4, vocab_size=16, iters=3, seed=7)
    assert torch.equal(a.codebook, b.codebook)


def test_tokenizer_save_load_round_trip(tokenizer, fmnist, tmp_path):
    path = tmp_path / "tok.pt"
    tokenizer.save(path)
    loaded = PatchTokenizer.load(path)
    assert loaded.config() == tokenizer.config()
    assert torch.equal(loaded.codebook, tokenizer.codebook)
    assert torch.equal(loaded.encode(fmnist), tokenizer.encode(fmnist))


def test_tokenizer_errors(fmnist):
    with pytest.raises(ValueError, match="normalize='pixel' is not one of"):
        PatchTokenizer(4, 16, normalize="pixel")
    with pytest.raises(ValueError, match="vocab_size=1000 is larger than the"):
        PatchTokenizer.fit(fmnist[:2], 4, vocab_size=1000)
    with pytest.raises(ValueError, match=r"imgs must be \(B, C=3"):
        PatchTokenizer(4, 16, in_chans=3).encode(fmnist)
    with pytest.raises(ValueError, match="ids must lie in"):
        PatchTokenizer(4, 16).decode(torch.full((1, 49), 16))


# --------------------------------------------------------------------------- BEiT
def test_beit_loss_and_accuracy_on_hidden_patches(tokenizer, fmnist):
    model = BEiT(tiny_encoder(), tokenizer, num_masked=20)
    assert model.min_block == 4  # BEiT's 16 of 196 patches, rescaled to the 7x7 grid
    loss, logits, mask = model(fmnist[:4])
    assert logits.shape == (4, 49, 32)
    assert (mask.sum(1) <= 20).all() and mask.sum() > 0  # BEiT's block masking may stop a little short
    target = tokenizer.encode(fmnist[:4])
    assert torch.allclose(loss, masked_token_cross_entropy(logits, target, mask, "sum") / mask.sum(), atol=1e-6)
    torch.manual_seed(3)  # the same masks in both calls
    logs = assert_all_trainable_get_grads(model, fmnist[:8])
    torch.manual_seed(3)
    with torch.no_grad():
        _, logits, mask = model(fmnist[:8])
    hidden = mask.bool()
    by_hand = (logits.argmax(-1)[hidden] == tokenizer.encode(fmnist[:8])[hidden]).float().mean().item()
    assert set(logs) == {"loss", "token_acc"} and logs["token_acc"] == pytest.approx(by_hand)
    assert not any(p.requires_grad for p in model.tokenizer.parameters())


def test_beit_loss_falls(tokenizer, fmnist):
    model = BEiT(tiny_encoder(), tokenizer)  # mask_ratio 0.4: 20 of 49
    assert model.num_masked == 20
    torch.manual_seed(2)
    from vitssl_core.masking import block_masking

    fixed = block_masking(16, 7, model.num_masked)
    with torch.no_grad():
        before = model(fmnist, mask=fixed)[0].item()
    train_steps(model, fmnist, 20)
    with torch.no_grad():
        after = model(fmnist, mask=fixed)[0].item()
    assert after < 0.85 * before, (before, after)


def test_beit_checkpoint_carries_the_tokenizer(tokenizer, fmnist):
    model = BEiT(tiny_encoder(), tokenizer)
    state = model.state_dict()
    assert torch.equal(state["tokenizer.codebook"], tokenizer.codebook)
    fresh = BEiT(tiny_encoder(), PatchTokenizer(**tokenizer.config()))
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.tokenizer.encode(fmnist), tokenizer.encode(fmnist))


def test_beit_errors(tokenizer):
    with pytest.raises(ValueError, match="does not match the encoder"):
        BEiT(ViT(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=1, num_heads=2), tokenizer)
    with pytest.raises(ValueError, match="num_masked=49"):
        BEiT(tiny_encoder(), tokenizer, num_masked=49)
    with pytest.raises(TypeError, match="tokenizer must be a PatchTokenizer"):
        BEiT(tiny_encoder(), object())
    with pytest.raises(ValueError, match="min_block=0"):
        BEiT(tiny_encoder(), tokenizer, min_block=0)


def test_beit_data_recipe_follows_beit():
    """The CLI's BEiT recipe: crop scale (0.08, 1) and ColorJitter 0.4 (brightness and contrast on
    grey images), as unilm beit/datasets.py; SimMIM keeps its own (0.67, 1) crop and no jitter."""
    from torchvision.transforms import v2

    from vitssl_core.__main__ import METHODS, DataInfo

    grey = DataInfo("fashion_mnist", 28, 1, (0.5,), (0.5,), 10)
    flat = [(torch.full((1, 28, 28), 0.5), 0)] * 200  # a flat grey image: crops and flips leave it as is

    def steps(method, info=grey):
        return METHODS[method].data(flat, info, None).transform.transforms

    crop = next(t for t in steps("beit") if isinstance(t, v2.RandomResizedCrop))
    assert crop.scale == (0.08, 1.0)
    jitter = next(t for t in steps("beit") if isinstance(t, v2.ColorJitter))
    assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4) and jitter.saturation is None
    rgb = DataInfo("cifar10", 32, 3, (0.5,) * 3, (0.5,) * 3, 10)
    rgb_jitter = next(t for t in steps("beit", rgb) if isinstance(t, v2.ColorJitter))
    assert rgb_jitter.saturation == (0.6, 1.4) and rgb_jitter.hue is None  # ColorJitter(0.4, 0.4, 0.4)
    torch.manual_seed(0)
    beit_data = METHODS["beit"].data(flat, grey, None)
    values = torch.stack([beit_data[i][0].mean() for i in range(50)])  # normalised: 0 without jitter
    assert values.std() > 0.1 and values.abs().max() <= 0.4 + 1e-6  # (0.5 * [0.6, 1.4] - 0.5) / 0.5
    simmim_data = METHODS["simmim"].data(flat, grey, None)
    assert not any(isinstance(t, v2.ColorJitter) for t in simmim_data.transform.transforms)
    assert torch.equal(simmim_data[0][0], torch.zeros(1, 28, 28))
