"""The shared optimisation pieces (optim.py): the weight-decay rule, the EMA, and the one loop that
trains the linear probe, fine-tuning and the dense heads.

That loop replaced three loops of their own. Every number the book and the cards report came from
those, so the test that matters here runs the package as it was before the change (commit BEFORE,
read from this repository's git history) next to today's, in one process, on real Fashion-MNIST,
and asks for the same weights bit for bit, and the same predictions and losses.
"""

import importlib
import io
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import TINY
from vitssl_core import data, optim
from vitssl_core.dense import SegmentationHead, train_dense
from vitssl_core.features import pixel_features
from vitssl_core.optim import decays, ema_update_, param_groups
from vitssl_core.probes import finetune, layer_decay_param_groups, linear_probe
from vitssl_core.scenes import FashionScenes
from vitssl_core.vit import ViT

BEFORE = "5956aae"  # the last commit whose linear_probe, finetune and train_dense had loops of their own
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    """The package at BEFORE, importable as ``vitssl_before_fit`` (its own modules, its own classes)."""
    found = shutil.which("git") and subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{BEFORE}^{{commit}}"])
    if not found or found.returncode:
        pytest.skip(f"commit {BEFORE} is not in this checkout's history (a shallow clone?): nothing to compare with")
    tar = subprocess.run(["git", "-C", REPO, "archive", BEFORE, "vitssl_core/*.py"], capture_output=True, check=True)
    root = tmp_path_factory.mktemp("before")
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        archive.extractall(root, filter="data")
    (root / "vitssl_core").rename(root / "vitssl_before_fit")
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("vitssl_before_fit")
    finally:
        sys.path.remove(str(root))


@pytest.fixture(scope="module")
def fmnist(needs_fashion_mnist):
    images, labels = data.load_fashion_mnist_tensors(train=True)
    return images[:1600], labels[:1600]


@pytest.fixture
def optimizers(monkeypatch):
    """Every AdamW / SGD built while the test runs, in order: their parameters are the trained weights."""
    made = []
    for name in ("AdamW", "SGD"):
        base = getattr(torch.optim, name)
        recording = type(
            name,
            (base,),
            {"__init__": lambda self, *a, _b=base, **k: (_b.__init__(self, *a, **k), made.append(self))[0]},
        )
        monkeypatch.setattr(torch.optim, name, recording)
    return made


def weights(optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("optimizer, lr, weight_decay", [("adamw", 1e-3, 0.0), ("sgd", 0.1, 0.05)])
def test_linear_probe_is_bit_identical_to_its_own_loop(before, fmnist, optimizers, optimizer, lr, weight_decay):
    images, labels = fmnist
    x = pixel_features(images)  # (1600, 784)
    args = (x[:1200], labels[:1200], x[1200:], labels[1200:])
    kw = dict(
        epochs=4, batch_size=256, lr=lr, optimizer=optimizer, weight_decay=weight_decay, seed=3, return_correct=True
    )
    old = before.probes.linear_probe(*args, **kw)
    old_weights = weights(optimizers[-1])
    new = linear_probe(*args, **kw)
    assert same(weights(optimizers[-1]), old_weights)
    assert torch.equal(new["correct"], old["correct"])
    assert (new["top1"], new["train_top1"]) == (old["top1"], old["train_top1"])
    # The loop sums the last epoch's losses in float64 (Python floats); the old probe summed float32 tensors.
    assert new["loss"] == pytest.approx(old["loss"], rel=1e-6)


def test_finetune_is_bit_identical_to_its_own_loop(before, fmnist, optimizers):
    images, labels = fmnist
    torch.manual_seed(0)
    backbone = ViT(**TINY)
    old_backbone = before.vit.ViT(**TINY)  # the old finetune sets the drop path of its own DropPath class
    old_backbone.load_state_dict(backbone.state_dict())
    kw = dict(
        epochs=2, lr=1e-3, batch_size=64, warmup_epochs=1, drop_path=0.1, mixup=0.8, cutmix=1.0,
        crop_scale=(0.35, 1.0), normalize=data.NORMALIZE["fashion_mnist"], seed=5, return_correct=True,
    )  # fmt: skip
    train, test = (images[:512], labels[:512]), (images[1200:], labels[1200:])
    torch.manual_seed(11)  # the new head is drawn from the caller's generator (finetune's seed covers the rest)
    old = before.probes.finetune(old_backbone, train, test, 10, **kw)
    old_weights = weights(optimizers[-1])
    torch.manual_seed(11)
    new = finetune(backbone, train, test, 10, **kw)
    assert same(weights(optimizers[-1]), old_weights)
    assert torch.equal(new["correct"], old["correct"])
    assert {k: new[k] for k in ("top1", "train_loss", "epochs", "steps")} == {
        k: old[k] for k in ("top1", "train_loss", "epochs", "steps")
    }


def test_train_dense_is_bit_identical_to_its_own_loop(before, needs_fashion_mnist):
    scenes = FashionScenes("train", num_scenes=24, seed=0)
    shape = dict(img_size=64, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    backbone = ViT(**shape)
    old_backbone = before.vit.ViT(**shape)
    old_backbone.load_state_dict(backbone.state_dict())
    old_head = before.dense.SegmentationHead(old_backbone, num_classes=11, decoder="light")
    head = SegmentationHead(backbone, num_classes=11, decoder="light")
    head.load_state_dict(old_head.state_dict())
    kw = dict(epochs=2, lr=3e-3, batch_size=8, task="segmentation", seed=1, weight_decay=0.05, warmup_steps=2)
    old = before.dense.train_dense(old_head, scenes, **kw)
    new = train_dense(head, scenes, **kw)
    assert new == old  # the loss and lr of every step, the mean loss of every epoch
    assert same(list(head.state_dict().values()), list(old_head.state_dict().values()))


# --------------------------------------------------------------------------- the loop's own contract
def test_fit_scales_each_groups_rate_and_stops_at_a_non_finite_loss():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [w], "lr_scale": 0.5}], lr=1.0)
    seen = []

    def loss_of(batch):
        seen.append(opt.param_groups[0]["lr"])
        return (w * batch).sum(), len(batch)

    schedule = torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    history = optim.fit(opt, schedule, 2, lambda: [torch.ones(2), torch.ones(2)], loss_of)
    assert seen == [0.5, 0.25, 0.125, 0.0625]  # schedule x lr_scale, one value per step
    assert [len(epoch) for epoch in history] == [2, 2] and history[0][0] == (2.0, 2)
    torch.testing.assert_close(w.detach(), torch.ones(2) - sum(seen))  # d(w.1)/dw = 1 per step
    before_nan = w.detach().clone()
    with pytest.raises(FloatingPointError, match=r"probe: the loss is nan at step 1 of 4 \(epoch 1 of 2\)"):
        optim.fit(opt, schedule, 2, lambda: [torch.tensor([math.nan, 1.0])], loss_of, what="probe")
    assert torch.equal(w.detach(), before_nan)  # stopped before the step
    with pytest.raises(ValueError, match="schedule has 1 values"):
        optim.fit(opt, schedule[:1], 1, lambda: [torch.ones(2), torch.ones(2)], loss_of)
    with pytest.raises(ValueError, match="epochs=0"):
        optim.fit(opt, schedule, 0, lambda: [], loss_of)
    with pytest.raises(TypeError, match="optimizer must be"):
        optim.fit(None, schedule, 1, lambda: [], loss_of)


