"""Tests for the ``vitssl`` command line (vitssl_core/__main__.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import model_args
from vitssl_core import ViT
from vitssl_core import __main__ as cli
from vitssl_core.checkpoint import latest_checkpoint, load_backbone, load_checkpoint, save_backbone
from vitssl_core.pretrained import load_pretrained
from vitssl_core.data import load_fashion_mnist_tensors
from vitssl_core.evaluate import FEATURES, extract_features, knn_accuracy, run_protocol

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = model_args()


def smoke(out, *extra):
    return [
        "pretrain",
        "--method",
        "supervised",
        "--steps",
        "4",
        "--subset",
        "128",
        "--batch-size",
        "16",
        "--log-every",
        "2",
        "--no-progress",
        "--precision",
        "fp32",
        "--out",
        str(out),
        *TINY_ARGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, needs_fashion_mnist):
    """One CLI pre-training run of 4 steps, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("cli") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(smoke(out, "--method-arg", "label_smoothing=0.1"))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


# --------------------------------------------------------------------------- help and bad arguments
def test_console_script_help_teaches():
    done = subprocess.run(
        [sys.executable, "-m", "vitssl_core", "pretrain", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "examples:" in done.stdout and "torchrun --nproc_per_node=2" in done.stdout
    assert "--resume" in done.stdout and "batch of 256" in done.stdout


def test_top_level_and_evaluate_help(capsys):
    for argv in (["--help"], ["evaluate", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "vitssl evaluate --checkpoint" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--method", "nope", "--steps", "2", "--out", "x"], "--method 'nope' is unknown"),
        (["pretrain", "--method", "supervised", "--steps", "2", "--epochs", "1", "--out", "x"], "not allowed with"),
        (["pretrain", "--method", "supervised", "--steps", "two", "--out", "x"], "'two' is not an integer"),
        (["pretrain", "--method", "supervised", "--steps", "2"], "--out DIR is required"),
        (["pretrain", "--method", "supervised", "--out", "x"], "give --epochs N or --steps N"),
        (["pretrain", "--steps", "2", "--out", "x"], "--method is required"),
        (["pretrain", "--method", "supervised", "--steps", "2", "--out", "x", "--dataset", "mnist"], "'mnist' is not"),
        (["pretrain", "--method", "supervised", "--steps", "2", "--out", "x", "--precision", "fp16"], "invalid choice"),
        (["pretrain", "--method", "supervised", "--steps", "2", "--out", "x", "--model-arg", "depth"], "KEY=VALUE"),
        (["pretrain", "--method", "supervised", "--steps", "2", "--out", "x", "--lr", "-1"], "blr=-1.0"),
        (["pretrain", "--method", "supervised", "--steps", "2", "--out", "x", "--model-arg", "depht=2"], "depht"),
        (["pretrain", "--method", "supervised", "--steps", "2", "--out", "x", "--method-arg", "smooth=1"], "smooth"),
        (["pretrain", "--method", "supervised", "--steps", "2", "--out", "x", "--model", "vit_tiny_32"], "3x32x32"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("vitssl: error: "), captured.err
    assert message in captured.err
    assert not (tmp_path / "x").exists()  # nothing was trained or written


# --------------------------------------------------------------------------- the error contract
BAD_DEVICE = "cuda:99" if torch.cuda.is_available() else "cuda"


def pre(*extra, steps=True):
    """`vitssl pretrain` with a tiny model; ``extra`` supplies the method and the mistake."""
    return [
        "pretrain",
        *(["--steps", "2"] if steps else []),
        "--no-progress",
        "--precision",
        "fp32",
        "--out",
        "x",
        *TINY_ARGS,
        *extra,
    ]


BATTERY = [  # (argv; {tmp} is a folder of good and broken files, {repo} the repository), what the line says
    (pre("--method", "simclr", "--batch-size", "1", "--subset", "8"), "batch size 1 < 2"),
    (pre("--method", "supervised", "--device", BAD_DEVICE), f"device='{BAD_DEVICE}'"),
    (pre("--method", "supervised", "--subset", "8", "--batch-size", "16"), "the dataset has 8 samples"),
    (pre("--method", "supervised", "--warmup-steps", "100"), "warm-up (100 steps) is longer than the run"),
    (pre("--method", "nope"), "--method 'nope' is unknown; one of: supervised"),
    (pre("--method", "supervised", "--epochs", "0", steps=False), "'0' must be an integer > 0"),
    (pre("--method", "supervised", "--epochs", "-1", steps=False), "'-1' must be an integer > 0"),
    (
        pre("--method", "supervised", "--data-root", "{tmp}/no_data"),
        "--data-root {tmp}/no_data does not hold Fashion-MNIST: train-images-idx3-ubyte",
    ),
    (
        pre("--method", "supervised", "--dataset", "cifar10", "--data-root", "{tmp}/no_data"),
        "does not hold CIFAR-10: expected the folder {tmp}/no_data/cifar-10-batches-py",
    ),
    (["evaluate", "--checkpoint", "{tmp}/bad_weights"], "backbone.safetensors is not a readable safetensors file"),
    (["evaluate", "--checkpoint", "{tmp}/bad_card"], "backbone.json is not valid JSON"),
    (["evaluate", "--checkpoint", "{tmp}/missing"], "no such file or folder; give a 'vitssl pretrain' --out folder"),
    (["evaluate", "--checkpoint", "{repo}/vitssl_core/pretrained/pixels.json"], "describes a baseline without weights"),
    (["evaluate", "--checkpoint", "{tmp}/good", "--protocol", "nope"], "invalid choice: 'nope'"),
    (["evaluate", "--checkpoint", "{tmp}/good", "--feature", "max"], "invalid choice: 'max'"),
    (["evaluate", "--checkpoint", "{tmp}/good", "--device", BAD_DEVICE], "CUDA" if BAD_DEVICE == "cuda" else "GPU(s)"),
    (["evaluate", "--checkpoint", "{tmp}/good", "--data-root", "{tmp}/no_data"], "t10k-images-idx3-ubyte"),
]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A good backbone folder, one with corrupt weights, one with a corrupt card, and a folder without data."""
    from vitssl_core.vit import architecture

    tmp = tmp_path_factory.mktemp("broken")
    backbone = ViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    card = {"weights": "backbone.safetensors", "architecture": architecture(backbone), "dataset": "fashion_mnist"}
    for name in ("good", "bad_weights", "bad_card"):
        (tmp / name).mkdir()
        save_backbone(backbone, tmp / name / "backbone.safetensors")
        (tmp / name / "backbone.json").write_text(json.dumps(card))
    (tmp / "bad_weights" / "backbone.safetensors").write_bytes(b"\x00" * 8 + b"not a safetensors file")
    (tmp / "bad_card" / "backbone.json").write_text('{"architecture": ')
    (tmp / "no_data").mkdir()
    return tmp


@pytest.mark.parametrize("argv, message", BATTERY, ids=[" ".join(w for w in a if w not in pre()) for a, _ in BATTERY])
def test_every_bad_input_exits_2_with_one_line(argv, message, broken, capsys, monkeypatch, needs_fashion_mnist):
    """The promise of the module docstring: exit status 2, one line on stderr, no traceback."""
    monkeypatch.chdir(broken)
    fill = lambda text: text.format(tmp=broken, repo=REPO)  # noqa: E731
    assert cli.main([fill(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitssl: error: ") and "Traceback" not in err, err
    assert fill(message) in err


def test_resuming_another_methods_run_is_one_line(trained, capsys):
    assert cli.main(smoke(trained, "--resume", "--method", "simmim")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit this SimMIM" in err and "missing (" in err, err


def test_the_console_entry_point_keeps_the_contract(tmp_path, needs_fashion_mnist):
    """`python -m vitssl_core`: a mistake found only once training runs is still one line and status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "vitssl_core", *pre("--method", "simclr", "--batch-size", "1", "--subset", "8")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "batch size 1 < 2" in done.stderr


# --------------------------------------------------------------------------- config files
def test_config_file_under_the_command_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "method": "supervised",
                "steps": 50,
                "batch-size": 32,
                "lr": "1e-3",
                "warmup_steps": 5,
                "betas": [0.9, 0.95],
                "progress": False,
                "out": "runs/a",
                "model_args": {"depth": 2, "drop_path_rate": 0.1},
                "method_args": {"label_smoothing": 0.1},
            }
        )
    )
    argv = [
        "pretrain",
        "--config",
        str(config),
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--model-arg",
        "depth=4",
        "--print-config",
    ]
    assert cli.main(argv) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["epochs"] == 3 and shown["steps"] is None  # --epochs beats the file's steps
    assert shown["batch_size"] == 64 and shown["lr"] == 1e-3 and shown["warmup_steps"] == 5
    assert shown["betas"] == [0.9, 0.95] and shown["progress"] is False and shown["out"] == "runs/a"
    assert shown["model_args"] == {"depth": 4, "drop_path_rate": 0.1}
    assert shown["method_args"] == {"label_smoothing": 0.1}
    assert shown["weight_decay"] == cli.PRETRAIN_DEFAULTS["weight_decay"]  # defaults fill the rest


@pytest.mark.parametrize(
    "content, message",
    [
        ("batch_sise: 3\n", "unknown key 'batch_sise'"),
        ("steps: many\n", "--config .*'many' is not an integer"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("progress: 3\n", "progress must be true or false"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert cli.main(["pretrain", "--config", str(config), "--method", "supervised", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(config) in err
    assert re.search(message, err), err


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_accepted(path, capsys):
    assert cli.main(["pretrain", "--config", str(path), "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["method"] in cli.METHODS and shown["out"]


# --------------------------------------------------------------------------- pretrain end to end
def test_pretrain_writes_checkpoint_history_and_backbone_card(trained, capsys):
    card = json.loads((trained / "backbone.json").read_text())
    assert card["method"] == "supervised" and card["model"] == "vit_tiny_28" and card["steps"] == 4
    assert card["method_args"] == {"label_smoothing": 0.1} and card["normalize"]["mean"] == [0.286]
    backbone = ViT(**card["architecture"])
    state = load_backbone(trained / "backbone.safetensors")
    backbone.load_state_dict(state, strict=True)  # timm keys, no prefix
    weights, train_state = load_checkpoint(trained)
    assert train_state["step"] == 4
    assert torch.equal(weights["backbone.pos_embed"], state["pos_embed"])
    rows = [json.loads(line) for line in (trained / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and "acc" in rows[0]
    assert card["final_loss"] == rows[-1]["loss"]


@pytest.mark.parametrize("asked, used", [("auto", "fp32"), ("bf16", "bf16")])
def test_run_and_backbone_cards_record_the_precision_used(asked, used, tmp_path, capsys, needs_fashion_mnist):
    """--precision auto is fp32 on a CPU (bf16 is slower there at these widths); bf16 stays a choice."""
    out = tmp_path / "run"
    assert cli.main(smoke(out, "--device", "cpu", "--precision", asked, "--feature-validation", "0")) == 0
    run_card, card = (json.loads((out / name).read_text()) for name in ("run.json", "backbone.json"))
    assert run_card["precision"] == card["precision"] == used and card["train_config"]["precision"] == asked
    assert [s["precision"] for s in card["train_segments"]] == [used]


def test_rerun_needs_resume_and_resume_of_a_finished_run_is_a_no_op(trained, capsys):
    assert cli.main(smoke(trained)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a checkpoint" in err
    before = (trained / "backbone.safetensors").read_bytes()
    assert cli.main(smoke(trained, "--resume")) == 0
    assert (trained / "backbone.safetensors").read_bytes() == before


# --------------------------------------------------------------------------- evaluate
def test_evaluate_hands_the_backbone_to_run_protocol(trained, monkeypatch, capsys):
    calls = []

    def run_protocol(protocol, backbone, **kwargs):
        calls.append((protocol, backbone, kwargs))
        return {"protocol": protocol, "top1": 12.5}

    monkeypatch.setattr(cli, "run_protocol", run_protocol)
    out_file = trained.parent / "metrics.json"
    assert (
        cli.main(
            [
                "evaluate",
                "--checkpoint",
                str(trained),
                "--protocol",
                "linear",
                "--max-test",
                "50",
                "--device",
                "cpu",
                "--out",
                str(out_file),
            ]
        )
        == 0
    )
    protocol, backbone, kwargs = calls[0]
    assert protocol == "linear" and isinstance(backbone, ViT) and not backbone.training
    assert kwargs["dataset"] == "fashion_mnist" and kwargs["max_test"] == 50
    assert kwargs["normalize"] == {"mean": [0.286], "std": [0.353]}
    expected = load_backbone(trained / "backbone.safetensors")
    assert all(torch.equal(v, expected[k]) for k, v in backbone.state_dict().items())
    assert json.loads(capsys.readouterr().out)["top1"] == 12.5
    assert json.loads(out_file.read_text())["top1"] == 12.5


def test_evaluate_knn_end_to_end_on_real_data(trained, capsys):
    assert (
        cli.main(
            [
                "evaluate",
                "--checkpoint",
                str(trained),
                "--protocol",
                "knn",
                "--max-train",
                "500",
                "--max-test",
                "200",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_train"] == 500 and metrics["n_test"] == 200
    # The reference: the library's protocol on the same backbone, feature and normalisation
    backbone, card = load_pretrained(trained / "backbone.json")
    same = run_protocol(
        "knn",
        backbone,
        feature=metrics["feature"],
        normalize=card["normalize"],
        dataset="fashion_mnist",
        max_train=500,
        max_test=200,
    )
    assert metrics["top1"] == pytest.approx(same["top1"])


def test_evaluate_reads_a_shipped_checkpoint_and_its_feature(tmp_path, monkeypatch, capsys):
    from vitssl_core.vit import architecture

    backbone = ViT(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    save_backbone(backbone, tmp_path / "tiny.safetensors", dtype=torch.float16)
    card = {
        "name": "tiny",
        "weights": "tiny.safetensors",
        "model": architecture(backbone),
        "feature": "avg",
        "normalize": {"mean": [0.5], "std": [0.25]},
        "dataset": "fashion_mnist",
    }
    (tmp_path / "tiny.json").write_text(json.dumps(card))
    calls = []
    monkeypatch.setattr(cli, "run_protocol", lambda protocol, bb, **kw: calls.append((bb, kw)) or {"top1": 1.0})
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--device", "cpu"]) == 0
    loaded, kwargs = calls[0]
    assert kwargs["feature"] == "avg" and kwargs["normalize"] == card["normalize"]
    assert all(torch.equal(v, backbone.state_dict()[k].half().float()) for k, v in loaded.state_dict().items())


def test_evaluate_reads_with_the_cards_feature_unless_told_otherwise(trained, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "run_protocol", lambda protocol, bb, **kw: calls.append(kw["feature"]) or {"top1": 1.0})
    card = json.loads((trained / "backbone.json").read_text())
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--device", "cpu"]) == 0  # the one pretrain chose
    other = next(f for f in FEATURES if f != card["feature"])
    (tmp_path / "backbone.json").write_text(json.dumps({**card, "feature": other}))
    (tmp_path / "backbone.safetensors").write_bytes((trained / "backbone.safetensors").read_bytes())
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path), "--device", "cpu"]) == 0
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path), "--device", "cpu", "--feature", "cls+avg"]) == 0
    (tmp_path / "backbone.json").write_text(json.dumps({k: v for k, v in card.items() if k != "feature"}))
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path), "--device", "cpu"]) == 0  # none recorded: cls
    assert calls == [card["feature"], other, "cls+avg", "cls"]


def test_pretrain_chooses_the_feature_by_knn_on_held_out_training_images(trained):
    card = json.loads((trained / "backbone.json").read_text())
    choice = card["feature_choice"]
    assert choice["held_out"] == "the last 25 of the 128 training images"  # a fifth of --subset 128
    # Recompute by hand: each feature extracted on its own, kNN of the last 25 training images
    # against the first 103 (the test split plays no part), the best one recorded.
    backbone = ViT(**card["architecture"])
    backbone.load_state_dict(load_backbone(trained / "backbone.safetensors"))
    images, labels = load_fashion_mnist_tensors(train=True)
    images, labels = images[:128], labels[:128]
    expected = {}
    for feature in FEATURES:
        f = extract_features(backbone, images, feature, normalize=card["normalize"], precision="fp32")
        expected[feature] = knn_accuracy(f[:103], labels[:103], f[103:], labels[103:], k=20, temperature=0.07)
    assert choice["top1"] == pytest.approx(expected, abs=1e-9)
    assert card["feature"] == max(expected, key=expected.get)


def test_pretrain_feature_validation_0_records_no_feature(tmp_path, needs_fashion_mnist, capsys):
    assert cli.main(smoke(tmp_path / "run", "--feature-validation", "0")) == 0
    card = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert "feature" not in card and "feature_choice" not in card


def test_evaluate_unknown_protocol_is_one_line(trained, capsys):
    assert (
        cli.main(
            ["evaluate", "--checkpoint", str(trained), "--protocol", "nope", "--max-train", "50", "--max-test", "20"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err


@pytest.mark.parametrize(
    "method, extra",
    [
        ("simclr", []),
        ("mocov3", []),
        ("dino", ["--method-arg", "n_local_crops=2", "--method-arg", "out_dim=64", "--method-arg", "hidden_dim=32"]),
        (
            "mae",
            [
                "--method-arg",
                "decoder_embed_dim=32",
                "--method-arg",
                "decoder_depth=1",
                "--method-arg",
                "decoder_num_heads=2",
            ],
        ),
        ("simmim", []),
        ("beit", ["--method-arg", "vocab_size=16", "--method-arg", "tokenizer_images=64"]),
    ],
)
def test_every_method_pretrains_from_the_cli(method, extra, tmp_path, capsys, monkeypatch, needs_fashion_mnist):
    out = tmp_path / method
    argv = [
        "pretrain",
        "--method",
        method,
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
        "--out",
        str(out),
        *model_args(depth=1, patch_size=4),
        *extra,
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history][-1] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    card = json.loads((out / "backbone.json").read_text())
    assert card["method"] == method
    backbone = ViT(**card["architecture"])
    shipped = load_backbone(out / "backbone.safetensors")
    backbone.load_state_dict(shipped, strict=True)

    # The run card names where the exported backbone lives in the training checkpoint (DINO: its teacher)...
    run_card = json.loads((out / "run.json").read_text())
    assert run_card["exported"] == card["exported"] == ("teacher" if method == "dino" else "backbone")
    assert run_card["state_keys"].keys() == shipped.keys()
    owner = {"dino": "teacher_backbone.", "mae": ""}.get(method, "backbone.")
    assert all(v == owner + k for k, v in run_card["state_keys"].items())  # MAE's encoder keys are MAE's own
    assert run_card["architecture"] == card["architecture"] and run_card["method"] == method
    # ...so `vitssl evaluate` reads a run that has not finished: here the same weights, from step 3's checkpoint.
    (out / "backbone.safetensors").unlink()
    seen = []
    monkeypatch.setattr(cli, "run_protocol", lambda protocol, b, **kw: seen.append(b) or {"top1": 1.0})
    assert cli.main(["evaluate", "--checkpoint", str(out), "--device", "cpu"]) == 0
    assert "is still training" in capsys.readouterr().err
    assert seen[0].state_dict().keys() == shipped.keys()
    assert all(torch.equal(v, shipped[k]) for k, v in seen[0].state_dict().items())

    # Nothing float64 is held by a training step (Apple's MPS has no float64): not the method's
    # parameters and buffers, not the optimizer's moments.
    weights, state = load_checkpoint(latest_checkpoint(out))
    doubles = [k for k, v in weights.items() if v.dtype == torch.float64]
    doubles += [
        f"optimizer {i}.{k}"
        for i, slot in state["optimizer"]["state"].items()
        for k, v in slot.items()
        if isinstance(v, torch.Tensor) and v.dtype == torch.float64
    ]
    assert not doubles, doubles


def test_evaluate_without_a_backbone_says_what_is_missing(tmp_path, capsys):
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    assert "backbone.json" in capsys.readouterr().err


def test_evaluate_a_run_in_progress_says_what_is_wrong(trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{not json")
    assert cli.main(["evaluate", "--checkpoint", str(run)]) == 2
    assert "run.json is not a run card" in capsys.readouterr().err
    (run / "run.json").write_text((trained / "run.json").read_text())  # a run that has not saved yet
    assert cli.main(["evaluate", "--checkpoint", str(run)]) == 1
    assert "no readable checkpoint yet" in capsys.readouterr().err

    # The trainer replaced the checkpoint while it was read: the next try reads the new one.
    (run / "checkpoints").symlink_to(trained / "checkpoints", target_is_directory=True)
    (run / "config.json").write_text((trained / "config.json").read_text())  # the trainer's: the run's length
    real, calls = cli.load_checkpoint, []

    def racing(path):
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError("step_00000002/model.safetensors vanished")
        return real(path)

    monkeypatch.setattr(cli, "load_checkpoint", racing)
    monkeypatch.setattr(cli, "run_protocol", lambda protocol, b, **kw: {"top1": 1.0})
    assert cli.main(["evaluate", "--checkpoint", str(run)]) == 0 and len(calls) == 2
    assert "at step 4 of 4" in capsys.readouterr().err
