"""Evaluate a trained backbone on all of Fashion-MNIST and ship it in the package as
vitssl_core/pretrained/NAME.{safetensors,json} (loaded by name: ``load_pretrained("NAME")``).

    python scripts/ship_checkpoint.py runs/results/simclr --name simclr   # a `vitssl pretrain` --out folder
    python scripts/ship_checkpoint.py runs/dino --name dino_gpu --recipe configs/gpu/dino.yaml --out cards/
    python scripts/ship_checkpoint.py --random --name random              # the untrained baseline (seed 0)
    python scripts/ship_checkpoint.py --pixels --name pixels              # raw pixels: a card, no weights
    python scripts/ship_checkpoint.py --remeasure vitssl_core/pretrained/dino.json --name dino   # today's protocols

The weights are stored in float16 and every metric is measured on the float16 weights read back,
so the card describes exactly the file that ships. The protocols (all top-1 % on the 10 000 test
images; the training split's 60 000 images give the features and labels):

- feature: "cls", "avg" or "cls+avg", whichever gives the best kNN accuracy when the last 10 000
  training images are classified by the first 50 000 (the test set plays no part in the choice);
- knn: weighted cosine kNN, k=20, T=0.07 (DINO's protocol), on the chosen feature;
- linear: a linear classifier on the standardised frozen feature (MAE's probe), 100 epochs AdamW;
- label_1pct / label_10pct: the same probe trained on a class-balanced 1 % / 10 % of the labels
  (seed 0); for the `supervised` baseline, instead, a ViT trained from scratch end to end on
  that 1 % / 10 % (what the labels alone buy);
- finetune: the whole network trained end to end on all labels under one protocol for every row
  (FINETUNE below: layer decay 0.75, drop path 0.1, label smoothing, --finetune-epochs epochs);
  with ``--own-head``, for a supervised run, instead the run's own classifier on the shipped backbone:
  a network trained end to end on all labels from scratch, which has nothing to be fine-tuned from.

The card also keeps, per protocol, which test images were classified right (``correct``: hex
bits, ``vitssl_core.paired.correct_from_hex``), so two rows are compared with a paired test
(``mcnemar``) on the same 10 000 images. A card also records the recipe and command, seed, git
revision, torch version, the wall time and hardware of every resumed training segment, and the
evaluation's. tests/test_checkpoints.py re-measures every card's kNN in CI.
For a trained MAE the decoder ships too, as NAME_decoder.safetensors (MAE's key names), so two MAE
cards never share a decoder file. ``--remeasure vitssl_core/pretrained/NAME.json`` measures a shipped card again under today's protocols.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from vitssl_core import vit_mini_28
from vitssl_core.checkpoint import (
    atomic_write_json,
    latest_checkpoint,
    load_backbone,
    load_checkpoint,
    save_backbone,
)
from vitssl_core.data import NORMALIZE, load_fashion_mnist_tensors
from vitssl_core.features import (
    choose_feature_from,
    eval_mode,
    extract_features,
    feature_view,
    image_batches,
    knn_classify,
    pixel_features,
    prepare_images,
)
from vitssl_core.paired import correct_to_hex
from vitssl_core.probes import class_balanced_subset, finetune, linear_probe
from vitssl_core.mae import decoder_state_dict
from vitssl_core.pretrained import PRETRAINED, load_pretrained, tensor_digest
from vitssl_core.recipes import dino_local_size
from vitssl_core.runtime import hardware
from vitssl_core.supervised import Supervised, head_state_dict
from vitssl_core.train import CHECKPOINT_DIR
from vitssl_core.vit import ViT, architecture

ROOT = Path(__file__).resolve().parents[1]
KNN = dict(k=20, temperature=0.07)
FRACTIONS = (0.01, 0.1)
VALIDATION = 10_000  # the last images of the training split, for choosing the feature
SCRATCH_EPOCHS = {0.01: 100, 0.1: 20}  # from-scratch training on a label fraction: about 60k and 120k images seen
# One fine-tuning protocol for every row (MAE/BEiT's recipe at CPU scale): layer decay 0.75, drop
# path 0.1, label smoothing 0.1, AdamW lr 5e-4 for a batch of 128, one warm-up epoch, cosine.
# Only the number of epochs is an option. No random resized crop or flip: chosen on validation
# data (benchmarks/finetune_crop.py, 3 epochs on 20 000 training images, scored on the last
# 10 000), every crop tried cost accuracy on these centred 28-pixel images, and more the
# stronger it was: MAE 87.2 % without, 84.8 % with 80-100 % of the area, 82.8 % with 50-100 %;
# random weights 80.2 % without, 74.0 % with 80-100 %.
FINETUNE = dict(
    lr=5e-4, layer_decay=0.75, drop_path=0.1, label_smoothing=0.1, crop_scale=None, warmup_epochs=1, batch_size=128
)

# the entry of a card's "protocols" that describes how each metric was measured
PROTOCOL_OF = {
    "knn": "knn",
    "linear": "linear",
    "finetune": "finetune",
    "label_1pct": "label_fractions",
    "label_10pct": "label_fractions",
}


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("+uncommitted changes" if dirty else "")


def _wall_seconds(run: Path) -> float | None:
    file = run / "wall_seconds.txt"
    if not file.is_file():
        return None
    return float(sum(float(line) for line in file.read_text().split()))


def _feature_choice(f_train: torch.Tensor, y_train: torch.Tensor) -> tuple[str, dict[str, float]]:
    """The feature with the best kNN accuracy on the last VALIDATION training images, and all the scores."""
    n_val = min(VALIDATION, len(f_train) // 5)  # VALIDATION on the full training split
    return choose_feature_from(f_train, y_train, n_val, **KNN)


KNN_CHECK = (20_000, 5_000)  # the first training / test images of the subset re-measure


def _knn_check(f_train, y_train, f_test, y_test) -> dict:
    """The kNN top-1 % on the first KNN_CHECK images of each split: what tests/test_checkpoints.py
    measures again for a card whose full re-measure would cost CI too much time."""
    n_train, n_test = min(KNN_CHECK[0], len(f_train)), min(KNN_CHECK[1], len(f_test))  # --quick has fewer
    preds, _ = knn_classify(f_train[:n_train], y_train[:n_train], f_test[:n_test], **KNN)
    top1 = 100.0 * (preds == y_test[:n_test]).float().mean().item()
    return {"n_train": n_train, "n_test": n_test, **KNN, "top1": round(top1, 2)}


def _probe_metrics(f_train, y_train, f_test, y_test) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(top-1 % per protocol, per-image correctness per protocol) of the frozen-feature probes."""
    preds, _ = knn_classify(f_train, y_train, f_test, **KNN)
    correct = {
        "knn": preds == y_test,
        "linear": linear_probe(f_train, y_train, f_test, y_test, return_correct=True)["correct"],
    }
    for fraction, key in zip(FRACTIONS, ("label_1pct", "label_10pct")):
        idx = class_balanced_subset(y_train, fraction=fraction, seed=0)  # what label_efficiency(seed=0) probes
        correct[key] = linear_probe(f_train[idx], y_train[idx], f_test, y_test, seed=0, return_correct=True)["correct"]
    return {k: 100.0 * c.float().mean().item() for k, c in correct.items()}, correct


