"""vitssl_core.pretrained: shipped backbones by name, the one resolution rule, the seeded baselines."""

import json
import shutil

import pytest
import torch

import vitssl_core
from vitssl_core import list_pretrained, load_pretrained, resolve_checkpoint
from vitssl_core.__main__ import main
from vitssl_core.checkpoint import load_backbone
from vitssl_core.pretrained import PRETRAINED


def test_a_name_resolves_to_the_card_shipped_inside_the_package():
    assert resolve_checkpoint("dino") == PRETRAINED / "dino.json"
    assert PRETRAINED.parent == __import__("pathlib").Path(vitssl_core.__file__).parent
    backbone, card = load_pretrained("dino")
    by_path, _ = load_pretrained(PRETRAINED / "dino.safetensors")
    assert card["name"] == "dino" and not backbone.training
    for a, b in zip(backbone.state_dict().values(), by_path.state_dict().values()):
        assert torch.equal(a, b)


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    # a folder called "dino" in the working directory is what the user means, not the shipped card
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dino").mkdir()
    assert resolve_checkpoint("dino") == tmp_path.joinpath("dino").relative_to(tmp_path)
    with pytest.raises(FileNotFoundError, match="no card"):
        load_pretrained("dino")  # the folder holds no card: the shipped one is not silently used instead
    shutil.copy(PRETRAINED / "mae.json", tmp_path / "mine.json")
    shutil.copy(PRETRAINED / "mae.safetensors", tmp_path / "mae.safetensors")  # the card names its weights
    _, card = load_pretrained("mine.json")
    assert card["name"] == "mae"


def test_unknown_names_and_missing_paths_say_what_exists():
    with pytest.raises(ValueError, match=r"'dinov9' is not a shipped backbone; shipped: .*dino.*mae"):
        load_pretrained("dinov9")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_checkpoint("runs/nothing")
    with pytest.raises(FileNotFoundError, match="no card backbone.json"):
        load_pretrained("runs/nothing/backbone.safetensors")
    with pytest.raises(TypeError, match="non-empty name or path"):
        resolve_checkpoint("")
    with pytest.raises(TypeError, match="non-empty name or path"):
        resolve_checkpoint(3)


def test_list_pretrained_describes_every_shipped_card():
    rows = {row["name"]: row for row in list_pretrained()}
    assert set(rows) == {p.stem for p in PRETRAINED.glob("*.json")}
    assert rows["dino"]["method"] == "dino" and rows["dino"]["grid"] == "4x4" and rows["dino"]["tokens"] == 16
    assert rows["pixels"]["weights"] is False and rows["pixels"]["grid"] is None
    card = json.loads((PRETRAINED / "simclr.json").read_text())
    assert rows["simclr"]["metrics"] == card["metrics"]


@pytest.mark.parametrize("name", sorted(p.stem for p in PRETRAINED.glob("random*.json")))
def test_a_seeded_baseline_is_rebuilt_bit_for_bit_without_its_file(tmp_path, name):
    # the wheel leaves random weights out; the card's seed rebuilds exactly the file the card measured
    card = json.loads((PRETRAINED / f"{name}.json").read_text())
    shutil.copy(PRETRAINED / f"{name}.json", tmp_path / f"{name}.json")
    torch.manual_seed(5)
    load_pretrained(PRETRAINED / f"{name}.json")
    after_file = torch.random.get_rng_state()
    torch.manual_seed(5)
    rebuilt, _ = load_pretrained(tmp_path / f"{name}.json")
    assert torch.equal(torch.random.get_rng_state(), after_file)  # the rebuild draws from its own stream
    shipped = load_backbone(PRETRAINED / card["weights"])
    state = rebuilt.state_dict()
    assert state.keys() == shipped.keys()
    assert all(torch.equal(state[k], shipped[k].float()) for k in shipped)
    card["tensor_sha256"] = "0" * 64  # a torch that initialises differently is refused, not loaded silently
    (tmp_path / f"{name}.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="do not match the card's tensor_sha256"):
        load_pretrained(tmp_path / f"{name}.json")


def test_cli_takes_a_name_and_refuses_an_unknown_one(capsys):
    code = main(["evaluate", "--checkpoint", "nope_not_shipped"])
    err = capsys.readouterr().err
    assert code == 2 and "not a shipped backbone; shipped:" in err and "dino" in err


def test_version_is_the_distributions(capsys):
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert vitssl_core.__version__ == pyproject["project"]["version"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith(f"vitssl {vitssl_core.__version__} ")


def test_compare_cards_pairs_two_cards_by_their_per_image_records(tmp_path):
    from vitssl_core import compare_cards

    cards = {n: json.loads((PRETRAINED / f"{n}.json").read_text()) for n in ("simclr", "pixels")}
    t = compare_cards("simclr", "pixels", "linear")
    # a_only - b_only is the difference in correct images, so it must agree with the two cards' accuracies
    assert t["difference"] == pytest.approx(
        cards["simclr"]["metrics"]["linear"] - cards["pixels"]["metrics"]["linear"], abs=0.011
    )
    assert t["p_value"] < 1e-6 and t["a_only"] > t["b_only"] > 0
    swapped = compare_cards(PRETRAINED / "pixels.json", "simclr", "linear")  # a path works as well as a name
    assert (swapped["a_only"], swapped["b_only"]) == (t["b_only"], t["a_only"])
    assert swapped["p_value"] == t["p_value"]
    with pytest.raises(ValueError, match="pixels.json keeps no per-image record for protocol='finetune'; it has: knn"):
        compare_cards("simclr", "pixels", "finetune")
    with pytest.raises(TypeError, match="protocol must be a string"):
        compare_cards("simclr", "pixels", 3)
    short = dict(cards["pixels"], protocols={"knn": {"n_test": 9_992}})
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(ValueError, match="scored on 10000 test images and short.json on 9992"):
        compare_cards("simclr", tmp_path / "short.json", "knn")
