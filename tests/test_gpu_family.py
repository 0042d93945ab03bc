"""scripts/gpu_family.sh on the CPU in its tiny mode: every method trains a few steps, finishes, and
comes back as one small pack that scripts/ship_checkpoint.py turns into a card."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from vitssl_core.__main__ import parse_args

REPO = Path(__file__).resolve().parents[1]
METHODS = {"dino", "mae", "simmim", "simclr", "mocov3", "beit", "supervised"}


def test_every_gpu_recipe_is_a_49_token_config_the_cli_reads():
    recipes = {p.stem: p for p in (REPO / "configs" / "gpu").glob("*.yaml")}
    assert set(recipes) == METHODS
    for name, path in recipes.items():
        recipe = yaml.safe_load(path.read_text())
        assert recipe["method"] == name and recipe["model_args"]["patch_size"] == 4  # 28 / 4 = a 7x7 grid
        results = yaml.safe_load((REPO / "configs" / "results" / f"{name}.yaml").read_text())
        assert recipe["epochs"] > results["epochs"]  # "with their epochs raised"
        args = parse_args(["pretrain", "--config", str(path), "--out", "x"])
        assert args.method == name and args.model_args["patch_size"] == 4


@pytest.fixture(scope="module")
def family(tmp_path_factory, needs_fashion_mnist):
    out, runs = tmp_path_factory.mktemp("packs"), tmp_path_factory.mktemp("runs")
    env = dict(os.environ, VITSSL_GPU_TINY="1", VITSSL_DEVICE="cpu", VITSSL_THREADS="1", VITSSL_GPU_RUNS=str(runs))
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_family.sh"), str(needs_fashion_mnist), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out, runs


def test_the_family_comes_back_in_at_most_8_small_files(family):
    out, _ = family
    files = sorted(p for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() and p.stat().st_size < 16 * 1024 * 1024 for p in files)
    assert {p.name for p in files} == {f"vitssl_gpu_{m}.tar.gz" for m in METHODS}
    for m in METHODS:
        with tarfile.open(out / f"vitssl_gpu_{m}.tar.gz") as tar:
            names = {Path(n).name for n in tar.getnames()}
        assert {"backbone.safetensors", "backbone.json", "history.jsonl", "run.json"} <= names, (m, names)
        assert ("decoder.safetensors" in names) == (m == "mae")
        assert ("head.safetensors" in names) == (m == "supervised")  # its own classifier: ship_checkpoint --own-head


def test_a_pack_ships_as_a_card(family, tmp_path):
    out, _ = family
    with tarfile.open(out / "vitssl_gpu_mae.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    card_dir = tmp_path / "cards"
    ship = [sys.executable, str(REPO / "scripts" / "ship_checkpoint.py"), str(tmp_path / "unpacked" / "mae")]
    quick = ["--name", "mae_gpu", "--out", str(card_dir), "--quick", "--finetune-epochs", "0", "--threads", "1"]
    # the folder is named mae, but configs/results/mae.yaml is the 16-token recipe: never recorded as this run's
    refused = subprocess.run([*ship, *quick], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--recipe" in refused.stderr and "configs/results/mae.yaml" in refused.stderr
    assert not (card_dir / "mae_gpu.json").exists()
    recipe = REPO / "configs" / "gpu" / "mae.yaml"
    result = subprocess.run([*ship, *quick, "--recipe", str(recipe)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    card = json.loads((card_dir / "mae_gpu.json").read_text())
    assert (
        card["recipe"] == "configs/gpu/mae.yaml" and card["command"] == "vitssl pretrain --config configs/gpu/mae.yaml"
    )
    # the tiny mode's overrides are on the card, each with the recipe's value and the run's
    assert card["recipe_changes"]["batch_size"] == [yaml.safe_load(recipe.read_text())["batch_size"], 16]
    assert card["recipe_changes"]["model_args"][1]["depth"] == 1
    assert card["model"]["patch_size"] == 4 and card["steps"] == 4 and card["model_args"]["patch_size"] == 4
    assert card["history"] == "mae_gpu_history.jsonl" and (card_dir / card["history"]).read_text().count("\n") >= 4
    check = card["knn_check"]  # a 49-token card stores the subset that CI re-measures (--quick: 1000 / 200)
    assert (check["n_train"], check["n_test"]) == (1000, 200) and 0 <= check["top1"] <= 100
    assert (
        card["decoder"]["weights"] == "mae_gpu_decoder.safetensors"
        and (card_dir / "mae_gpu_decoder.safetensors").is_file()
    )


def test_a_run_stopped_by_the_cap_finishes_where_it_stands(tmp_path, needs_fashion_mnist):
    # What the script does when `timeout` stops a run: the trainer checkpoints on SIGTERM, and
    # `--resume --steps N` at the checkpoint's step writes the backbone and its card without training on.
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vitssl_core", "pretrain", "--method", "simclr", "--subset", "64", "--batch-size", "8"]
    cmd += ["--device", "cpu", "--precision", "fp32", "--checkpoint-every", "1", "--log-every", "1", "--no-progress"]
    cmd += ["--model-arg", "depth=1", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*cmd, "--steps", "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pointer = run / "checkpoints" / "last.json"
    while not pointer.is_file() or json.loads(pointer.read_text())["step"] < 2:  # poll the run, no fixed sleep
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)
        assert proc.returncode is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    step = json.loads(pointer.read_text())["step"]
    assert not (run / "backbone.safetensors").exists() and step >= 2
    finish = subprocess.run([*cmd, "--steps", str(step), "--resume"], env=env, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    card = json.loads((run / "backbone.json").read_text())
    assert card["steps"] == step and (run / "backbone.safetensors").is_file()
