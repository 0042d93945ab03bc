"""The shipped checkpoints: every card is complete, every file loads, every kNN number is re-measured.

``vitssl_core/pretrained/NAME.json`` cards are written by ``scripts/ship_checkpoint.py``; the book's results
table is generated from them. Here each card's kNN accuracy is measured again on the full
Fashion-MNIST test set (10 000 images, the 60 000 training images as neighbours) and must agree
within 0.3 points, and the linear probe of the best card within 0.5, so no number in the table
can drift from the weights that ship. The per-image correctness a card keeps for paired tests
must add up to its metrics, and MAE's shipped decoder must rebuild images with its encoder.
"""

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from vitssl_core import ViT, load_pretrained
from vitssl_core.data import load_fashion_mnist_tensors
from vitssl_core.features import extract_features, FEATURES, knn_accuracy, pixel_features
from vitssl_core.paired import correct_from_hex
from vitssl_core.probes import linear_probe
from vitssl_core.mae import MAE, decoder_state_dict
from vitssl_core.pretrained import PRETRAINED

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ship_checkpoint", ROOT / "scripts" / "ship_checkpoint.py")
ship_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ship_checkpoint)
recipe_changes = ship_checkpoint.recipe_changes  # one rule for the script that writes a card and the guard here
FOLDER = PRETRAINED  # the cards shipped inside the package
CARDS = sorted(FOLDER.glob("*.json"))
WEIGHTED = [c for c in CARDS if json.loads(c.read_text()).get("weights")]
METRICS = ("knn", "linear", "finetune", "label_1pct", "label_10pct")
MB = 1024 * 1024
TOLERANCE = 0.3  # points of top-1 accuracy
LINEAR_TOLERANCE = 0.5  # the probe trains for 100 epochs: a little more run-to-run spread than kNN


def _card(path: Path) -> dict:
    return json.loads(path.read_text())


# Recipes settled but not yet shipped: their runs take several sessions of CPU time (or one GPU
# session), queued or in training, each carried between machines on branch runs/NAME
# (scripts/carry_run.sh) until it finishes and ships. A name leaves this set when its card ships.
IN_TRAINING: set[str] = set()


def test_every_recipe_and_baseline_is_shipped():
    recipes = {p.stem for p in (ROOT / "configs" / "results").glob("*.yaml")}
    assert recipes, "configs/results/ holds no recipes"
    cards = {c.stem for c in CARDS}
    assert IN_TRAINING <= recipes and not IN_TRAINING & cards, "a shipped recipe must leave IN_TRAINING"
    assert cards == (recipes - IN_TRAINING) | {"random", "random_p4", "pixels"}  # baselines: no recipe


TRAINED = [c for c in CARDS if _card(c)["method"] not in ("random", "pixels")]


@pytest.mark.parametrize("path", TRAINED, ids=lambda p: p.stem)
def test_card_was_trained_with_todays_recipe(path):
    # Every trained card must come from the recipe its file in configs/results/ holds today: edit a
    # recipe (epochs, learning rate, a method argument...) and this fails until the run is redone
    # and shipped. Recipes still in training (IN_TRAINING) have no card and are not checked.
    card = _card(path)
    recipe_path = ROOT / "configs" / "results" / f"{path.stem}.yaml"
    assert card["recipe"] == recipe_path.relative_to(ROOT).as_posix(), card["recipe"]
    recipe = yaml.safe_load(recipe_path.read_text())
    assert recipe["method"] == card["method"], (recipe["method"], card["method"])
    assert recipe_changes(card, recipe) == {}, f"{path.stem}: trained with an earlier recipe"
    assert not card.get("recipe_changes"), f"{path.stem}: the run overrode its recipe: {card['recipe_changes']}"
    # the model: the card's build has the recipe's patch size (7 unless the recipe says otherwise), and a
    # card that records its model arguments (every card shipped since they were) has exactly the recipe's
    assert card["model"]["patch_size"] == (recipe.get("model_args") or {}).get("patch_size", 7), path.stem
    if card.get("model_args") is not None:
        assert (card["model_args"] or {}) == (recipe.get("model_args") or {}), (card["model_args"], recipe)


