"""Tests for vitssl_core.dino: the DINO head, multi-crop training step on real Fashion-MNIST crops,
EMA teacher, centring, temperature warm-up, collapse diagnostics and checks; and DINO's recipe in
the trainer and the CLI: last-layer freeze across a resume, per-parameter clipping, the teacher
as the exported backbone, the CLI's schedules."""

import json
import math
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from helpers import model_args
from vitssl_core import __main__ as cli
from vitssl_core import data, recipes
from vitssl_core.augment import MultiCrop, dino_augment
from vitssl_core.checkpoint import load_backbone, load_checkpoint
from vitssl_core.dino import DINO, DINOHead
from vitssl_core.schedules import cosine_momentum
from vitssl_core.supervised import Supervised
from vitssl_core.optim import clip_grad_per_param_, param_groups
from vitssl_core.train import TrainConfig, exported_backbone
from vitssl_core.train import train as fit  # train() below is this file's manual loop
from vitssl_core.vit import DropPath, ViT

REPO = Path(__file__).resolve().parents[1]

MEAN, STD = data.NORMALIZE["fashion_mnist"]["mean"], data.NORMALIZE["fashion_mnist"]["std"]
K = 64  # prototypes in the tests


def tiny_vit(dynamic=True, **kw):
    return ViT(
        img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, dynamic_img_size=dynamic, **kw
    )


def make(vit_kw=None, **kw):
    torch.manual_seed(0)
    args = dict(out_dim=K, hidden_dim=64, bottleneck_dim=16, n_local_crops=2, momentum=0.9)
    return DINO(tiny_vit(**(vit_kw or {})), **{**args, **kw})


def multi_crop(ds) -> MultiCrop:
    """``ds`` as MultiCrop items: 2 global 28 px and 2 local 12 px crops, DINO's grey recipe."""
    g1, g2, local = dino_augment(28, 12, grayscale=True, mean=MEAN, std=STD)
    return MultiCrop(ds, g1, g2, local, n_local=2)


@pytest.fixture(scope="module")
def fmnist_test(needs_fashion_mnist):
    return data.FashionMNIST(train=False, download=False)


@pytest.fixture(scope="module")
def batch(fmnist_test):
    torch.manual_seed(0)
    return next(iter(DataLoader(multi_crop(fmnist_test), batch_size=16, shuffle=True)))


@pytest.fixture(scope="module")
def crops_data(fmnist_test):
    """48 real Fashion-MNIST images as MultiCrop items for train()."""
    return multi_crop(Subset(fmnist_test, range(48)))


def run_config(**kw):
    base = dict(max_steps=4, batch_size=8, blr=1e-2, precision="fp32", progress=False, log_every=1, device="cpu")
    return TrainConfig(**{**base, **kw})


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


def test_freeze_drops_the_last_layer_gradients_then_releases(batch):
    model = make(freeze_last_layer_steps=2)
    v = model.head.last_layer.parametrizations.weight.original1
    model.training_step(batch)[0].backward()
    assert v.grad is not None and v.grad.abs().sum() > 0  # the backward still reaches it (DDP reduces it)
    model.on_before_optimizer_step(0, 10)
    assert v.grad is None  # None, not zero: AdamW skips the parameter
    assert model.head.mlp[0].weight.grad.abs().sum() > 0  # the rest of the head still learns
    model.on_step_end(0, 10)
    assert model.last_layer_frozen  # step 1 of 2 still frozen
    model.on_step_end(1, 10)
    assert not model.last_layer_frozen
    model.zero_grad()
    model.training_step(batch)[0].backward()
    model.on_before_optimizer_step(2, 10)
    assert v.grad.abs().sum() > 0


def test_frozen_last_layer_is_untouched_by_adamw(tmp_path, crops_data):
    # Zero gradients would still let AdamW decay the weights (and count steps); None leaves them be.
    model = make(freeze_last_layer_steps=3)
    v = model.head.last_layer.parametrizations.weight.original1
    v0, mlp0 = v.detach().clone(), model.head.mlp[0].weight.detach().clone()
    fit(model, crops_data, run_config(max_steps=3, weight_decay=0.04, weight_decay_end=0.4, out_dir=str(tmp_path)))
    assert torch.equal(v, v0)
    assert not torch.equal(model.head.mlp[0].weight, mlp0)
    names = [n for g in param_groups(model, 0.04) for n in g["names"]]
    optimizer = load_checkpoint(tmp_path)[1]["optimizer"]
    assert names.index("head.last_layer.parametrizations.weight.original1") not in optimizer["state"]
    assert names.index("head.mlp.0.weight") in optimizer["state"]


