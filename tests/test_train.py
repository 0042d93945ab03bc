"""Tests for vitssl_core.train (the loop) and vitssl_core.supervised (the method it is tested with).

Tiny ViTs (28 px, patch 7, D=32, 2 blocks) on the first images of the real Fashion-MNIST test
split; one torch thread, so runs are fast and bit-reproducible on a busy 2-core machine.
"""

import dataclasses
import json
import math
import os
import re
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from vitssl_core import ViT
from vitssl_core.checkpoint import load_checkpoint
from vitssl_core.data import FashionMNIST
from vitssl_core.optim import param_groups
from vitssl_core.runtime import resolve_precision
from vitssl_core.supervised import Supervised
from vitssl_core.train import TrainConfig, make_schedules, steps_per_epoch, train


@pytest.fixture(scope="module")
def fmnist(needs_fashion_mnist):
    """The first 256 images of the real Fashion-MNIST test split: ((1, 28, 28) in [0, 1], label)."""
    return Subset(FashionMNIST(train=False), range(256))


def tiny_vit(**kw) -> ViT:
    return ViT(**{**dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2), **kw})


def tiny_method(seed: int = 0, **kw) -> Supervised:
    torch.manual_seed(seed)
    return Supervised(tiny_vit(**kw), num_classes=10)