def test_recipe_changes_names_what_changed():
    card = _card(FOLDER / "simclr.json")
    recipe = yaml.safe_load((ROOT / "configs" / "results" / "simclr.yaml").read_text())
    assert recipe_changes(card, recipe) == {}
    edited = {
        **recipe,
        "epochs": card["train_config"]["epochs"] + 1,
        "warmup_epochs": 99,
        "brand_new": 1,
        "log_every": 1,
        "method_args": {**(recipe.get("method_args") or {}), "temperature": 0.123},
    }
    assert recipe_changes(card, edited) == {
        "brand_new": [1, None],
        "epochs": [card["train_config"]["epochs"] + 1, card["train_config"]["epochs"]],
        "temperature": [0.123, card["method_args"]["temperature"]],
        "warmup_epochs": [99, card["train_config"]["warmup_epochs"]],
    }
    other = {**recipe, "method": "mocov3", "model_args": {"patch_size": 4}}
    assert list(recipe_changes({**card, "model_args": {}}, other)) == ["method", "model_args"]
    assert "model_args" not in recipe_changes({**card, "model_args": None}, other)  # not recorded: not compared


def test_sizes_within_budget():
    sizes = {p.name: p.stat().st_size for p in FOLDER.glob("*.safetensors")}
    assert sizes and all(size <= 8 * MB for size in sizes.values()), sizes
    assert sum(sizes.values()) <= 40 * MB


def test_fine_tuning_column_holds_one_protocol():
    # "pre-training helps" is only measured at equal budget: every fine-tuned row, random weights
    # and the supervised baseline included, went through the same recipe for the same epochs.
    cards = {c.stem: _card(c) for c in CARDS}
    protocols = {n: c["protocols"]["finetune"] for n, c in cards.items() if c["metrics"]["finetune"] is not None}
    # the one exception, marked in the results table: a supervised run scored by its own classifier
    # (ship_checkpoint.py --own-head), trained end to end from scratch, with nothing to fine-tune from
    own = {n for n, p in protocols.items() if p.get("own_head")}
    assert all(cards[n]["method"] == "supervised" and protocols[n]["epochs"] >= 10 for n in own), own
    protocols = {n: p for n, p in protocols.items() if n not in own}
    assert {"random", "supervised"} <= set(protocols), sorted(protocols)
    first = next(iter(protocols.values()))
    assert all(p == first for p in protocols.values()), protocols


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_card_is_complete(path):
    card = _card(path)
    for key in (
        "name",
        "method",
        "feature",
        "normalize",
        "metrics",
        "recipe",
        "command",
        "code_revision",
        "eval_hardware",
    ):
        assert key in card, f"{path.name} lacks {key!r}"
    assert card["name"] == path.stem
    assert set(card["metrics"]) == set(METRICS)
    # Each number with a per-image record (for paired tests) must be that record's share of right
    # answers; kNN is also measured again from the weights below (test_knn_accuracy_matches_card).
    for key, bits in card.get("correct", {}).items():
        hits = correct_from_hex(bits, 10_000)
        assert abs(100 * hits.float().mean().item() - card["metrics"][key]) < 0.006, (path.name, key)
    if card["weights"] is None:
        assert card["feature"] == "pixels" and card["metrics"]["finetune"] is None
        return
    assert card["feature"] in FEATURES
    # finetune is None on a card not yet fine-tuned under today's protocol (one protocol per column)
    assert all(card["metrics"][key] is not None for key in METRICS if key != "finetune")
    if card["metrics"]["finetune"] is not None:
        assert card["protocols"]["finetune"]["epochs"] >= 10 and "finetune" in card["correct"]
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