@pytest.mark.parametrize("stop", [2, 5])
def test_resume_across_the_freeze_is_exact(tmp_path, crops_data, stop):
    """Stopped before (2) or after (5) the end of a 4-step freeze, resumed: the same weights as one run."""
    cfg = dict(
        max_steps=8,
        checkpoint_every=3,
        warmup_steps=2,
        weight_decay=0.04,
        weight_decay_end=0.4,
        grad_clip=3.0,
        clip_mode="per_param",
        seed=1,
    )
    dino = dict(vit_kw=dict(drop_path_rate=0.1), freeze_last_layer_steps=4)  # drop-path: the RNG state matters
    reference = make(**dino)
    fit(reference, crops_data, run_config(**cfg, out_dir=str(tmp_path / "ref")))

    def stop_at(row):
        if row["step"] == stop:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        fit(make(**dino), crops_data, run_config(**cfg, out_dir=str(tmp_path / "run")), callback=stop_at)
    assert load_checkpoint(tmp_path / "run")[1]["step"] == stop
    torch.manual_seed(99)
    resumed = DINO(
        tiny_vit(drop_path_rate=0.1),
        out_dim=K,
        hidden_dim=64,
        bottleneck_dim=16,
        n_local_crops=2,
        momentum=0.9,
        freeze_last_layer_steps=4,
    )  # other initial weights: all come from the checkpoint
    fit(resumed, crops_data, run_config(**cfg, out_dir=str(tmp_path / "run"), resume=True))
    ref, res = reference.state_dict(), resumed.state_dict()
    assert ref.keys() == res.keys()
    assert [k for k in ref if not torch.equal(ref[k], res[k])] == []


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
    kl = (
        sum((p * (p.clamp_min(1e-30).log() - s[v])).sum(-1).mean() for i, p in enumerate(t) for v in range(4) if v != i)
        / 6
    )
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
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
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
        t = model.teacher_head(
            model.teacher_backbone.forward_head(model.teacher_backbone.forward_features(x), pre_logits=True)
        )
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
        t = model.teacher_head(
            model.teacher_backbone.forward_head(model.teacher_backbone.forward_features(x), pre_logits=True)
        )  # (2B, K)
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
    procs = [
        ctx.Process(target=_center_worker, args=(r, str(tmp_path / "store"), str(tmp_path / f"{r}.pt")))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.terminate()
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    for r in range(2):  # 0.9 * 0 + 0.1 * mean(1, 1, 1, 2, 2, 2) on both ranks
        torch.testing.assert_close(torch.load(tmp_path / f"{r}.pt"), torch.full((1, 4), 0.15))


# --------------------------------------------------------------------------- the teacher
def test_teacher_has_no_stochastic_depth_and_stays_in_eval_mode(batch):
    model = make(vit_kw=dict(drop_path_rate=0.1, drop_rate=0.1))
    assert model.train() is model
    assert model.training and model.backbone.training and model.head.training and model.teacher_head.training
    assert not model.teacher_backbone.training
    teacher_rates = [m.drop_prob for m in model.teacher_backbone.modules() if isinstance(m, DropPath)]
    student_rates = [m.drop_prob for m in model.backbone.modules() if isinstance(m, DropPath)]
    assert teacher_rates == [0.0] * 4 and student_rates[-1] == pytest.approx(0.1)
    assert all(m.p == 0.0 for m in model.teacher_backbone.modules() if isinstance(m, torch.nn.Dropout))
    x = torch.cat(batch[0][:2])  # the global crops, (2B, 1, 28, 28)
    with torch.no_grad():
        t1, t2 = (model.teacher_backbone.forward_features(x) for _ in range(2))
        s1, s2 = (model.backbone.forward_features(x) for _ in range(2))
    assert torch.equal(t1, t2)  # the targets are deterministic
    assert not torch.equal(s1, s2)  # the student still drops residual branches
    model.eval()
    model.train()
    assert not model.teacher_backbone.training and model.backbone.training


def test_export_backbone_is_the_teacher_with_timm_keys():
    model = make()
    name, backbone = exported_backbone(model)
    assert name == "teacher" and backbone is model.teacher_backbone
    assert backbone.state_dict().keys() == model.backbone.state_dict().keys()
    assert "blocks.0.attn.qkv.weight" in backbone.state_dict()
    supervised = Supervised(tiny_vit(), num_classes=10)  # a method without export_backbone ships its backbone
    assert exported_backbone(supervised) == ("backbone", supervised.backbone)


# --------------------------------------------------------------------------- clipping per parameter
def test_per_param_clipping_matches_a_hand_computation():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 50, 7, 4)]
    for p, scale in zip(params, (10.0, 0.01, 1.0, 5.0)):
        p.grad = scale * torch.randn_like(p)
    params[2].grad = None  # a parameter without a gradient is skipped
    raw = [None if p.grad is None else p.grad.clone() for p in params]
    total = clip_grad_per_param_(params, 1.0)
    for p, g in zip(params, raw):  # DINO's utils.clip_gradients, written out
        if g is None:
            assert p.grad is None
            continue
        coef = 1.0 / (g.norm() + 1e-6)
        torch.testing.assert_close(p.grad, g * coef if coef < 1 else g, rtol=0, atol=0)
    assert total.item() == pytest.approx(math.sqrt(sum(g.norm().item() ** 2 for g in raw if g is not None)), rel=1e-6)
    assert torch.equal(params[1].grad, raw[1])  # a small gradient keeps its size (a global clip would shrink it)
    with pytest.raises(ValueError, match="clip_mode='layer'"):
        TrainConfig(max_steps=1, clip_mode="layer")


