"""Tests for the ``vitssl`` command line (vitssl_core/__main__.py)."""

import argparse
import dataclasses
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
from vitssl_core.train import TrainConfig
from vitssl_core.data import load_fashion_mnist_tensors
from vitssl_core.features import extract_features, FEATURES, knn_accuracy
from vitssl_core.probes import run_protocol

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


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO / "configs"))
)
def test_every_shipped_config_reaches_train_config(path, tmp_path):
    recipe = yaml.safe_load(path.read_text())
    config = cli._train_config(cli.parse_args(["pretrain", "--config", str(path), "--out", str(tmp_path)]))
    fields = {cli._train_dest(f): f.name for f in dataclasses.fields(TrainConfig)}
    given = {key.replace("-", "_"): value for key, value in recipe.items() if key.replace("-", "_") in fields}
    assert given  # every recipe sets some of the training options
    for key, value in given.items():
        if key != "out":  # --out on the command line beats the file
            got = getattr(config, fields[key])
            assert got == (tuple(value) if isinstance(value, list) else value), (key, got, value)
    assert config.out_dir == str(tmp_path)


def _another_value(action: argparse.Action, name: str, tmp_path: Path) -> tuple[list[str], object]:
    """(command-line words after the option, the value TrainConfig should then hold): not the CLI's default."""
    default = cli.PRETRAIN_DEFAULTS[action.dest]
    if action.nargs == 0:  # --x / --no-x
        return [], not default
    if action.choices:
        return [choice := next(c for c in action.choices if c != default)], choice
    if action.nargs == 2:  # betas
        return ["0.8", "0.95"], (0.8, 0.95)
    if action.type in (cli._positive_int, cli._non_negative_int):
        return ["7"], 7
    if action.type is cli._float:
        return ["0.25"], 0.25
    text = "cpu" if name == "device" else str(tmp_path / "other")
    return [text], text


@pytest.mark.parametrize("field", dataclasses.fields(TrainConfig), ids=lambda f: f.name)
def test_every_train_config_field_is_a_pretrain_option_that_reaches_it(field, tmp_path):
    pretrain = cli.build_parser().commands["pretrain"]
    by_flag = {flag: action for action in pretrain.options.values() for flag in action.option_strings}
    flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
    assert flag in by_flag, f"TrainConfig.{field.name} has no option {flag} in 'vitssl pretrain'"
    action = by_flag[flag]
    assert action.help and action.dest in cli.PRETRAIN_DEFAULTS  # documented, with a default to fill in
    words, value = _another_value(action, field.name, tmp_path)
    if action.nargs == 0 and value is False:
        flag = f"--no-{flag[2:]}"
    argv = ["pretrain", "--method", "supervised", "--out", str(tmp_path / "run")]
    if field.name not in ("epochs", "max_steps"):
        argv += ["--epochs", "1"]
    config = cli._train_config(cli.parse_args([*argv, flag, *words]))
    assert getattr(config, field.name) == value
    if field.name not in ("epochs", "max_steps", "out_dir"):  # the value came from the flag, not a default
        assert getattr(cli._train_config(cli.parse_args(argv)), field.name) != value


def test_the_training_options_keep_their_names_and_cli_defaults():
    args = cli.parse_args(["pretrain", "--method", "supervised", "--steps", "3", "--out", "o", "--lr", "0.002"])
    config = cli._train_config(args)
    assert (config.max_steps, config.out_dir, config.blr) == (3, "o", 0.002)
    assert (config.batch_size, config.min_lr, config.betas) == (128, 1e-6, (0.9, 0.999))  # not the library's 64, 0.0
    assert args.betas == [0.9, 0.999]  # a list: --print-config writes YAML, which has no tuples


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
    (out / "backbone.json").unlink()  # a run in progress has neither
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


# --------------------------------------------------------------------------- issue 23: the contract, everywhere
PY_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
RGB_TINY = ["--model", "vit_tiny_32", *model_args(patch_size=8)]  # 3x32x32 images


def one_line_2(argv, capsys):
    """``vitssl argv`` exits 2 with one line and no traceback; returns that line."""
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitssl: error: ") and "Traceback" not in err, err
    return err


