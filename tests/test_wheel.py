"""The package as a user installs it: a wheel built from the repository, installed into an empty
folder and used from outside the repository, loads the shipped backbones by name."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
WHEEL_BUDGET = 30 * MB  # the cards and weights the wheel carries


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding only the installed wheel (no dependencies: those come from the environment)."""
    build, target = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(build)],
        check=True,
        capture_output=True,
    )
    (wheel,) = build.glob("vitssl_core-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = [i for i in z.infolist() if i.filename.startswith("vitssl_core/pretrained/")]
    assert sum(i.file_size for i in shipped) <= WHEEL_BUDGET, sum(i.file_size for i in shipped) / MB
    names = {Path(i.filename).name for i in shipped}
    cards = {p.name for p in (REPO / "vitssl_core" / "pretrained").glob("*.json")}
    assert cards <= names  # every card ships, ...
    assert not any(n.startswith("random") and n.endswith(".safetensors") for n in names)  # ... seeded weights do not
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def _run_outside(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(installed), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_wheel_loads_backbones_by_name(installed, tmp_path, needs_fashion_mnist):
    code = (
        "import json, sys, vitssl_core\n"
        "from vitssl_core import list_pretrained, load_pretrained\n"
        "assert not any(p.startswith(sys.argv[1]) for p in sys.path if p), 'the repository is on sys.path'\n"
        "dino, card = load_pretrained('dino')\n"
        "rand, _ = load_pretrained('random')  # rebuilt from its seed: the wheel has no random weights\n"
        "print(json.dumps({'file': vitssl_core.__file__, 'version': vitssl_core.__version__, 'method': card['method'],"
        " 'names': [r['name'] for r in list_pretrained()], 'params': sum(p.numel() for p in rand.parameters())}))\n"
    )
    result = _run_outside(installed, tmp_path, "-c", code, str(REPO))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert Path(out["file"]).resolve().is_relative_to(installed.resolve()), out["file"]
    assert out["method"] == "dino" and {"dino", "mae", "random", "pixels"} <= set(out["names"])
    assert out["params"] > 1_000_000


def test_the_installed_cli_evaluates_a_shipped_name(installed, tmp_path, needs_fashion_mnist):
    result = _run_outside(
        installed,
        tmp_path,
        "-m",
        "vitssl_core",
        "evaluate",
        "--checkpoint",
        "dino",
        "--max-train",
        "2000",
        "--max-test",
        "500",
        "--out",
        "metrics.json",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # a trained DINO probed with 2000 labelled images: far above chance (10 %)
    assert metrics["protocol"] == "knn" and metrics["n_test"] == 500 and 70 < metrics["top1"] <= 100, metrics
    version = _run_outside(installed, tmp_path, "-m", "vitssl_core", "--version")
    assert version.returncode == 0 and version.stdout.startswith("vitssl 0.2.0 "), version.stdout + version.stderr