class GradNorms(DINO):
    """DINO that records every parameter's gradient norm as the optimizer is about to see it."""

    def on_before_optimizer_step(self, step, max_steps):
        self.norms = {n: p.grad.norm().item() for n, p in self.named_parameters() if p.grad is not None}
        super().on_before_optimizer_step(step, max_steps)


def test_trainer_clips_each_parameter_or_all_together(crops_data):
    def norms_after_one_step(**clip):
        torch.manual_seed(0)
        model = GradNorms(tiny_vit(), out_dim=K, hidden_dim=64, bottleneck_dim=16, n_local_crops=2)
        fit(model, crops_data, run_config(max_steps=1, **clip))
        return model.norms

    raw = norms_after_one_step()
    limit = sorted(raw.values())[len(raw) // 2]  # the median: half the parameters are clipped
    per_param = norms_after_one_step(grad_clip=limit, clip_mode="per_param")
    assert per_param.keys() == raw.keys()
    for name, norm in raw.items():
        assert per_param[name] == pytest.approx(min(norm, limit), rel=1e-4), name
    joint = math.sqrt(sum(n**2 for n in raw.values()))
    together = norms_after_one_step(grad_clip=limit, clip_mode="global")
    for name, norm in raw.items():
        assert together[name] == pytest.approx(norm * limit / joint, rel=1e-4), name


# --------------------------------------------------------------------------- the CLI's DINO (recipes.dino)
def test_cli_dino_sizes_dinos_epoch_schedules_to_the_run():
    long = recipes.dino(tiny_vit(), epoch_steps=100, total_steps=10_000)  # 100 epochs: DINO's own lengths
    assert long.teacher_temp_at(0) == pytest.approx(0.04)
    assert long.teacher_temp_at(1500) == pytest.approx(0.055) and long.teacher_temp_at(3000) == pytest.approx(0.07)
    assert long.freeze_last_layer_steps == 100 and long.last_layer_frozen
    assert long.base_momentum == 0.996
    short = recipes.dino(tiny_vit(), epoch_steps=100, total_steps=300)  # 3 epochs: half the run at most
    assert short.warmup_teacher_temp_steps == 150 and short.freeze_last_layer_steps == 100
    tiny = recipes.dino(tiny_vit(), epoch_steps=4, total_steps=1)
    assert tiny.teacher_temp_at(0) == pytest.approx(0.04) and tiny.freeze_last_layer_steps == 0
    own = recipes.dino(tiny_vit(), epoch_steps=100, total_steps=10_000, freeze_last_layer_steps=7)
    assert own.freeze_last_layer_steps == 7  # --method-arg still wins


def test_cli_pretrain_ships_the_teacher(tmp_path, capsys, needs_fashion_mnist):
    out = tmp_path / "dino"
    argv = [
        "pretrain",
        "--method",
        "dino",
        "--steps",
        "3",
        "--subset",
        "64",
        "--batch-size",
        "16",
        "--log-every",
        "1",
        "--no-progress",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--out",
        str(out),
        *model_args(depth=1, patch_size=4, drop_path_rate=0.1),
        "--method-arg",
        "n_local_crops=2",
        "--method-arg",
        "out_dim=64",
        "--method-arg",
        "hidden_dim=32",
        "--method-arg",
        "momentum=0.9",
        "--grad-clip",
        "3.0",
        "--clip-mode",
        "per_param",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    card = json.loads((out / "backbone.json").read_text())
    assert card["exported"] == "teacher" and card["train_config"]["clip_mode"] == "per_param"
    shipped = load_backbone(out / "backbone.safetensors")
    weights, _ = load_checkpoint(out)
    assert all(torch.equal(v, weights[f"teacher_backbone.{k}"]) for k, v in shipped.items())
    assert not torch.equal(shipped["blocks.0.mlp.fc1.weight"], weights["backbone.blocks.0.mlp.fc1.weight"])
    ViT(**card["architecture"]).load_state_dict(shipped, strict=True)  # the student's timm keys
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    # 3 steps of 4 per epoch: the warm-up lasts max(1, min(30 epochs, 3 // 2)) = 1 step
    assert [r["teacher_temp"] for r in rows] == pytest.approx([0.04, 0.07, 0.07])


def test_results_recipe_is_dinos():
    args = cli.parse_args(["pretrain", "--config", str(REPO / "configs/results/dino.yaml")])
    config = cli._train_config(args)
    assert (config.weight_decay, config.weight_decay_end) == (0.04, 0.4)
    assert (config.grad_clip, config.clip_mode) == (3.0, "per_param")
    assert args.method_args["momentum"] == 0.996 and args.model_args["drop_path_rate"] == 0.1