def png_folder(root, per_class=10, size=32, classes="ab"):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def bad(tmp_path_factory, trained, needs_fashion_mnist):
    """Every kind of broken input of review quality2 §3.2, one folder each."""
    import gzip
    import shutil

    import numpy as np
    from PIL import Image

    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "afile").write_text("a file, not a folder")
    (tmp / "adir").mkdir()
    raw = (png_folder(tmp / "trunc") / "a" / "00.png").read_bytes()
    (tmp / "trunc" / "a" / "00.png").write_bytes(raw[: len(raw) // 2])
    (png_folder(tmp / "fakepng") / "b" / "03.png").write_text("not an image")
    (tmp / "emptycls" / "a").mkdir(parents=True)
    (tmp / "emptycls" / "b").mkdir()
    (tmp / "flat").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp / "flat" / "0.png")
    for c in "ab":
        (tmp / "nan" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((32, 32), np.nan if i == 3 else 0.5, np.float32)).save(
                tmp / "nan" / c / f"{i}.tiff"
            )
    idx = tmp / "idx"  # a truncated training-image file, the labels intact
    idx.mkdir()
    images = needs_fashion_mnist / "train-images-idx3-ubyte.gz"
    plain = gzip.decompress(images.read_bytes()) if images.is_file() else (images.with_suffix("")).read_bytes()
    (idx / "train-images-idx3-ubyte").write_bytes(plain[:100_000])
    labels = needs_fashion_mnist / "train-labels-idx1-ubyte.gz"
    shutil.copy(labels if labels.is_file() else labels.with_suffix(""), idx)
    for name, change in (
        ("zerostd", {"normalize": {"mean": [0.286], "std": [0]}}),
        ("nanstd", {"normalize": {"mean": [0.286], "std": [float("nan")]}}),
        ("bogus", {"feature": "bogus"}),
    ):
        shutil.copytree(trained, tmp / name)
        card = json.loads((tmp / name / "backbone.json").read_text())
        (tmp / name / "backbone.json").write_text(json.dumps({**card, **change}))
    for name in ("moved", "norng"):  # resumable runs whose checkpoint was damaged
        shutil.copytree(trained, tmp / name)
    (tmp / "moved" / "checkpoints" / "last.json").write_text(json.dumps({"step": 99, "dir": "step_00000099"}))
    state_pt = next((tmp / "norng" / "checkpoints").glob("step_*/state.pt"))
    state = torch.load(state_pt, weights_only=True)
    del state["rng"]
    torch.save(state, state_pt)
    for name in ("evil", "shapes"):  # runs in progress: run.json and checkpoints, no backbone yet
        shutil.copytree(trained, tmp / name)
        (tmp / name / "backbone.safetensors").unlink()
        (tmp / name / "backbone.json").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'PWNED'}",))

    torch.save({"x": Evil()}, next((tmp / "evil" / "checkpoints").glob("step_*/state.pt")))
    card = json.loads((tmp / "shapes" / "run.json").read_text())
    keys = card["state_keys"]
    keys["blocks.0.attn.qkv.weight"] = keys["blocks.0.attn.proj.weight"]  # a tensor of another shape
    (tmp / "shapes" / "run.json").write_text(json.dumps(card))
    return tmp


def ev(*extra):
    return ["evaluate", "--device", "cpu", "--max-train", "100", "--max-test", "20", *extra]


