"""The --knn-every monitor: features.KNNMonitor, the trainer's epoch_end hook, and the CLI that joins them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, model_args
from torch.utils.data import Subset

from vitssl_core import ViT, data
from vitssl_core import __main__ as cli
from vitssl_core.checkpoint import load_checkpoint
from vitssl_core.curves import plot_history, read_history
from vitssl_core.features import KNNMonitor


@pytest.fixture(scope="module")
def fmnist(needs_fashion_mnist):
    return Subset(data.FashionMNIST(train=True), range(100))


def simclr(out, *extra: str) -> list[str]:
    argv = ["pretrain", "--method", "simclr", "--epochs", "2", "--subset", "64", "--batch-size", "16"]
    argv += ["--log-every", "2", "--no-progress", "--precision", "fp32", "--feature-validation", "0"]
    return [*argv, "--out", str(out), *model_args(depth=1), *extra]


def weights(run) -> dict[str, torch.Tensor]:
    found, state = load_checkpoint(run)
    assert state["step"] == 8
    return found


def test_two_epoch_simclr_logs_the_monitor_and_trains_bit_identical_weights(tmp_path, capsys, needs_fashion_mnist):
    assert cli.main(simclr(tmp_path / "plain")) == 0, capsys.readouterr().err
    assert cli.main(simclr(tmp_path / "watched", "--knn-every", "1")) == 0, capsys.readouterr().err
    plain, watched = read_history(tmp_path / "plain"), read_history(tmp_path / "watched")
    monitor = [r for r in watched if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in monitor] == [(4, 1.0), (8, 2.0)]  # 64 images / 16 = 4 steps per epoch
    assert all(0 <= r["knn_top1"] <= 100 and 0 < r["embedding_std"] < 1 for r in monitor)
    training = [r for r in watched if "knn_top1" not in r]
    assert [r["loss"] for r in training] == [r["loss"] for r in plain]  # the same losses, to the last bit
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "watched")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "plain" / "backbone.safetensors").read_bytes() == (
        tmp_path / "watched" / "backbone.safetensors"
    ).read_bytes()
    card = json.loads((tmp_path / "watched" / "backbone.json").read_text())
    assert card["final_loss"] == training[-1]["loss"]  # a monitor row is not the last loss
    # vitssl plot draws the monitor's panels from these rows
    fig = plot_history({"watched": watched, "plain": plain})
    assert [line.get_label() for line in fig.axes[2].lines] == ["watched"]
    assert list(fig.axes[3].lines[0].get_ydata()) == [r["embedding_std"] for r in monitor]


def test_monitor_runs_in_eval_mode_draws_no_random_numbers_and_sees_collapse(fmnist):
    torch.manual_seed(0)
    backbone = ViT(**TINY).train()
    monitor = KNNMonitor(backbone, fmnist, every=2, val=20, bank=80)
    assert monitor(1) is None  # only every 2nd epoch
    before = torch.get_rng_state()
    alive = monitor(2)
    assert torch.equal(before, torch.get_rng_state()) and backbone.training
    assert set(alive) == {"knn_top1", "embedding_std"} and alive["embedding_std"] > 0.01
    with torch.no_grad():  # collapse: every image gets the same embedding
        backbone.norm.weight.zero_()
        backbone.norm.bias.fill_(1.0)
    assert monitor(2)["embedding_std"] < 1e-4


def test_monitor_holds_out_at_most_a_fifth_and_refuses_tiny_data(fmnist):
    small = Subset(fmnist, range(50))
    monitor = KNNMonitor(ViT(**TINY), small, val=2000, bank=10000)
    assert (monitor.val, monitor.bank) == (10, 40)
    with pytest.raises(ValueError, match="at least 5"):
        KNNMonitor(ViT(**TINY), Subset(fmnist, range(4)))


def test_cli_knn_every_on_too_few_images_is_one_line(tmp_path, capsys, needs_fashion_mnist):
    argv = simclr(tmp_path / "run", "--knn-every", "1", "--subset", "4", "--batch-size", "2")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--knn-every 1" in err and "at least 5" in err, err


def test_the_monitor_reads_the_backbone_the_method_exports_dinos_teacher(needs_fashion_mnist):
    argv = simclr("x", "--knn-every", "1", "--method-arg", "n_local_crops=2", "--method-arg", "out_dim=64")
    args = cli.parse_args([a if a != "simclr" else "dino" for a in argv])
    method, base, info = cli._build_method(args, cli._train_config(args), world_size=1)
    monitor = cli._knn_monitor(args, method, base, info)
    assert monitor.backbone is method.teacher_backbone and monitor.normalize["mean"] == list(info.mean)


def test_knn_options_are_not_training_settings(capsys):
    args = cli.parse_args(simclr("x", "--knn-every", "3", "--knn-train", "500"))
    assert (args.knn_every, args.knn_val, args.knn_train) == (3, 2000, 500)
    config = cli._train_config(args)
    assert not any(name.startswith("knn") for name in vars(config))  # the recipe-match guard never sees them