def _scratch_on_fractions(model: dict, x_train, y_train, x_test, y_test, normalize) -> dict[str, torch.Tensor]:
    """Per-image correctness of a ViT trained from scratch (seed 0) on class-balanced 1 % and 10 % of the labels."""
    out = {}
    for fraction, key in zip(FRACTIONS, ("label_1pct", "label_10pct")):
        idx = class_balanced_subset(y_train, fraction=fraction, seed=0)
        torch.manual_seed(0)
        scratch = ViT(**{**model, "num_classes": 0})
        out[key] = finetune(
            scratch,
            (x_train[idx], y_train[idx]),
            (x_test, y_test),
            10,
            epochs=SCRATCH_EPOCHS[fraction],
            lr=1e-3,
            layer_decay=1.0,
            warmup_epochs=5,
            normalize=normalize,
            precision="fp32",
            seed=0,
            return_correct=True,
        )["correct"]
    return out


def _finetune(backbone, x_train, y_train, x_test, y_test, normalize, epochs: int) -> torch.Tensor:
    """Per-image correctness after FINETUNE fine-tuning for ``epochs`` epochs (the same for every row)."""
    return finetune(
        backbone,
        (x_train, y_train),
        (x_test, y_test),
        10,
        epochs=epochs,
        normalize=normalize,
        precision="fp32",
        seed=0,
        return_correct=True,
        **FINETUNE,
    )["correct"]


