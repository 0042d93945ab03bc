"""The shipped backbones: find one by name, list them, load one with its card.

Every backbone the book evaluates ships inside the package, in ``vitssl_core/pretrained/``, as
``NAME.safetensors`` (float16 weights, timm key names) beside its card ``NAME.json``, which says
how to rebuild the ViT (``"model"``: its keyword arguments), how to feed it (``"normalize"``),
what it scored and how it was trained. They ship wherever the package is installed, so after
``pip install`` one line loads one, as timm's ``create_model(..., pretrained=True)`` does::

    backbone, card = load_pretrained("dino")      # eval mode, float32, on the CPU
    list_pretrained()                             # every name, its method, grid and metrics

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
from .vit import ViT

__all__ = ["PRETRAINED", "list_pretrained", "load_pretrained", "resolve_checkpoint", "tensor_digest"]

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
    path = resolve_checkpoint(path)
    card_path = path if path.suffix == ".json" else path.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no card {card_path.name} (a NAME.json beside NAME.safetensors)")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{card_path} is not valid JSON ({err}); a card is a JSON object") from err
    model = None
    if isinstance(card, dict):  # a shipped card's "model", or the "architecture" of `vitssl pretrain`'s backbone.json
        model = card.get("model") if isinstance(card.get("model"), dict) else card.get("architecture")
    if not isinstance(model, dict):
        baseline = isinstance(card, dict) and "weights" in card and card["weights"] is None
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
