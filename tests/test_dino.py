"""Tests for vitssl_core.dino: the DINO head, multi-crop training step on real Fashion-MNIST crops,
EMA teacher, centring, temperature warm-up, collapse diagnostics and checks."""

import math
import multiprocessing as mp

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vitssl_core import data
from vitssl_core.augment import MultiCrop, dino_augment
from vitssl_core.dino import DINO, DINOHead
from vitssl_core.schedules import cosine_momentum
from vitssl_core.vit import ViT

MEAN, STD = data.NORMALIZE["fashion_mnist"]["mean"], data.NORMALIZE["fashion_mnist"]["std"]
K = 64  # prototypes in the tests


def tiny_vit(dynamic=True):
    return ViT(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, dynamic_img_size=dynamic)


def make(**kw):
    torch.manual_seed(0)
    args = dict(out_dim=K, hidden_dim=64, bottleneck_dim=16, n_local_crops=2, momentum=0.9)
    return DINO(tiny_vit(), **{**args, **kw})


@pytest.fixture(scope="module")
def batch():
    try:
        ds = data.FashionMNIST(train=False, download=False)
    except data.DatasetNotFoundError as err:  # pragma: no cover
        pytest.skip(f"Fashion-MNIST not available: {err}")
    torch.manual_seed(0)
    g1, g2, local = dino_augment(28, 12, grayscale=True, mean=MEAN, std=STD)
    return next(iter(DataLoader(MultiCrop(ds, g1, g2, local, n_local=2), batch_size=16, shuffle=True)))


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def teacher_params(model):
    return list(model.teacher_backbone.parameters()) + list(model.teacher_head.parameters())


def student_params(model):
    return list(model.backbone.parameters()) + list(model.head.parameters())


