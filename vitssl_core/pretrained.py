"""The shipped backbones: find one by name, list them, load one with its card.

Every backbone the book evaluates ships inside the package, in ``vitssl_core/pretrained/``, as
``NAME.safetensors`` (float16 weights, timm key names) beside its card ``NAME.json``, which says
how to rebuild the ViT (``"model"``: its keyword arguments), how to feed it (``"normalize"``),
what it scored and how it was trained. They ship wherever the package is installed, so after
``pip install`` one line loads one, as timm's ``create_model(..., pretrained=True)`` does::

    backbone, card = load_pretrained("dino")      # eval mode, float32, on the CPU
    list_pretrained()                             # every name, its method, grid and metrics
    compare_cards("simclr", "mae", "finetune")    # McNemar's test from the cards' per-image records

**How a checkpoint argument is resolved** (``resolve_checkpoint``; ``load_pretrained`` and every
``vitssl ... --checkpoint`` go through it):

1. a path that exists wins, and so does any path ending in ``.json`` or ``.safetensors``: a card
   ``NAME.json``, its ``NAME.safetensors``, or (for the CLI) a ``vitssl pretrain`` folder;
2. otherwise a plain name (letters, digits, ``_`` and ``-``) is a shipped card,
   ``vitssl_core/pretrained/NAME.json``;
3. otherwise it is an error: a missing path raises ``FileNotFoundError``, an unknown name
   ``ValueError`` listing the names shipped.

The untrained baselines (``random``, ``random_p4``) are not stored in the wheel: their cards
record the seed, and ``load_pretrained`` rebuilds the weights from it and checks them against
the card's ``tensor_sha256`` (``tensor_digest``), so what loads is bit for bit what the card measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_backbone
from .paired import correct_from_hex, mcnemar
from .vit import ViT

__all__ = ["PRETRAINED", "compare_cards", "list_pretrained", "load_pretrained", "resolve_checkpoint", "tensor_digest"]

PRETRAINED = Path(__file__).resolve().parent / "pretrained"  # the shipped cards and weights
_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def _shipped_names() -> list[str]:
    return sorted(p.stem for p in PRETRAINED.glob("*.json")) if PRETRAINED.is_dir() else []


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    """The path a checkpoint argument means: an existing path (or a ``.json``/``.safetensors`` one) as given,
    else a shipped card.

    Raises ``TypeError`` for a non-string, ``FileNotFoundError`` for a path that does not exist,
    and ``ValueError`` for a name that is not shipped (the message lists the shipped names).
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise TypeError(f"checkpoint must be a non-empty name or path, got {name!r}")
    path = Path(name)
    if path.exists() or path.suffix in (".json", ".safetensors"):
        return path  # a card or weights file: the loader says which half is missing, if one is
    if isinstance(name, str) and _NAME.fullmatch(name):
        card = PRETRAINED / f"{name}.json"
        if card.is_file():
            return card
        raise ValueError(f"checkpoint={name!r} is not a shipped backbone; shipped: {', '.join(_shipped_names())}")
    raise FileNotFoundError(
        f"checkpoint={str(name)!r}: no such file or folder; give a path to NAME.json / NAME.safetensors "
        f"or a shipped name ({', '.join(_shipped_names())})"
    )


def list_pretrained() -> list[dict[str, Any]]:
    """One row per shipped card: name, method, grid (patches per side), tokens, weights and metrics.

    ``weights`` is False for a card that describes a baseline without weights (``pixels``).
    """
    rows = []
    for name in _shipped_names():
        card = json.loads((PRETRAINED / f"{name}.json").read_text())
        model = card.get("model") or {}
        side = model["img_size"] // model["patch_size"] if model else None
        rows.append(
            {
                "name": name,
                "method": card.get("method"),
                "grid": f"{side}x{side}" if side else None,
                "tokens": side * side if side else None,
                "weights": card.get("weights") is not None,
                "metrics": dict(card.get("metrics") or {}),
            }
        )
    return rows