def test_param_groups_follow_the_one_rule_and_leave_frozen_parameters_out():
    torch.manual_seed(0)
    vit = ViT(**TINY)
    vit.patch_embed.proj.weight.requires_grad_(False)
    decayed, undecayed = param_groups(vit, 0.05)
    assert "patch_embed.proj.weight" not in decayed["names"] + undecayed["names"]
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"} <= set(undecayed["names"])
    assert "blocks.0.attn.qkv.weight" in decayed["names"] and decayed["weight_decay"] == 0.05
    assert undecayed["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="weight_decay=-1"):
        param_groups(vit, -1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(torch.nn.Linear(2, 2).requires_grad_(False), 0.05)


# --------------------------------------------------------------------------- the EMA and the weight-decay rule
def test_ema_update_is_m_target_plus_1_minus_m_source():
    target, source = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    ema_update_([target], [source], 0.75)
    assert torch.equal(target, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2]))
    ema_update_([target], [source], 0.0)  # m = 0 copies the source
    assert torch.equal(target, source)
    with pytest.raises(ValueError, match="pair up"):
        ema_update_([target], [source, source], 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([target], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="momentum=1.5"):
        ema_update_([target], [source], 1.5)


def test_ema_update_takes_no_gradient_and_leaves_the_source():
    source = torch.ones(2, requires_grad=True)
    target = torch.zeros(2)
    ema_update_([target], [source], 0.5)
    assert not target.requires_grad and torch.equal(source.detach(), torch.ones(2))


def test_one_weight_decay_rule_for_the_trainer_and_fine_tuning():
    torch.manual_seed(0)
    backbone = ViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    expected = {
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.proj.weight",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.weight",
        "head.weight",
    }
    assert {n for n, p in backbone.named_parameters() if decays(n, p)} == expected
    method = torch.nn.Module()
    method.backbone = backbone  # what the trainer sees of a method
    trainer = param_groups(method, 0.05)[0]["names"]  # the decayed group, with the method's prefix
    assert {n.removeprefix("backbone.") for n in trainer} == expected
    fine_tuning = {
        n for g in layer_decay_param_groups(backbone, 1e-3, 0.05) if g["weight_decay"] > 0 for n in g["param_names"]
    }
    assert fine_tuning == expected
    assert not decays("blocks.0.mlp.fc1.weight", torch.zeros(2, 2), exempt={"fc1.weight"})
    with pytest.raises(TypeError):
        decays(3, torch.zeros(2, 2))