# --------------------------------------------------------------------------- head
def test_head_shapes_and_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(32, K, hidden_dim=64, bottleneck_dim=16)
    assert head(torch.randn(5, 32)).shape == (5, K)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones(K, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(K))
    # Logits are cosines between a unit bottleneck vector and unit prototypes.
    assert head(100 * torch.randn(5, 32)).abs().max() <= 1.0 + 1e-5
    free = DINOHead(32, K, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    assert DINOHead(32, K, nlayers=1, bottleneck_dim=16)(torch.randn(2, 32)).shape == (2, K)


def test_freeze_last_layer_gives_zero_gradient_then_releases(batch):
    model = make(freeze_last_layer_steps=2)
    v = model.head.last_layer.parametrizations.weight.original1
    model.training_step(batch)[0].backward()
    assert v.grad is not None and v.grad.abs().sum() == 0
    assert model.head.mlp[0].weight.grad.abs().sum() > 0  # the rest of the head still learns
    model.on_step_end(0, 10)
    assert model.head.freeze_last_layer  # step 1 of 2 still frozen
    model.on_step_end(1, 10)
    model.zero_grad()
    model.training_step(batch)[0].backward()
    assert v.grad.abs().sum() > 0


# --------------------------------------------------------------------------- the method
def test_training_step_returns_finite_loss_and_diagnostics(batch):
    model = make()
    crops, _ = batch
    assert [tuple(c.shape) for c in crops] == [(16, 1, 28, 28)] * 2 + [(16, 1, 12, 12)] * 2
    loss, logs = model.training_step(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(logs) >= {"loss", "teacher_entropy", "kl", "center_norm", "teacher_temp", "momentum"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    assert 0.0 <= logs["teacher_entropy"] <= math.log(K) + 1e-5
    assert logs["kl"] >= -1e-5
    assert logs["center_norm"] == 0.0  # the loss used the initial centre


def test_diagnostics_agree_with_a_direct_computation(batch):
    model = make()
    crops, _ = batch
    with torch.no_grad():
        feats = [model.backbone.forward_head(model.backbone.forward_features(c), pre_logits=True) for c in crops]
        s = [F.log_softmax(model.head(f) / 0.1, dim=-1) for f in feats]
        t = [F.softmax(model.teacher_head(f) / 0.04, dim=-1) for f in feats[:2]]  # teacher = student at init
    entropy = sum(-(p * p.clamp_min(1e-30).log()).sum(-1).mean() for p in t) / 2
    kl = sum((p * (p.clamp_min(1e-30).log() - s[v])).sum(-1).mean()
             for i, p in enumerate(t) for v in range(4) if v != i) / 6
    _, logs = model.training_step(batch)
    assert logs["teacher_entropy"] == pytest.approx(entropy.item(), abs=1e-4)
    assert logs["kl"] == pytest.approx(kl.item(), abs=1e-4)


def test_bf16_autocast_step_is_close_to_fp32(batch):
    model = make()
    ref = model.training_step(batch)[0].item()
    model.center.zero_()  # the first call moved the centre; start the second from the same one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = model.training_step(batch)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref, rel=0.1, abs=0.05)
    assert model.center.dtype == torch.float32 and math.isfinite(logs["kl"])


def test_every_trainable_parameter_gets_a_gradient_and_the_teacher_none(batch):
    model = make()
    model.training_step(batch)[0].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []
    assert all(not p.requires_grad and p.grad is None for p in teacher_params(model))
    ids = {id(p) for p in trainable(model)}
    assert not any(id(p) in ids for p in teacher_params(model))


def train(model, batch, steps):
    """A manual AdamW loop on one fixed batch; returns the logs of every step."""
    opt = torch.optim.AdamW(trainable(model), lr=1e-3, weight_decay=0.0)
    history = []
    for step in range(steps):
        loss, logs = model.training_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step, steps)
        history.append(logs)
    return history


def test_loss_falls_when_the_student_chases_a_fixed_teacher(batch):
    # DINO's loss is a cross-entropy to a moving target, so it need not fall while the teacher
    # moves. With the teacher and the centre held fixed (momentum 1, centre momentum 1; the
    # centre set to the teacher's mean output, where centring converges), the student must
    # learn the teacher's targets: the loss and KL(teacher || student) fall, the entropy stays.
    model = make(momentum=1.0, center_momentum=1.0)
    crops, _ = batch
    with torch.no_grad():
        x = torch.cat(crops[:2])
        t = model.teacher_head(model.teacher_backbone.forward_head(model.teacher_backbone.forward_features(x),
                                                                   pre_logits=True))
        model.center.copy_(t.mean(dim=0, keepdim=True))
    history = train(model, batch, 25)
    losses = [h["loss"] for h in history]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3, losses
    assert history[-1]["kl"] < 0.5 * history[0]["kl"]
    assert history[-1]["teacher_entropy"] == pytest.approx(history[0]["teacher_entropy"], rel=1e-4)


def test_centring_prevents_the_collapse_that_the_diagnostics_show(batch):
    # The tiny ViT starts nearly collapsed (every image on one prototype: entropy ~ 0.1).
    # Without centring (centre momentum 1: the centre stays 0) the student and teacher settle
    # there: entropy and loss go to 0. With centring the teacher's entropy rises, below log K.
    collapsed = train(make(center_momentum=1.0), batch, 20)
    assert collapsed[-1]["teacher_entropy"] < 0.05 and collapsed[-1]["loss"] < 0.05
    centred = train(make(), batch, 20)
    assert centred[0]["teacher_entropy"] < 0.5
    assert 1.0 < centred[-1]["teacher_entropy"] < math.log(K)
    assert centred[-1]["center_norm"] > 0.5


def test_ema_update_is_exact(batch):
    model = make()
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    model.training_step(batch)[0].backward()
    opt.step()
    student = [p.detach().clone() for p in student_params(model)]
    old = [p.detach().clone() for p in teacher_params(model)]
    assert any(not torch.equal(a, b) for a, b in zip(student, old))
    model.on_step_end(4, 10)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 4 / 10) + 1) / 2
    assert model.momentum == pytest.approx(m)
    for s, t_old, t_new in zip(student, old, teacher_params(model)):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s, atol=1e-7, rtol=1e-6)


def test_momentum_schedule_endpoints():
    assert cosine_momentum(0.996, 0, 1000) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 500, 1000) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 1000, 1000) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step=-1"):
        cosine_momentum(0.996, -1, 1000)