def config(**kw) -> TrainConfig:
    base = dict(max_steps=4, batch_size=16, blr=1e-3, precision="fp32", progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- the Supervised method
def test_supervised_logits_loss_and_accuracy(fmnist):
    method = tiny_method()
    images = torch.stack([fmnist[i][0] for i in range(8)])
    labels = torch.tensor([fmnist[i][1] for i in range(8)])
    assert method(images).shape == (8, 10)
    loss, logs = method.training_step((images, labels))
    assert loss.ndim == 0 and abs(loss.item() - math.log(10)) < 0.5  # near-uniform at init
    with torch.no_grad():
        by_hand = (method(images).argmax(1) == labels).float().mean().item()
    assert set(logs) == {"acc"} and logs["acc"] == pytest.approx(by_hand)
    loss.backward()
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


def test_supervised_checks_its_inputs():
    with pytest.raises(ValueError, match="num_classes=10"):
        Supervised(tiny_vit(num_classes=10), num_classes=10)
    with pytest.raises(ValueError, match="num_classes=1 "):
        Supervised(tiny_vit(), num_classes=1)
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        Supervised(tiny_vit(), num_classes=10, label_smoothing=1.5)
    with pytest.raises(TypeError, match="vitssl_core.ViT"):
        Supervised(nn.Linear(2, 2), num_classes=10)
    with pytest.raises(ValueError, match="int64"):
        tiny_method().training_step((torch.rand(2, 1, 28, 28), torch.tensor([0.0, 1.0])))


def test_supervised_loss_falls_when_trained_on_a_fixed_batch(fmnist):
    data = Subset(fmnist, range(32))  # one batch of 32, seen 40 times
    history = train(tiny_method(), data, config(max_steps=40, batch_size=32, blr=5e-2, log_every=5))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["acc"] > 0.6  # chance is 0.1


# --------------------------------------------------------------------------- optimizer groups and schedules
def test_param_groups_exempt_biases_norms_and_tokens():
    method = tiny_method()
    method.mask_token = nn.Parameter(torch.zeros(1, 1, 32))
    method.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
    method.no_weight_decay = lambda: {"head.weight"}  # a method may exempt more
    decay, no_decay = param_groups(method, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for name in (
        "backbone.pos_embed",
        "backbone.cls_token",
        "mask_token",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.0.attn.qkv.bias",
        "backbone.norm.weight",
        "backbone.patch_embed.proj.bias",
        "head.weight",
        "head.bias",
    ):
        assert name in no_decay["names"], name
    for name in (
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.blocks.1.mlp.fc2.weight",
    ):
        assert name in decay["names"], name
    assert "frozen" not in decay["names"] + no_decay["names"]
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert set(decay["names"]) | set(no_decay["names"]) == trainable
    assert not set(decay["names"]) & set(no_decay["names"])


def test_lr_schedule_scales_with_batch_and_peaks_at_warmup_end():
    cfg = TrainConfig(
        max_steps=20,
        batch_size=16,
        accum_steps=2,
        blr=1e-3,
        min_lr=1e-5,
        warmup_steps=4,
        weight_decay=0.04,
        weight_decay_end=0.4,
    )
    peak = 1e-3 * 16 * 2 * 3 / 256  # blr * batch * accum * processes / 256
    assert cfg.peak_lr(world_size=3) == pytest.approx(peak)
    lr, wd = make_schedules(cfg, total_steps=20, epoch_steps=5, world_size=3)
    assert lr.shape == wd.shape == (20,)
    assert lr[0] == 0.0 and lr[3] == pytest.approx(peak * 3 / 4)
    assert lr[4] == pytest.approx(peak)  # warm-up ends: the peak
    assert lr.argmax() == 4 and lr[-1] > 1e-5 and lr[-1] < 1e-5 + 0.01 * peak
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4, rel=0.01)
    by_epochs = TrainConfig(max_steps=20, batch_size=16, blr=1e-3, warmup_epochs=0.4)
    assert make_schedules(by_epochs, 20, epoch_steps=10)[0].argmax() == 4  # 0.4 epochs of 10 steps


def test_trainer_applies_the_schedule_each_step(fmnist):
    cfg = config(max_steps=6, warmup_steps=2, min_lr=1e-6, weight_decay=0.1, weight_decay_end=0.3)
    history = train(tiny_method(), fmnist, cfg)
    lr, wd = make_schedules(cfg, 6, steps_per_epoch(len(fmnist), cfg))
    assert [row["lr"] for row in history] == pytest.approx(lr.tolist())
    assert [row["wd"] for row in history] == pytest.approx(wd.tolist())


def test_too_small_dataset_is_explained(fmnist):
    with pytest.raises(ValueError, match="256 samples.*= 512"):
        steps_per_epoch(256, config(batch_size=256, accum_steps=2))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="exactly one of epochs"):
        TrainConfig(epochs=2, max_steps=10)
    with pytest.raises(ValueError, match="exactly one of epochs"):
        TrainConfig()
    with pytest.raises(ValueError, match="precision='fp16'"):
        TrainConfig(epochs=1, precision="fp16")
    with pytest.raises(ValueError, match="accum_steps=0"):
        TrainConfig(epochs=1, accum_steps=0)
    with pytest.raises(ValueError, match=r"betas=\(0.9, 1.5\)"):
        TrainConfig(epochs=1, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        TrainConfig(epochs=1, resume=True)
    with pytest.raises(ValueError, match="grad_clip=-1"):
        TrainConfig(epochs=1, grad_clip=-1)
    for name in ("blr", "min_lr", "weight_decay", "weight_decay_end", "warmup_epochs", "grad_clip"):
        for bad in (math.inf, math.nan):  # inf passes "> 0": one step at lr=inf would run before the NaN check
            with pytest.raises(ValueError, match=f"{name}={bad} must be a finite number"):
                TrainConfig(epochs=1, **{name: bad})
    assert TrainConfig(epochs=1, betas=[0.9, 0.95]).betas == (0.9, 0.95)  # a YAML list is fine


# name: (whole numbers only, 0 allowed, None allowed): the rules TrainConfig's fields declare
NUMBER_RULES = {
    "epochs": (True, False, True),
    "max_steps": (True, False, True),
    "batch_size": (True, False, False),
    "accum_steps": (True, False, False),
    "log_every": (True, False, False),
    "checkpoint_every": (True, False, True),
    "warmup_steps": (True, True, True),
    "seed": (True, True, False),
    "num_workers": (True, True, False),
    "blr": (False, False, False),
    "min_lr": (False, True, False),
    "warmup_epochs": (False, True, True),
    "weight_decay": (False, True, False),
    "weight_decay_end": (False, True, True),
    "grad_clip": (False, False, True),
}


def test_every_number_field_has_a_rule_and_is_checked_by_it():
    declared = {f.name: f.metadata["number"] for f in dataclasses.fields(TrainConfig) if "number" in f.metadata}
    assert declared == NUMBER_RULES

    def build(name, value):
        kw = {name: value}
        if name not in ("epochs", "max_steps"):
            kw["epochs"] = 1
        elif value is None:  # the other of the two gives the length
            kw["max_steps" if name == "epochs" else "epochs"] = 1
        return TrainConfig(**kw)

    for name, (integer, zero, optional) in NUMBER_RULES.items():
        assert getattr(build(name, 3), name) == 3
        for value, allowed in ((0, zero), (None, optional), (2.5, not integer), (-1, False), (True, False)):
            if allowed:
                assert getattr(build(name, value), name) == value
            else:
                with pytest.raises(ValueError, match=f"^{name}={value!r} must be"):
                    build(name, value)
        with pytest.raises(ValueError, match=f"^{name}=inf must be"):
            build(name, math.inf)


def test_auto_precision_is_fp32_on_every_cpu(monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32"
    # even where oneDNN has AVX-512 (BF16/AMX) kernels: bf16 is slower at this package's widths
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_BF16")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision='half'"):
        resolve_precision("half")


# --------------------------------------------------------------------------- equivalences
def test_grad_accumulation_equals_the_bigger_batch(fmnist):
    """2 micro-batches of 8 per step == 1 batch of 16 (no batch-dependent layers, fp32)."""
    big, accum, small = tiny_method(), tiny_method(), tiny_method()
    assert same_weights(big, accum)
    train(big, fmnist, config(batch_size=16, max_steps=3))
    train(accum, fmnist, config(batch_size=8, accum_steps=2, max_steps=3))
    train(small, fmnist, config(batch_size=8, max_steps=3))
    for (name, a), b, c in zip(big.state_dict().items(), accum.state_dict().values(), small.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert not same_weights(big, small)  # the test can tell batches apart


def test_bf16_autocast_trains(fmnist):
    """precision="bf16" runs the forward pass in bf16 (and fp32 does not), keeping fp32 weights that learn."""
    dtypes = {}
    for precision in ("bf16", "fp32"):
        method = tiny_method()
        seen = dtypes[precision] = []
        method.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, args, out, seen=seen: seen.append(out.dtype))
        before = {k: v.clone() for k, v in method.state_dict().items()}
        history = train(method, fmnist, config(precision=precision, max_steps=3))
        assert all(math.isfinite(row["loss"]) for row in history)
        qkv = method.backbone.blocks[0].attn.qkv.weight
        assert qkv.dtype == torch.float32 and not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], qkv)
    assert set(dtypes["bf16"]) == {torch.bfloat16} and set(dtypes["fp32"]) == {torch.float32}


