"""Smoke tests: every benchmark and script runs end to end with ``--quick`` (tiny sizes, seconds).

They check that the programs still run against today's package, not what they measure.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitssl_core import load_pretrained
from vitssl_core.evaluate import correct_from_hex

REPO = Path(__file__).resolve().parents[1]
NEEDS_DATA = {"method_speed.py", "train_speed.py", "finetune_crop.py"}


def run(path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{path.name} {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_benchmark_runs_quick(name, tmp_path, request):
    if name in NEEDS_DATA:
        request.getfixturevalue("needs_fashion_mnist")
    done = run(REPO / "benchmarks" / name, "--quick", cwd=tmp_path)
    assert done.stdout.strip(), f"{name} printed nothing"


def test_ship_checkpoint_quick_writes_a_loadable_card(tmp_path, needs_fashion_mnist):
    run(
        REPO / "scripts" / "ship_checkpoint.py",
        "--random",
        "--name",
        "quick",
        "--quick",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
        cwd=tmp_path,
    )
    card = json.loads((tmp_path / "quick.json").read_text())
    assert card["method"] == "random" and card["protocols"]["finetune"]["epochs"] == 1
    backbone, loaded = load_pretrained(tmp_path / "quick.safetensors")
    assert loaded["feature"] == card["feature"] and backbone.embed_dim == card["model"]["embed_dim"]
    for key, value in card["metrics"].items():  # each number is the share of its per-image record
        correct = correct_from_hex(card["correct"][key], 200)
        assert value == pytest.approx(100 * correct.float().mean().item(), abs=0.005), key


def test_ship_checkpoint_quick_refuses_the_shipped_folder(capsys):
    spec = importlib.util.spec_from_file_location("ship_checkpoint", REPO / "scripts" / "ship_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--random", "--name", "x", "--quick"])  # --out defaults to checkpoints/
    assert exit_info.value.code == 2 and "outside checkpoints/" in capsys.readouterr().err


def test_offline_site_quick_builds_a_page(tmp_path):
    done = run(REPO / "scripts" / "offline_site.py", "--quick", cwd=tmp_path)
    assert "loads Mermaid without ES modules" in done.stdout
