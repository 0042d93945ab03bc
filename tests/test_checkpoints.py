"""The shipped checkpoints: every card is complete, every file loads, every kNN number is re-measured.

``checkpoints/NAME.json`` cards are written by ``scripts/ship_checkpoint.py``; the book's results
table is generated from them. Here each card's kNN accuracy is measured again on the full
Fashion-MNIST test set (10 000 images, the 60 000 training images as neighbours) and must agree
within 0.3 points, so no number in the table can drift from the weights that ship.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vitssl_core import ViT, load_pretrained
from vitssl_core.data import DatasetNotFoundError, load_fashion_mnist_tensors
from vitssl_core.evaluate import FEATURES, extract_features, knn_accuracy, pixel_features

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "checkpoints"
CARDS = sorted(FOLDER.glob("*.json"))
WEIGHTED = [c for c in CARDS if json.loads(c.read_text()).get("weights")]
METRICS = ("knn", "linear", "finetune", "label_1pct", "label_10pct")
MB = 1024 * 1024
TOLERANCE = 0.3  # points of top-1 accuracy


def _card(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_recipe_and_baseline_is_shipped():
    recipes = {p.stem for p in (ROOT / "configs" / "results").glob("*.yaml")}
    assert recipes, "configs/results/ holds no recipes"
    assert {c.stem for c in CARDS} == recipes | {"random", "pixels"}


def test_sizes_within_budget():
    sizes = {p.name: p.stat().st_size for p in FOLDER.glob("*.safetensors")}
    assert sizes and all(size <= 8 * MB for size in sizes.values()), sizes
    assert sum(sizes.values()) <= 40 * MB


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_card_is_complete(path):
    card = _card(path)
    for key in ("name", "method", "feature", "normalize", "metrics", "recipe", "command", "code_revision",
                "eval_hardware"):
        assert key in card, f"{path.name} lacks {key!r}"
    assert card["name"] == path.stem
    assert set(card["metrics"]) == set(METRICS)
    for key, value in card["metrics"].items():
        assert value is None or 0 < value <= 100, (key, value)
    if card["weights"] is None:
        assert card["feature"] == "pixels" and card["metrics"]["finetune"] is None
        return
    assert card["feature"] in FEATURES
    assert all(card["metrics"][key] is not None for key in METRICS)
    assert set(card["normalize"]) == {"mean", "std"} and len(card["normalize"]["mean"]) == card["model"]["in_chans"]
    assert {"seed", "train_hardware", "train_wall_seconds", "sha256", "parameters"} <= set(card)
    if card["method"] != "random":  # trained: the recipe and its wall time are on record
        assert (ROOT / card["recipe"]).is_file() and card["command"].endswith(card["recipe"])
        assert card["train_wall_seconds"] > 0 and card["steps"] > 0


@pytest.mark.parametrize("path", WEIGHTED, ids=lambda p: p.stem)
def test_weights_are_plain_timm_keys_in_half_precision(path):
    card = _card(path)
    weights = FOLDER / card["weights"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["sha256"]
    with safe_open(weights, framework="pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    expected = ViT(**card["model"]).state_dict()
    assert keys == set(expected)  # no "backbone." prefix, nothing missing, nothing extra
    assert dtypes == {"F16"}
    backbone, loaded_card = load_pretrained(weights)
    assert loaded_card == card and not backbone.training
    assert sum(p.numel() for p in backbone.parameters()) == card["parameters"]


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        return load_fashion_mnist_tensors(train=True), load_fashion_mnist_tensors(train=False)
    except DatasetNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture
def two_threads():
    """Feature extraction of 70 000 images is the one place in the tests where a second thread pays."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_knn_accuracy_matches_card(path, fashion_mnist, two_threads):
    (x_train, y_train), (x_test, y_test) = fashion_mnist
    card = _card(path)
    knn = card.get("protocols", {}).get("knn", {"k": 20, "temperature": 0.07})
    if card["weights"] is None:
        f_train, f_test = pixel_features(x_train), pixel_features(x_test)
    else:
        backbone, _ = load_pretrained(path)
        kwargs = dict(feature=card["feature"], normalize=card["normalize"], precision="fp32", batch_size=1000)
        f_train, f_test = extract_features(backbone, x_train, **kwargs), extract_features(backbone, x_test, **kwargs)
    measured = knn_accuracy(f_train, y_train, f_test, y_test, k=knn["k"], temperature=knn["temperature"])
    assert abs(measured - card["metrics"]["knn"]) <= TOLERANCE, (
        f"{path.name}: kNN top-1 measured {measured:.2f} %, card says {card['metrics']['knn']:.2f} %")
