"""The shared optimisation rules in vitssl_core/schedules.py: the EMA update and the weight-decay rule."""

import pytest
import torch

from vitssl_core import ViT
from vitssl_core.probes import layer_decay_param_groups
from vitssl_core.schedules import decays, ema_update_
from vitssl_core.train import param_groups


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