# --------------------------------------------------------------------------- files, hooks, failures
def test_history_jsonl_and_config_json(tmp_path, fmnist):
    history = train(tiny_method(), fmnist, config(max_steps=6, log_every=2, grad_clip=1.0, out_dir=str(tmp_path)))
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert rows == history
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert {"step", "epoch", "loss", "lr", "wd", "img_per_s", "acc", "grad_norm"} <= set(rows[0])
    assert rows[-1]["epoch"] == pytest.approx(6 / 16)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["total_steps"] == 6 and saved["peak_lr"] == pytest.approx(1e-3 * 16 / 256)
    assert load_checkpoint(tmp_path)[1]["step"] == 6


class Recorder(Supervised):
    """Supervised that records on_step_end calls."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def on_step_end(self, step, max_steps):
        self.calls.append((step, max_steps))


def test_on_step_end_gets_the_step_index_and_the_total(fmnist):
    method = Recorder(tiny_vit(), num_classes=10)
    train(method, fmnist, config(max_steps=5))
    assert method.calls == [(i, 5) for i in range(5)]


class NaNAfter(Supervised):
    """Supervised whose loss turns NaN from its ``bad``-th call on (1-based)."""

    def __init__(self, *a, bad, **kw):
        super().__init__(*a, **kw)
        self.bad, self.n = bad, 0

    def training_step(self, batch):
        self.n += 1
        loss, logs = super().training_step(batch)
        return (loss * float("nan") if self.n >= self.bad else loss), logs


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(tmp_path, fmnist):
    torch.manual_seed(0)
    method = NaNAfter(tiny_vit(), num_classes=10, bad=5)
    with pytest.raises(FloatingPointError, match="nan at step 5 of 8"):
        train(method, fmnist, config(max_steps=8, checkpoint_every=2, out_dir=str(tmp_path)))
    weights, state = load_checkpoint(tmp_path)
    assert state["step"] == 4  # the last good one, not overwritten by the failure
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["step"] == 4
    for k, v in method.state_dict().items():  # step 5 did not touch the weights
        assert torch.equal(weights[k], v), k


class _InfGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class InfGradAfter(NaNAfter):
    """Supervised whose loss stays finite but whose gradients are infinite from its ``bad``-th call on."""

    def training_step(self, batch):
        self.n += 1
        loss, logs = Supervised.training_step(self, batch)
        return (_InfGradient.apply(loss) if self.n >= self.bad else loss), logs


@pytest.mark.parametrize("clip", [{}, {"grad_clip": 1.0}, {"grad_clip": 1.0, "clip_mode": "per_param"}])
def test_non_finite_gradients_stop_like_a_non_finite_loss(tmp_path, fmnist, clip):
    torch.manual_seed(0)
    method = InfGradAfter(tiny_vit(), num_classes=10, bad=5)
    with pytest.raises(FloatingPointError, match=r"gradient norm is (inf|nan) at step 5 of 8 .*step_00000004"):
        train(method, fmnist, config(max_steps=8, checkpoint_every=2, out_dir=str(tmp_path), **clip))
    weights, state = load_checkpoint(tmp_path)
    assert state["step"] == 4  # the last good checkpoint is kept
    for k, v in method.state_dict().items():  # AdamW never saw the gradients of step 5
        assert torch.equal(weights[k], v), k


def _method_and_batch(name: str, x, y):
    from vitssl_core.contrastive import MoCoV3, SimCLR
    from vitssl_core.dino import DINO
    from vitssl_core.mae import MAE
    from vitssl_core.masked import BEiT, PatchTokenizer, SimMIM

    views = ([x, x], y)
    return {
        "supervised": lambda: (Supervised(tiny_vit(), num_classes=10), (x, y)),
        "simclr": lambda: (SimCLR(tiny_vit(), proj_dim=8, hidden_dim=16), views),
        "mocov3": lambda: (MoCoV3(tiny_vit(), proj_dim=8, hidden_dim=16), views),
        "dino": lambda: (DINO(tiny_vit(), out_dim=16, hidden_dim=16, bottleneck_dim=8, n_local_crops=0), views),
        "mae": lambda: (MAE(tiny_vit(), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2), (x, y)),
        "simmim": lambda: (SimMIM(tiny_vit()), (x, y)),
        "beit": lambda: (
            BEiT(tiny_vit(), PatchTokenizer.fit(torch.rand(8, 1, 28, 28), patch_size=7, vocab_size=4, seed=0)),
            (x, y),
        ),
    }[name]()


@pytest.mark.parametrize("name", ["supervised", "simclr", "mocov3", "dino", "mae", "simmim", "beit"])
def test_every_method_names_images_of_the_wrong_dtype(name):
    """uint8 or float64 images into a float32 method: a TypeError naming the dtype, not conv2d's complaint."""
    torch.manual_seed(0)
    pixels, labels = torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    for images, message in (
        ((pixels * 255).to(torch.uint8), "x has dtype torch.uint8; the model takes float"),
        (pixels.double(), "x has dtype torch.float64 but the model's weights are torch.float32"),
    ):
        method, batch = _method_and_batch(name, images, labels)
        with pytest.raises(TypeError, match=re.escape(message)):
            method.training_step(batch)
    method, batch = _method_and_batch(name, pixels, labels)
    assert torch.isfinite(method.training_step(batch)[0])  # float32 is fine
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and so is float32 under autocast
        assert torch.isfinite(method.training_step(batch)[0])


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path, fmnist):
    train(tiny_method(), fmnist, config(max_steps=2, out_dir=str(tmp_path)))
    with pytest.raises(FileExistsError, match="resume=True"):
        train(tiny_method(), fmnist, config(max_steps=2, out_dir=str(tmp_path)))