def test_centring_update_is_exact(batch):
    model = make(center_momentum=0.8)
    model.center.normal_()  # a non-zero centre, so both terms of the update matter
    c0 = model.center.clone()
    crops, _ = batch
    with torch.no_grad():
        x = torch.cat(crops[:2])
        t = model.teacher_head(model.teacher_backbone.forward_head(model.teacher_backbone.forward_features(x),
                                                                   pre_logits=True))  # (2B, K)
    _, logs = model.training_step(batch)
    assert logs["center_norm"] == pytest.approx(c0.norm().item(), rel=1e-6)
    torch.testing.assert_close(model.center, 0.8 * c0 + 0.2 * t.mean(dim=0, keepdim=True), atol=1e-6, rtol=1e-5)


def test_teacher_temperature_warm_up(batch):
    model = make(warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_steps=4)
    assert [model.teacher_temp_at(s) for s in range(6)] == pytest.approx([0.02, 0.03, 0.04, 0.05, 0.06, 0.06])
    _, logs = model.training_step(batch)
    assert logs["teacher_temp"] == pytest.approx(0.02)
    model.on_step_end(0, 10)
    model.on_step_end(1, 10)
    _, logs = model.training_step(batch)
    assert logs["teacher_temp"] == pytest.approx(0.04)


def test_sharper_teacher_has_lower_entropy(batch):
    cold = make(teacher_temp=0.02).training_step(batch)[1]["teacher_entropy"]
    warm = make(teacher_temp=0.5).training_step(batch)[1]["teacher_entropy"]
    assert cold < warm


def test_backbone_must_take_local_crops():
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        DINO(tiny_vit(dynamic=False), out_dim=K, hidden_dim=64, bottleneck_dim=16, n_local_crops=2)
    model = DINO(tiny_vit(dynamic=False), out_dim=K, hidden_dim=64, bottleneck_dim=16, n_local_crops=0)
    loss, _ = model.training_step(([torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)], None))
    assert torch.isfinite(loss)


def test_state_dict_round_trip(batch):
    model = make()
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    model.training_step(batch)[0].backward()
    opt.step()
    model.on_step_end(0, 10)
    state = model.state_dict()
    assert {"center", "steps_done"} <= set(state) and any(k.startswith("teacher_backbone.") for k in state)
    clone = DINO(tiny_vit(), out_dim=K, hidden_dim=64, bottleneck_dim=16, n_local_crops=2, momentum=0.9)
    clone.load_state_dict(state, strict=True)
    assert torch.equal(clone.center, model.center) and int(clone.steps_done) == 1
    assert clone.training_step(batch)[0].item() == pytest.approx(model.training_step(batch)[0].item(), abs=1e-6)


def test_input_errors(batch):
    model = make()
    crops, labels = batch
    with pytest.raises(ValueError, match="expects 2 global"):
        model.training_step((crops[:3], labels))
    with pytest.raises(ValueError, match="global crops differ"):
        model.training_step(([crops[0], crops[2], crops[2], crops[3]], labels))
    with pytest.raises(ValueError, match="same batch size"):
        model.training_step(([crops[0], crops[1], crops[2][:4], crops[3]], labels))
    with pytest.raises(TypeError, match="vitssl_core.ViT"):
        DINO(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="teacher_temp=0"):
        make(teacher_temp=0)
    with pytest.raises(ValueError, match="center_momentum=2"):
        make(center_momentum=2)


def _center_worker(rank, store, out):
    """One rank of a 2-process gloo group: a centre update from rank-specific teacher outputs."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = DINO(tiny_vit(dynamic=False), out_dim=4, hidden_dim=8, bottleneck_dim=4, n_local_crops=0)
        model.update_center(torch.full((3, 4), float(rank + 1)))  # rank 0 rows of 1, rank 1 rows of 2
        torch.save(model.center, out)
    finally:
        dist.destroy_process_group()


def test_centre_is_averaged_over_ranks(tmp_path):
    ctx = mp.get_context("fork")  # the children inherit the imported torch
    procs = [ctx.Process(target=_center_worker, args=(r, str(tmp_path / "store"), str(tmp_path / f"{r}.pt")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.terminate()
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    for r in range(2):  # 0.9 * 0 + 0.1 * mean(1, 1, 1, 2, 2, 2) on both ranks
        torch.testing.assert_close(torch.load(tmp_path / f"{r}.pt"), torch.full((1, 4), 0.15))
