"""Choose the fine-tuning crop on validation data: top-1 on held-out training images per crop scale.

    python benchmarks/finetune_crop.py                       # MAE card and random weights, 4 crops
    python benchmarks/finetune_crop.py --cards mae --epochs 2 --train 20000
    python benchmarks/finetune_crop.py --quick               # seconds: a smoke test

Every run fine-tunes under scripts/ship_checkpoint.py's FINETUNE protocol with only the crop
changed, on the first ``--train`` training images, and is scored on the LAST 10 000 training
images (never the test set), so the protocol that ships is not tuned on the numbers it reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from vitssl_core import vit_mini_28
from vitssl_core.pretrained import load_pretrained
from vitssl_core.data import NORMALIZE, load_fashion_mnist_tensors
from vitssl_core.probes import finetune

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = 10_000
CROPS = {"none": None, "0.8-1": (0.8, 1.0), "0.5-1": (0.5, 1.0), "0.25-1": (0.25, 1.0)}


def _protocol() -> dict:
    """ship_checkpoint.FINETUNE without its crop (the script is not a package, so load it by path)."""
    spec = importlib.util.spec_from_file_location("ship_checkpoint", ROOT / "scripts" / "ship_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {k: v for k, v in module.FINETUNE.items() if k != "crop_scale"}


def _backbone(card: str):
    if card == "random":
        torch.manual_seed(0)
        return vit_mini_28(), {k: list(v) for k, v in NORMALIZE["fashion_mnist"].items()}
    backbone, meta = load_pretrained(card)
    return backbone, meta["normalize"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", nargs="+", default=["mae", "random"], help="shipped card names or 'random'")
    parser.add_argument("--crops", nargs="+", default=list(CROPS), choices=list(CROPS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=30_000, help="training images used (from the start)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train, args.crops = 1, 256, ["none", "0.25-1"]
    x, y = load_fashion_mnist_tensors(train=True)
    n_val = 256 if args.quick else VALIDATION
    if args.train + n_val > len(x):
        parser.error(f"--train {args.train} + {n_val} validation images exceed the {len(x)} training images")
    train, val = (x[: args.train], y[: args.train]), (x[-n_val:], y[-n_val:])
    protocol = _protocol()
    print(
        f"card     crop     val top-1   seconds   ({args.epochs} epochs on {args.train} images, "
        f"validated on the last {n_val} training images)"
    )
    for card in args.cards:
        for crop in args.crops:
            backbone, normalize = _backbone(card)
            start = time.perf_counter()
            result = finetune(
                backbone,
                train,
                val,
                10,
                epochs=args.epochs,
                normalize=normalize,
                precision="fp32",
                seed=0,
                crop_scale=CROPS[crop],
                **protocol,
            )
            print(f"{card:8s} {crop:8s} {result['top1']:9.2f} {time.perf_counter() - start:9.0f}", flush=True)


if __name__ == "__main__":
    main()