@pytest.mark.parametrize("key", ["rng", "optimizer", "history_len"])
def test_a_state_pt_lacking_a_key_is_named_not_a_key_error(tmp_path, fmnist, key):
    train(tiny_method(), fmnist, config(max_steps=2, out_dir=str(tmp_path)))
    state_pt = next((tmp_path / "checkpoints").glob("step_*/state.pt"))
    state = torch.load(state_pt, weights_only=True)
    del state[key]  # hand-edited
    torch.save(state, state_pt)
    with pytest.raises(ValueError, match=re.escape(str(state_pt)) + f" lacks '{key}': it was not written"):
        train(tiny_method(), fmnist, config(max_steps=4, out_dir=str(tmp_path), resume=True))


def test_an_optimizer_state_that_does_not_fit_names_the_file(tmp_path, fmnist):
    train(tiny_method(), fmnist, config(max_steps=2, out_dir=str(tmp_path)))
    state_pt = next((tmp_path / "checkpoints").glob("step_*/state.pt"))
    state = torch.load(state_pt, weights_only=True)
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
    torch.save(state, state_pt)
    with pytest.raises(ValueError, match="the optimizer state in .*state.pt does not fit this run"):
        train(tiny_method(), fmnist, config(max_steps=4, out_dir=str(tmp_path), resume=True))


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interruption_saves_and_resume_is_exact(tmp_path, fmnist, error):
    """Stopped by an exception after step 3, resumed: the same weights as a run that never stopped."""
    cfg = dict(max_steps=20, checkpoint_every=8, warmup_steps=2, seed=3)
    reference = tiny_method(drop_path_rate=0.2)  # drop-path draws random numbers: the RNG state matters
    ref_history = train(reference, fmnist, config(**cfg, out_dir=str(tmp_path / "ref")))

    def stop_at_3(row):
        if row["step"] == 3:
            raise error("stop")

    with pytest.raises(error):
        train(tiny_method(drop_path_rate=0.2), fmnist, config(**cfg, out_dir=str(tmp_path / "run")), callback=stop_at_3)
    assert load_checkpoint(tmp_path / "run")[1]["step"] == 3
    resumed = tiny_method(seed=99, drop_path_rate=0.2)  # other initial weights: all must come from the checkpoint
    history = train(resumed, fmnist, config(**cfg, out_dir=str(tmp_path / "run"), resume=True))
    assert same_weights(resumed, reference)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("img_per_s", "wall_s")} for r in rows]  # noqa: E731
    assert strip(history) == strip(ref_history)