def test_mae_decoder_ships_with_official_key_names():
    cards = [_card(c) for c in CARDS if _card(c).get("decoder")]
    assert cards, "no card ships a decoder: the MAE card must (mae_decoder.safetensors)"
    for card in cards:
        decoder = FOLDER / card["decoder"]["weights"]
        assert hashlib.sha256(decoder.read_bytes()).hexdigest() == card["decoder"]["sha256"]
        args = {k: v for k, v in card["method_args"].items() if k.startswith("decoder_")}
        mae = MAE(ViT(**card["model"]), **args, init_encoder=False)
        expected = set(decoder_state_dict(mae.state_dict()))
        with safe_open(decoder, framework="pt") as f:
            assert set(f.keys()) == expected
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


@pytest.fixture(scope="module")
def fashion_mnist(needs_fashion_mnist):
    return load_fashion_mnist_tensors(train=True, download=False), load_fashion_mnist_tensors(
        train=False, download=False
    )


@pytest.fixture
def two_threads():
    """Feature extraction of 70 000 images is the one place in the tests where a second thread pays,
    unless pytest-xdist already runs a worker per core (then a second thread would only wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


def _features(path: Path, fashion_mnist, n_train: int | None = None, n_test: int | None = None):
    """(train, test) features of a card: its pixels or its backbone's chosen feature (the first n of each split)."""
    (x_train, _), (x_test, _) = fashion_mnist
    x_train, x_test = x_train[:n_train], x_test[:n_test]
    card = _card(path)
    if card["weights"] is None:
        return pixel_features(x_train), pixel_features(x_test)
    backbone, _ = load_pretrained(path)
    kwargs = dict(feature=card["feature"], normalize=card["normalize"], precision="fp32", batch_size=1000)
    return extract_features(backbone, x_train, **kwargs), extract_features(backbone, x_test, **kwargs)


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_knn_accuracy_matches_card(path, fashion_mnist, two_threads):
    (_, y_train), (_, y_test) = fashion_mnist
    card = _card(path)
    if "knn_check" in card:  # a 49-token card: its stored subset kNN, a third of the images to embed
        check = card["knn_check"]
        n_train, n_test, claimed = check["n_train"], check["n_test"], check["top1"]
        knn = {"k": check["k"], "temperature": check["temperature"]}
    else:
        n_train, n_test, claimed = None, None, card["metrics"]["knn"]
        knn = card.get("protocols", {}).get("knn", {"k": 20, "temperature": 0.07})
    f_train, f_test = _features(path, fashion_mnist, n_train, n_test)
    y_train, y_test = y_train[:n_train], y_test[:n_test]
    measured = knn_accuracy(f_train, y_train, f_test, y_test, k=knn["k"], temperature=knn["temperature"])
    assert abs(measured - claimed) <= TOLERANCE, (
        f"{path.name}: kNN top-1 measured {measured:.2f} %, card says {claimed:.2f} %"
    )


def test_cards_with_many_tokens_store_a_subset_check():
    # a 49-token card costs 3x to embed: CI re-measures it on a stored subset (the first 20 000 / 5 000)
    for path in WEIGHTED:
        card = _card(path)
        tokens = (card["model"]["img_size"] // card["model"]["patch_size"]) ** 2
        assert ("knn_check" in card) == (tokens > 16), path.name


def test_linear_probe_of_the_best_card_matches(fashion_mnist, two_threads):
    (_, y_train), (_, y_test) = fashion_mnist
    best = max(WEIGHTED, key=lambda p: _card(p)["metrics"]["linear"])
    f_train, f_test = _features(best, fashion_mnist)
    measured = linear_probe(f_train, y_train, f_test, y_test)["top1"]
    claimed = _card(best)["metrics"]["linear"]
    assert abs(measured - claimed) <= LINEAR_TOLERANCE, (
        f"{best.name}: linear probe top-1 measured {measured:.2f} %, card says {claimed:.2f} %"
    )