def _own_head(run: Path, run_card: dict, backbone: ViT, x_test, y_test, normalize) -> torch.Tensor:
    """Per-image correctness of a supervised run's own classifier, read on the shipped backbone: the head of
    the run's head.safetensors (scripts/pack_run.py) or of its newest checkpoint, which must be the step
    the backbone was exported at."""
    if (run / "head.safetensors").is_file():
        head = load_file(str(run / "head.safetensors"))
    else:
        latest = latest_checkpoint(run / CHECKPOINT_DIR)
        if latest is None:
            raise SystemExit(f"--own-head: {run} has neither head.safetensors nor a checkpoint holding the classifier")
        weights, state = load_checkpoint(latest)
        if state["step"] != run_card.get("steps"):
            raise SystemExit(
                f"--own-head: the newest checkpoint is step {state['step']}, the backbone step {run_card.get('steps')}"
            )
        head = head_state_dict(weights)
    model = Supervised(backbone, num_classes=head["weight"].shape[0])  # the module's own forward, not a copy
    model.head.load_state_dict({k: v.float() for k, v in head.items()})
    hits = []
    with eval_mode(model), torch.no_grad():
        for x in image_batches(x_test, 1000):
            hits.append(model(prepare_images(x, torch.device("cpu"), normalize)).argmax(1))
    return torch.cat(hits) == y_test


# Settings of a recipe that say where and how a run logs or which arithmetic it uses, not what it
# learns (and the kNN monitor's settings: what a run watches).
RECIPE_IGNORED = {"out", "progress", "checkpoint_every", "log_every", "precision", "knn_every", "knn_val", "knn_train"}
RECIPE_OTHER = {"method", "dataset", "model", "method_args", "model_args"}  # compared below, or not per run


def recipe_changes(record: dict, recipe: dict) -> dict[str, list]:
    """The settings ``recipe`` (a parsed recipe YAML) sets otherwise than the run ``record`` (a card or a
    run's backbone.json): {setting: [the recipe's value, the run's]}, sorted by name.

    A training setting the record lacks counts as changed (the code of the time had no such setting).
    ``method_args`` are compared one by one; ``model_args`` as a whole, where the record has them
    (cards from before they were recorded do not).
    """
    train = record.get("train_config") or {}
    ran = {**train, "lr": train.get("blr"), **(record.get("method_args") or {})}
    wanted = {k: v for k, v in recipe.items() if k not in RECIPE_IGNORED | RECIPE_OTHER}
    wanted.update(recipe.get("method_args") or {})
    changes = {k: [v, ran.get(k)] for k, v in wanted.items() if k not in ran or ran[k] != v}
    if recipe.get("method") != record.get("method"):
        changes["method"] = [recipe.get("method"), record.get("method")]
    if record.get("model_args") is not None and (recipe.get("model_args") or {}) != record["model_args"]:
        changes["model_args"] = [recipe.get("model_args") or {}, record["model_args"]]
    return dict(sorted(changes.items()))


def _recipe_of(run: Path, run_card: dict, given: str | None) -> tuple[str | None, dict[str, list]]:
    """The recipe a run was trained from, as its card names it, and what the run changed from it.

    ``given`` is --recipe: a YAML (recorded with whatever the run changed from it, say a smoke test's
    batch size), or "none". Without it, configs/results/RUN.yaml (RUN: the run folder's name) is the
    recipe when that file exists and describes the run exactly; one that exists and does not (a GPU
    pack unpacked to runs/dino is not configs/results/dino.yaml) is an error, never a wrong record.
    """
    if given == "none":
        return None, {}
    path = Path(given) if given else ROOT / "configs" / "results" / f"{run.name}.yaml"
    if not path.is_file():
        if given:
            raise ValueError(f"--recipe {given}: no such file; give the YAML the run was trained from, or 'none'")
        return None, {}
    path = path.resolve()
    shown = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    changes = recipe_changes(run_card, yaml.safe_load(path.read_text()))
    if changes and not given:
        raise ValueError(
            f"{run} was not trained from {shown}, which its folder's name points to: they differ in "
            f"{', '.join(changes)}. Pass --recipe with the YAML the run was trained from (for a "
            "scripts/gpu_family.sh pack, configs/gpu/METHOD.yaml), or --recipe none"
        )
    return shown, changes


def _deviations(run_card: dict) -> list[str]:
    """What the run did differently from its reference that the card itself must say (not only the recipe)."""
    notes = []
    arch = run_card.get("architecture") or {}
    if run_card.get("method") == "dino" and arch.get("dynamic_img_size"):
        grid = arch["img_size"] // arch["patch_size"]
        local = dino_local_size(arch["img_size"], arch["patch_size"]) // arch["patch_size"]
        notes.append(
            f"local crops see the {grid}x{grid} positional table resampled bicubically, with antialiasing, "
            f"to {local}x{local} (vit.resample_pos_embed); DINO's interpolate_pos_encoding resamples "
            "bicubically without antialiasing"
        )
    return notes