def _read_card(checkpoint: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    path = resolve_checkpoint(checkpoint)
    card_path = path if path.suffix == ".json" else path.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(
            f"checkpoint={str(checkpoint)!r}: no card {card_path.name} (a NAME.json beside NAME.safetensors)"
        )
    try:
        card = json.loads(card_path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{card_path} is not valid JSON ({err}); a card is a JSON object") from err
    if not isinstance(card, dict):
        raise ValueError(f"{card_path}: a card is a JSON object, got {type(card).__name__}")
    return card_path, card


def compare_cards(a: str | os.PathLike, b: str | os.PathLike, protocol: str) -> dict[str, float]:
    """McNemar's test of card ``a`` against card ``b`` under one protocol, from the per-image records the cards keep.

    ``a``, ``b``: shipped names or card paths (``resolve_checkpoint``); ``protocol``: a key both
    cards hold in ``"correct"`` (``knn``, ``linear``, ``label_1pct``, ``label_10pct``, ``finetune``).
    Nothing is re-run. Returns ``mcnemar``'s dict: ``difference`` is A − B in points.
    Raises ``ValueError`` when a card keeps no record for ``protocol`` or the two cards were scored
    on test sets of different sizes.
    """
    if not isinstance(protocol, str):
        raise TypeError(f"protocol must be a string such as 'knn', got {type(protocol).__name__}")
    records = []
    for checkpoint in (a, b):
        card_path, card = _read_card(checkpoint)
        correct = card.get("correct") or {}
        if protocol not in correct:
            raise ValueError(
                f"{card_path.name} keeps no per-image record for protocol={protocol!r}; "
                f"it has: {', '.join(sorted(correct)) or 'none (a card written before per-image records)'}"
            )
        n_test = ((card.get("protocols") or {}).get("knn") or {}).get("n_test")
        records.append(
            (card_path.name, correct[protocol], n_test if isinstance(n_test, int) else 4 * len(correct[protocol]))
        )
    (name_a, hex_a, n_a), (name_b, hex_b, n_b) = records
    if n_a != n_b:
        raise ValueError(f"{name_a} was scored on {n_a} test images and {name_b} on {n_b}: not a paired comparison")
    return mcnemar(correct_from_hex(hex_a, n_a), correct_from_hex(hex_b, n_b))


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: equal digests, equal tensors.

    Unlike a hash of the file, it does not depend on how a safetensors version orders its header.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _rebuild_from_seed(card: dict, card_path: Path) -> dict[str, torch.Tensor]:
    """The float16 state dict of an untrained baseline, rebuilt from its card's seed and checked."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(int(card["seed"]))
        backbone = ViT(**card["model"])
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in backbone.state_dict().items()}
    if tensor_digest(tensors) != card.get("tensor_sha256"):
        raise ValueError(
            f"{card_path}: the weights rebuilt from seed {card['seed']} do not match the card's tensor_sha256 "
            f"(torch {torch.__version__} may initialise differently from the torch that wrote the card, "
            f"{card.get('torch_version')}); put {card['weights']} beside the card"
        )
    return tensors


def load_pretrained(path: str | os.PathLike) -> tuple[ViT, dict[str, Any]]:
    """(backbone in eval mode, float32 on CPU; its card) from a shipped name, ``NAME.json`` or ``NAME.safetensors``.

    The card is the JSON file beside the weights; its ``"model"`` holds the ``ViT`` keyword
    arguments (``"architecture"`` in the ``backbone.json`` that ``vitssl pretrain`` writes, which
    is read too), ``"feature"`` what probes read ("cls", "avg" or "cls+avg"), ``"normalize"`` the
    mean and std applied to pixels in [0, 1], and ``"metrics"`` what the backbone scored. Names
    resolve as ``resolve_checkpoint`` says.
    """
    card_path, card = _read_card(path)
    # a shipped card's "model", or the "architecture" of `vitssl pretrain`'s backbone.json
    model = card.get("model") if isinstance(card.get("model"), dict) else card.get("architecture")
    if not isinstance(model, dict):
        baseline = "weights" in card and card["weights"] is None
        raise ValueError(
            f'{card_path}: the card has no "model" mapping of ViT keyword arguments '
            '(nor the "architecture" of a backbone.json from vitssl pretrain)'
            + (
                f"; it describes a baseline without weights (method {card.get('method')!r}), nothing to load"
                if baseline
                else ""
            )
        )
    weights = card_path.with_name(card.get("weights") or card_path.with_suffix(".safetensors").name)
    seeded = card.get("method") == "random" and isinstance(card.get("seed"), int)
    if not weights.is_file() and not seeded:
        raise FileNotFoundError(
            f"{card_path}: its weights {weights.name} are missing (the card describes a baseline without weights?)"
        )
    try:
        backbone = ViT(**model)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{card_path}: its ViT keyword arguments {model} do not build a ViT ({err})") from err
    state = load_backbone(weights) if weights.is_file() else _rebuild_from_seed(card, card_path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:  # torch lists every key; its first complaint says enough
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ValueError(f"{weights} does not fit the ViT its card {card_path.name} describes: {first[:300]}") from err
    return backbone.eval(), card