def test_each_resumed_segment_records_its_wall_time_and_hardware(tmp_path, fmnist):
    def stop_at_3(row):
        if row["step"] == 3:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        train(tiny_method(), fmnist, config(max_steps=6, out_dir=str(tmp_path)), callback=stop_at_3)
    history = train(tiny_method(), fmnist, config(max_steps=6, out_dir=str(tmp_path), resume=True))
    segments = load_checkpoint(tmp_path)[1]["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 3), (3, 6)]
    assert all(s["seconds"] >= 0 and "thread(s)" in s["hardware"] and s["precision"] == "fp32" for s in segments)
    # the history's clock runs on across the resume: the first segment's time, then the second's
    walls = [row["wall_s"] for row in history]
    assert walls == sorted(walls) and walls[-1] >= segments[0]["seconds"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_stops(tmp_path, fmnist, sig):
    if signal.getsignal(sig) not in (signal.default_int_handler, signal.SIG_DFL):
        pytest.skip(f"{sig.name} has a custom handler in this process; train() leaves it alone")

    def signal_at_2(row):
        if row["step"] == 2:
            os.kill(os.getpid(), sig)

    with pytest.raises(KeyboardInterrupt, match=sig.name):
        train(tiny_method(), fmnist, config(max_steps=10, out_dir=str(tmp_path)), callback=signal_at_2)
    assert load_checkpoint(tmp_path)[1]["step"] == 3  # the step under way when the signal came finished
    assert signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL)  # handler restored