def _ship_decoder(run: Path, out: Path, name: str) -> dict | None:
    """MAE's decoder from the run's last checkpoint (or the run's decoder.safetensors, which
    scripts/pack_run.py writes in place of the checkpoints) as out/NAME_decoder.safetensors (MAE's key names)."""
    if (run / "decoder.safetensors").is_file():
        decoder = load_file(str(run / "decoder.safetensors"))
    else:
        latest = latest_checkpoint(run / CHECKPOINT_DIR)
        if latest is None:
            return None
        weights, _ = load_checkpoint(latest)
        decoder = decoder_state_dict(weights)
    path = out / f"{name}_decoder.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in decoder.items()}, str(path))
    return {
        "weights": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "parameters": sum(v.numel() for v in decoder.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("run", nargs="?", help="a `vitssl pretrain` --out folder (backbone.safetensors + backbone.json)")
    what.add_argument("--random", action="store_true", help="ship vit_mini_28 at its seed-0 initialisation")
    parser.add_argument(
        "--patch-size", type=int, default=7, choices=(4, 7), help="--random only: 7 (a 4x4 grid) or 4 (7x7)"
    )
    what.add_argument("--pixels", action="store_true", help="write the raw-pixel baseline's card (no weights)")
    what.add_argument(
        "--remeasure",
        metavar="CARD",
        help="measure a shipped vitssl_core/pretrained/NAME.json again under "
        "today's protocols, keeping its weights and its training record",
    )
    parser.add_argument("--name", required=True, help="NAME of NAME.safetensors and NAME.json")
    parser.add_argument("--out", default=str(PRETRAINED), help="default: vitssl_core/pretrained/")
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=20,
        help="default: 20; 0 leaves the card's "
        "fine-tuning column empty (a row the CPU could not afford under the common protocol)",
    )
    parser.add_argument(
        "--own-head",
        action="store_true",
        help="a supervised run only: the fine-tuning column holds the "
        "run's own classifier (trained end to end from scratch) instead of a further fine-tune; "
        "needs --finetune-epochs 0",
    )
    parser.add_argument(
        "--recipe",
        help="RUN only: the recipe YAML the run was trained from, recorded on the card with any setting "
        "the run changed from it, or 'none' (default: configs/results/RUN.yaml, RUN the run folder's "
        "name, if that file exists; it must then describe the run exactly)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 1000 training and 200 test images, "
        "at most 1 fine-tuning epoch; needs --out (the card is not a result)",
    )
    args = parser.parse_args(argv)
    if args.quick and Path(args.out).resolve() == PRETRAINED:
        parser.error("--quick writes a throwaway card: give --out DIR outside vitssl_core/pretrained/")
    if args.own_head and (not args.run or args.finetune_epochs != 0):
        parser.error("--own-head reads a supervised run's classifier: give RUN and --finetune-epochs 0")
    if args.recipe is not None and not args.run:
        parser.error("--recipe names the YAML a run was trained from: give RUN")
    if not args.name.isidentifier():
        parser.error(f"--name {args.name!r} must be a plain identifier such as simclr")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x_train, y_train = load_fashion_mnist_tensors(train=True)  # uint8 (60000, 28, 28), int64 (60000,)
    x_test, y_test = load_fashion_mnist_tensors(train=False)
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:1000], y_train[:1000], x_test[:200], y_test[:200]
        args.finetune_epochs = min(args.finetune_epochs, 1)
    card: dict = {
        "format": "vitssl-card/1",
        "name": args.name,
        "dataset": "fashion_mnist",
        "code_revision": _git_revision(),
        "torch_version": str(torch.__version__),
        "eval_hardware": hardware("cpu"),
    }

    if args.pixels:
        f_train, f_test = pixel_features(x_train), pixel_features(x_test)
        probes, correct = _probe_metrics(f_train, y_train, f_test, y_test)
        card.update(
            {
                "method": "pixels",
                "weights": None,
                "feature": "pixels",
                "normalize": None,
                "metrics": {**{k: round(v, 2) for k, v in probes.items()}, "finetune": None},
                "correct": {k: correct_to_hex(c) for k, c in correct.items()},
                "protocols": {
                    "knn": {**KNN, "n_train": len(y_train), "n_test": len(y_test)},
                    "linear": "linear_probe defaults on the pixels in [0, 1], standardised",
                    "label_fractions": "linear_probe on a class-balanced subset (seed 0)",
                },
                "recipe": None,
                "command": f"python scripts/ship_checkpoint.py --pixels --name {args.name}",
            }
        )
        card["eval_wall_seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_json(out / f"{args.name}.json", card)
        print(json.dumps(card["metrics"], indent=2))
        return 0

    if args.random:
        torch.manual_seed(0)
        backbone = vit_mini_28(patch_size=args.patch_size)
        normalize = {k: list(v) for k, v in NORMALIZE["fashion_mnist"].items()}
        run_card = {"method": "random", "model": "vit_mini_28", "steps": 0}
        recipe, command, wall = (
            None,
            f"torch.manual_seed(0); vitssl_core.vit_mini_28(patch_size={args.patch_size})",
            0.0,
        )
    elif args.remeasure:
        old = json.loads(Path(args.remeasure).read_text())
        backbone, _ = load_pretrained(args.remeasure)  # float16 -> float32 -> float16 is lossless
        normalize = old["normalize"]
        run_card = {
            k: old.get(k)
            for k in ("method", "steps", "final_loss", "train_config", "exported", "train_hardware", "train_segments")
        }
        recipe, command, wall = old.get("recipe"), old.get("command"), old.get("train_wall_seconds")
        card.update(
            {
                "train_config": old.get("train_config"),
                "method_args": old.get("method_args"),
                # cards from before model_args were recorded keep none; their "model" holds the build
                **({"model_args": old["model_args"]} if old.get("model_args") is not None else {}),
                "deviations": old.get("deviations") or _deviations({**old, "architecture": old.get("model") or {}}),
                "remeasured_from_revision": old.get("code_revision"),
                **({"recipe_changes": old["recipe_changes"]} if old.get("recipe_changes") else {}),
            }
        )
        if old.get("decoder"):  # MAE's decoder file stays as shipped beside the encoder
            card["decoder"] = old["decoder"]
    else:
        run = Path(args.run)
        run_card = json.loads((run / "backbone.json").read_text())
        backbone = ViT(**run_card["architecture"])
        backbone.load_state_dict(load_backbone(run / "backbone.safetensors"))
        normalize = run_card["normalize"]
        try:
            recipe, changed = _recipe_of(run, run_card, args.recipe)
        except ValueError as err:
            parser.error(str(err))
        command = f"vitssl pretrain --config {recipe}" if recipe else "see train_config"
        if changed:  # the run overrode the recipe (command-line flags): the card says which settings, and how
            card["recipe_changes"] = changed
        wall = run_card.get("train_wall_seconds") or _wall_seconds(run)
        card["train_config"] = run_card.get("train_config")
        card["method_args"] = run_card.get("method_args")
        card["model_args"] = run_card.get("model_args")  # patch_size, drop_path_rate: what the recipe guard checks
        card["deviations"] = _deviations(run_card)
        if args.own_head and run_card["method"] != "supervised":
            parser.error(f"--own-head needs a supervised run; {run} was trained with {run_card['method']}")

    # How the backbone was made, assembled before the evaluation (the long part) so that a card
    # lacking a field fails in seconds, not after an hour of fine-tuning.
    provenance = {
        "recipe": recipe,
        "command": command,
        "seed": (run_card.get("train_config") or {}).get("seed", 0),  # random weights have no train_config
        "steps": run_card.get("steps"),
        "final_loss": run_card.get("final_loss"),
        "exported": run_card.get("exported") or "backbone",
        "train_hardware": _train_hardware(run_card),
        "train_wall_seconds": wall,
        "train_segments": run_card.get("train_segments"),
    }
    model = architecture(backbone)
    weights = out / f"{args.name}.safetensors"
    save_backbone(backbone, weights, dtype=torch.float16, metadata={"card": f"{args.name}.json"})
    card.update({"method": run_card["method"], "weights": weights.name, "model": model, "normalize": normalize})
    atomic_write_json(out / f"{args.name}.json", card)  # load_pretrained reads the card next to the weights
    backbone, _ = load_pretrained(weights)  # the float16 weights, read back as float32: what ships

    both_train = extract_features(backbone, x_train, "cls+avg", normalize=normalize, precision="fp32")
    both_test = extract_features(backbone, x_test, "cls+avg", normalize=normalize, precision="fp32")
    feature, choice = _feature_choice(both_train, y_train)
    f_train, f_test = feature_view(both_train, feature), feature_view(both_test, feature)
    _, correct = _probe_metrics(f_train, y_train, f_test, y_test)
    if backbone.patch_embed.num_patches > 16:  # CI re-measures this card on a fixed subset (a 49-token card costs 3x)
        card["knn_check"] = _knn_check(f_train, y_train, f_test, y_test)
    if run_card["method"] == "supervised":
        correct.update(_scratch_on_fractions(model, x_train, y_train, x_test, y_test, normalize))
    if args.own_head:
        correct["finetune"] = _own_head(Path(args.run), run_card, backbone, x_test, y_test, normalize)
    if args.finetune_epochs > 0:
        correct["finetune"] = _finetune(backbone, x_train, y_train, x_test, y_test, normalize, args.finetune_epochs)
    metrics = {k: 100.0 * c.float().mean().item() for k, c in correct.items()}
    metrics.setdefault("finetune", None)
    if run_card["method"] == "mae" and args.run:
        card["decoder"] = _ship_decoder(Path(args.run), out, args.name)
    if args.run and (Path(args.run) / "history.jsonl").is_file():  # the training curves: `vitssl plot` draws them
        shutil.copyfile(Path(args.run) / "history.jsonl", out / f"{args.name}_history.jsonl")
        card["history"] = f"{args.name}_history.jsonl"

    card.update(
        {
            "feature": feature,
            "metrics": {k: None if v is None else round(v, 2) for k, v in metrics.items()},
            "protocols": {
                "feature_choice_knn_on_validation": {k: round(v, 2) for k, v in choice.items()},
                "knn": {**KNN, "n_train": len(y_train), "n_test": len(y_test)},
                "linear": "linear_probe defaults: standardised features, AdamW lr 1e-3, 100 epochs",
                "label_fractions": (
                    f"a ViT trained from scratch on the class-balanced subset (seed 0), epochs {SCRATCH_EPOCHS}"
                    if run_card["method"] == "supervised"
                    else "linear_probe on a class-balanced subset of the labels (seed 0)"
                ),
                "finetune": (
                    {"epochs": args.finetune_epochs, **FINETUNE}
                    if args.finetune_epochs > 0
                    else {
                        "own_head": True,
                        "epochs": (run_card.get("train_config") or {}).get("epochs"),
                        "what": "the run's own classifier, trained end to end from scratch on all labels; "
                        "no further fine-tuning",
                    }
                    if args.own_head
                    else None
                ),
            },
            "correct": {k: correct_to_hex(c) for k, c in correct.items()},
            **provenance,
            "eval_wall_seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in backbone.parameters()),
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            # what load_pretrained checks when it rebuilds the weights from the seed (the wheel leaves them out)
            "tensor_sha256": tensor_digest(load_backbone(weights)),
        }
    )
    if args.remeasure and (superseded := _superseded(old, card)):
        card["superseded"] = superseded
    atomic_write_json(out / f"{args.name}.json", card)
    print(json.dumps({"feature": feature, **metrics}, indent=2))
    return 0


def _superseded(old: dict, card: dict) -> dict | None:
    """What a --remeasure replaced, so no measured number is lost: the old card's metrics whose
    protocol changed, with that protocol, their per-image records and the revision, chained to
    what the old card superseded."""
    before, now = old.get("protocols") or {}, card["protocols"]
    replaced = {
        k: v
        for k, v in old["metrics"].items()
        if v is not None and before.get(PROTOCOL_OF[k]) != now.get(PROTOCOL_OF[k])
    }
    if not replaced:
        return old.get("superseded")
    return {
        "metrics": replaced,
        "protocols": {PROTOCOL_OF[k]: before.get(PROTOCOL_OF[k]) for k in replaced},
        "correct": {k: bits for k, bits in (old.get("correct") or {}).items() if k in replaced},  # paired tests
        "code_revision": old.get("code_revision"),
        "earlier": old.get("superseded"),
    }


def _train_hardware(run_card: dict) -> str | None:
    """Every distinct machine the run trained on, across its resumed segments."""
    if run_card.get("train_hardware"):
        return run_card["train_hardware"]
    segments = run_card.get("train_segments") or []
    if not segments:
        return None if run_card.get("method") == "random" else "unknown (trained before segments were recorded)"
    return "; ".join(dict.fromkeys(s["hardware"] for s in segments))


if __name__ == "__main__":
    sys.exit(main())