CONTRACT = [  # (review probe, argv with {bad}, what the one line says)
    ("O21b", pre("--method", "supervised", "--out", ""), "--out is empty"),
    ("P04f", pre("--method", "supervised", "--lr", "inf"), "blr=inf must be a finite number > 0"),
    ("P04f'", pre("--method", "supervised", "--weight-decay", "inf"), "weight_decay=inf must be a finite number"),
    ("P05", pre("--method", "supervised", "--out", "{bad}/afile"), "--out {bad}/afile is a file, not a folder"),
    ("O21a", pre("--method", "supervised", "--out", "{bad}/afile/sub"), "a part of the path is a file"),
    (
        "D08b",
        pre("--method", "supervised", "--dataset", "folder:{bad}/trunc", *RGB_TINY),
        "trunc/a/00.png is not a readable image",
    ),
    (
        "D08c",
        pre("--method", "supervised", "--dataset", "folder:{bad}/nan", *RGB_TINY),
        "nan/a/3.tiff holds non-finite pixels",
    ),
    (
        "D08e",
        pre("--method", "supervised", "--dataset", "folder:{bad}/emptycls", *RGB_TINY),
        "Found no valid file for the classes a, b",
    ),
    (
        "D08f",
        pre("--method", "supervised", "--dataset", "folder:{bad}/flat", *RGB_TINY),
        "Couldn't find any class folder",
    ),
    (
        "D08g",
        pre("--method", "supervised", "--dataset", "folder:{bad}/fakepng", *RGB_TINY),
        "fakepng/b/03.png is not a readable image",
    ),
    (
        "I09a",
        pre("--method", "supervised", "--data-root", "{bad}/idx"),
        "train-images-idx3-ubyte is truncated: 100000 bytes",
    ),
    (
        "Z19a",
        smoke("{bad}/moved", "--resume"),
        "step_00000099, which lacks model.safetensors or state.pt: that checkpoint was moved",
    ),
    ("Z19g", smoke("{bad}/norng", "--resume", "--steps", "6"), "state.pt lacks 'rng'"),
    ("Q18l", ev("--checkpoint", "{bad}/zerostd", "--out", "{bad}/adir"), "--out '{bad}/adir' is a folder"),
    (
        "Q18l'",
        ev("--checkpoint", "{bad}/zerostd", "--out", "{bad}/nowhere/m.json"),
        "the folder {bad}/nowhere does not exist",
    ),
    (
        "K17i",
        ev("--checkpoint", "{bad}/zerostd"),
        "zerostd/backbone.json: its \"normalize\" is unusable: normalize['std']=[0]",
    ),
    ("K17n", ev("--checkpoint", "{bad}/nanstd"), "normalize['std']=[nan] must be one or more finite numbers > 0"),
    ("K17j", ev("--checkpoint", "{bad}/bogus"), "its \"feature\" 'bogus' is not one of cls, avg, cls+avg"),
    ("X24b", ev("--checkpoint", "{bad}/evil"), "refusing to load"),
    ("R10d", ev("--checkpoint", "{bad}/shapes"), "does not hold the backbone run.json describes: "),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CONTRACT], ids=[c[0] for c in CONTRACT])
def test_every_input_of_the_review_exits_2_with_one_line(argv, message, bad, capsys, monkeypatch):
    monkeypatch.chdir(bad)
    fill = lambda text: text.format(bad=bad)  # noqa: E731
    before = set(bad.rglob("*"))
    assert fill(message) in one_line_2([fill(a) for a in argv], capsys)
    assert not (bad / "PWNED").exists()  # the pickle's code never ran
    assert [p for p in set(bad.rglob("*")) - before if p.name != ".lock"] == []  # a refused run writes nothing


def test_a_mismatch_exits_2_through_a_card_and_through_run_json_alike(bad, capsys):
    """One kind of problem, one exit code (review: 2 through backbone.json, 1 through run.json)."""
    card = json.loads((bad / "zerostd" / "backbone.json").read_text())
    size = bad / "size"
    size.mkdir()
    (size / "backbone.safetensors").write_bytes((bad / "zerostd" / "backbone.safetensors").read_bytes())
    card["architecture"]["embed_dim"] = 64
    card["normalize"] = {"mean": [0.5], "std": [0.5]}
    (size / "backbone.json").write_text(json.dumps(card))
    assert "does not fit the ViT its card" in one_line_2(ev("--checkpoint", size), capsys)
    assert "does not hold the backbone" in one_line_2(ev("--checkpoint", bad / "shapes"), capsys)


def test_running_out_of_memory_names_a_batch_size_to_try(tmp_path, monkeypatch, capsys, needs_fashion_mnist):
    def oom(message, kind=RuntimeError):
        def train(*args, **kwargs):
            raise kind(message)

        return train

    for kind, message in (
        (RuntimeError, "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"),
        (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB"),
    ):
        monkeypatch.setattr(cli, "train", oom(message, kind))
        err = one_line_2(smoke(tmp_path / kind.__name__, "--accum-steps", "2"), capsys)
        assert "out of memory with --batch-size 16" in err and "try --batch-size 8 (with --accum-steps 4" in err
    # Our own bugs are not dressed up as bad input: their traceback stays.
    monkeypatch.setattr(cli, "train", oom("index 3 is out of bounds", RuntimeError))
    with pytest.raises(RuntimeError, match="out of bounds"):
        cli.main(smoke(tmp_path / "bug"))
    monkeypatch.setattr(cli, "train", oom("division by zero", ZeroDivisionError))
    with pytest.raises(ZeroDivisionError):
        cli.main(smoke(tmp_path / "bug2"))


def test_help_lists_one_exit_code_per_kind_of_problem(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    codes = re.findall(r"^  (\d+) ", out[out.index("exit status:") :], flags=re.M)
    assert codes == ["0", "1", "2", "130"]
    assert "busy (another run holds its lock)" in out and "a batch too big for memory" in out


def test_evaluate_prints_the_metrics_before_writing_them(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_protocol", lambda protocol, backbone, **kw: {"protocol": protocol, "top1": 42.5})

    def disk_full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "atomic_write_json", disk_full)
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--out", str(tmp_path / "m.json")]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["top1"] == 42.5  # not lost
    assert "cannot write the metrics (No space left on device); they are printed above" in captured.err


def test_evaluate_maps_an_unreadable_data_file_to_one_line(trained, monkeypatch, capsys):
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/t10k-images-idx3-ubyte")

    monkeypatch.setattr(cli, "run_protocol", unreadable)
    err = one_line_2(["evaluate", "--checkpoint", trained], capsys)
    assert "--dataset fashion_mnist: [Errno 13] Permission denied: '/data/t10k-images-idx3-ubyte'" in err


def test_evaluate_checks_out_before_spending_the_protocols_time(trained, tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(cli, "run_protocol", lambda *a, **kw: ran.append(1) or {"top1": 1.0})
    one_line_2(["evaluate", "--checkpoint", trained, "--out", tmp_path], capsys)
    one_line_2(["evaluate", "--checkpoint", trained, "--out", tmp_path / "no" / "m.json"], capsys)
    assert ran == []


def test_a_finished_run_without_its_backbone_says_so_and_reads_the_cards_feature(
    trained, tmp_path, monkeypatch, capsys
):
    import shutil

    run = tmp_path / "nobb"
    shutil.copytree(trained, run)
    (run / "backbone.safetensors").unlink()
    card = json.loads((run / "backbone.json").read_text())
    card["feature"] = "cls+avg" if card.get("feature") != "cls+avg" else "avg"  # not the default
    (run / "backbone.json").write_text(json.dumps(card))
    seen = []
    monkeypatch.setattr(cli, "run_protocol", lambda p, b, **kw: seen.append(kw) or {"top1": 1.0})
    assert cli.main(["evaluate", "--checkpoint", str(run)]) == 0
    err = capsys.readouterr().err
    assert "finished training, but its backbone.safetensors is missing" in err and "still training" not in err
    assert seen[0]["feature"] == card["feature"]


# ---- one run per folder
PAUSED_RUN = """
import pathlib, sys, time
from vitssl_core import __main__ as cli

ready, go, at = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
real = cli.train

def train(method, dataset, config, callback=None, **kwargs):
    def pause(row):  # the CLI's own callback first (run.json), then wait for the test's word
        if callback is not None:
            callback(row)
        if row["step"] == at:
            ready.write_text("paused")
            while not go.exists():
                time.sleep(0.01)
    return real(method, dataset, config, callback=pause, **kwargs)

cli.train = train
sys.exit(cli.main(sys.argv[4:]))
"""


def wait_for(condition, proc, what, timeout=120.0):
    """Poll ``condition`` until it holds; fail early if ``proc`` ends first."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def start_paused(tmp_path, out, *extra, at=2):
    """`vitssl pretrain` in a process of its own that pauses after logging step ``at`` until told to go on."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_RUN, str(ready), str(go), str(at), *smoke(out, "--seed", "1", *extra)],
        env=PY_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(ready.exists, proc, f"it paused at step {at}")
    return proc, go


def test_a_second_run_on_a_busy_out_is_refused_and_the_first_finishes_intact(tmp_path, capsys, needs_fashion_mnist):
    out = tmp_path / "run"
    first, go = start_paused(tmp_path, out)
    try:
        for extra in ((), ("--resume",)):
            err = one_line_2(smoke(out, "--seed", "2", *extra), capsys)
            assert f"--out {out} is in use by process {first.pid} on " in err and "choose another --out" in err
    finally:
        go.write_text("go")
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "trained 4 steps" in stdout
    assert json.loads((out / "config.json").read_text())["seed"] == 1  # the first run's config, not the second's
    assert [json.loads(r)["step"] for r in (out / "history.jsonl").read_text().splitlines()] == [2, 4]
    assert json.loads((out / "backbone.json").read_text())["train_config"]["seed"] == 1


def test_a_killed_run_never_blocks_resume(tmp_path, capsys, needs_fashion_mnist):
    import signal

    out = tmp_path / "run"
    first, _ = start_paused(tmp_path, out, "--steps", "6", "--checkpoint-every", "2", at=4)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert load_checkpoint(out)[1]["step"] == 2  # what --resume continues
    (out / "checkpoints" / ".last.json.tmp-99999").write_text('{"step": ')  # litter of a killed pointer write
    assert f"process {first.pid}" in (out / ".lock").read_text()  # the dead holder's name stays in the file
    assert cli.main(smoke(out, "--resume", "--steps", "6", "--checkpoint-every", "2", "--seed", "1")) == 0
    assert "trained 6 steps" in capsys.readouterr().out
    assert not list((out / "checkpoints").glob(".last.json.tmp-*"))  # removed on the next start


def test_a_file_system_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch, capsys, needs_fashion_mnist):
    import errno
    import warnings

    from vitssl_core import checkpoint

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(checkpoint.fcntl, "lockf", no_locks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(smoke(tmp_path / "run")) == 0
    said = [w for w in caught if "cannot lock" in str(w.message)]
    assert len(said) == 1 and "No locks available" in str(said[0].message)


# ---- both commands read folder:PATH alike, in both layouts
def test_folder_datasets_in_both_layouts_for_pretrain_and_evaluate(tmp_path, capsys):
    flat = png_folder(tmp_path / "flat", per_class=15)  # every fifth image a test image: 24 train, 6 test
    split = tmp_path / "split"
    png_folder(split / "train", per_class=12)
    png_folder(split / "test", per_class=3)
    for root in (flat, split):
        out = tmp_path / f"run_{root.name}"
        argv = smoke(out, "--dataset", f"folder:{root}", "--batch-size", "8", *RGB_TINY)
        assert cli.main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert cli.main(["evaluate", "--checkpoint", str(out), "--device", "cpu"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert (metrics["n_train"], metrics["n_test"]) == (24, 6)
        assert json.loads((out / "backbone.json").read_text())["feature_choice"]["held_out"].endswith(
            "of the 24 training images"
        )


# ---- signals and read-only folders, in real processes
def test_ctrl_c_exits_130_with_one_line_and_a_checkpoint(tmp_path, needs_fashion_mnist):
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitssl_core", *smoke(out, "--steps", "100000", "--log-every", "1")],
        env=PY_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell that starts the test suite in the background (`pytest &`) ignores SIGINT, and its
        # children inherit that; a terminal's Ctrl-C reaches a process whose SIGINT is the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for((out / "run.json").exists, proc, "it logged its first step")  # written at the first logged row
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.count("\n") == 1 and "stopped (training stopped by SIGINT" in stderr and "--resume" in stderr
    assert load_checkpoint(out)[1]["step"] >= 1


def unprivileged(tmp_path):
    """A command prefix under which file modes apply, or a skip saying why there is none.

    As root, setpriv drops every capability (CAP_DAC_OVERRIDE first): the process stays uid 0, so
    it still reads the interpreter and the test's folders, but it can no longer write where the
    modes forbid it. A non-root user needs nothing.
    """
    import shutil

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): root ignores file modes, so nothing would be tested")
    prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    done = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"], capture_output=True)
    if done.returncode == 0:
        pytest.skip("setpriv could not drop root's capabilities here (a container without CAP_SETPCAP?)")
    return prefix


def test_read_only_folders_are_one_line_errors(trained, tmp_path, needs_fashion_mnist):
    import shutil

    prefix = unprivileged(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    held = tmp_path / "held"  # a run that can only be read
    shutil.copytree(trained, held)
    for folder in (ro, held):
        folder.chmod(0o555)
    cases = [
        ("P07a", smoke(ro), f"--out {ro} is not writable"),
        ("P07b", smoke(held, "--resume", "--steps", "6"), f"--out {held} is not writable"),
        ("P07c", smoke(ro / "sub"), f"--out {ro / 'sub'} cannot be created (Permission denied)"),
        ("E07d", ["evaluate", "--checkpoint", str(trained), "--out", str(ro / "m.json")], f"the folder {ro} is not"),
    ]
    try:
        for probe, argv, message in cases:
            done = subprocess.run(
                [*prefix, sys.executable, "-m", "vitssl_core", *argv],
                env=PY_ENV,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 2, (probe, done.stderr)
            assert done.stderr.count("\n") == 1 and message in done.stderr, (probe, done.stderr)
        assert list(ro.iterdir()) == [] and sorted(p.name for p in held.iterdir()) == sorted(
            p.name for p in trained.iterdir()
        )
    finally:
        for folder in (ro, held):
            folder.chmod(0o755)
