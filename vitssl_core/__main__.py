"""The ``vitssl`` command line: pre-train a ViT with one method, then evaluate its backbone.

``vitssl pretrain`` builds a backbone from a preset (``vitssl_core.vit``), a method with its
small-image recipe (``vitssl_core.recipes``, which Python users call too), a data set from
``vitssl_core.data``, and runs ``vitssl_core.train.train``; at the end it writes
``backbone.safetensors`` (timm keys) and a ``backbone.json`` card next to the checkpoints: the
backbone the method exports (``train.exported_backbone``; DINO's EMA teacher), named in the
card's ``"exported"``, and the feature the probes should read (``"feature"``), chosen by kNN on
held-out training images (``features.choose_feature``). ``vitssl evaluate`` reads that pair back
and hands the backbone, with that feature, to ``vitssl_core.probes.run_protocol``. A run that
is still training has ``run.json`` instead (written at its first logged step): where the
exported backbone's tensors sit in the training checkpoints, so ``vitssl evaluate`` probes its
newest checkpoint. The same command runs under ``torchrun``.

This module is the only place that parses arguments; the library takes keyword arguments.
Exit codes (``EXIT_CODES``, shown by ``vitssl --help``): 0 done; 1 the run failed although its
inputs were good (training diverged, the data set is not on this machine, a run has no checkpoint
yet); 2 bad input, with one line on stderr that names the flag or file and says what to do;
130 stopped by Ctrl-C or SIGTERM (a checkpoint was saved; ``--resume`` continues). A
``pretrain`` holds a lock on its ``--out`` for its lifetime (``checkpoint.lock_folder``), so a
second run on the same folder is refused at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import torch
import yaml
from torch.utils.data import Dataset, Subset

from . import data, recipes, validate, vit
from ._version import __version__
from .checkpoint import (
    FolderBusyError,
    UnsafeCheckpointError,
    atomic_write_json,
    latest_checkpoint,
    load_checkpoint,
    lock_folder,
    remove_leftovers,
    save_backbone,
)
from .features import FEATURES, KNNMonitor, choose_feature
from .probes import PROTOCOLS, run_protocol
from .pretrained import list_pretrained, load_pretrained, resolve_checkpoint
from .recipes import METHODS, PRESETS, DataInfo, MethodEntry  # noqa: F401 (MethodEntry: tests add methods)
from .runtime import cleanup_distributed, resolve_device, resolve_precision, seed_everything, setup_distributed
from .train import CHECKPOINT_DIR, TrainConfig, exported_backbone, steps_per_epoch, train


# --------------------------------------------------------------------------- argument parsing
class _CliError(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exceptions, not exits.

    ``option(container, *flags, **kw)`` adds an option to this parser or one of its groups and
    keeps its Action in ``options`` (dest -> Action); the top-level parser keeps its subcommands'
    parsers in ``commands`` (name -> parser): argparse's own lists of both are private.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.options: dict[str, argparse.Action] = {}
        self.commands: dict[str, _Parser] = {}

    def option(self, container: Any, *flags: str, **kwargs: Any) -> argparse.Action:
        action = container.add_argument(*flags, **kwargs)
        self.options[action.dest] = action
        return action

    def error(self, message: str) -> NoReturn:
        raise _CliError(f"{message} (see '{self.prog} --help')")


def _key_value(text: str) -> tuple[str, Any]:
    """'depth=2' -> ('depth', 2): the value is read as YAML (2, 0.75, true, null, [1, 2], 1e-3)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with KEY a Python name (e.g. depth=2)")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"the value of {text!r} is not valid YAML ({err.problem})") from err
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


def _dataset_spec(text: str) -> str:
    if text in ("fashion_mnist", "cifar10") or (text.startswith("folder:") and len(text) > len("folder:")):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not fashion_mnist, cifar10 or folder:PATH")


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be an integer > 0" if minimum == 1 else f"{text!r} must be >= 0"
        )
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _train_flag(f: dataclasses.Field) -> str:
    """The ``vitssl pretrain`` option of a TrainConfig field: its metadata's "flag", else --name-with-dashes."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _train_dest(f: dataclasses.Field) -> str:
    """Where that option lands in the parsed arguments (and its --config key): ``--lr`` -> ``lr``."""
    return _train_flag(f)[2:].replace("-", "_")


def _train_default(f: dataclasses.Field) -> Any:
    """The CLI's default for a TrainConfig field: its metadata's "cli_default", else the class's default."""
    default = f.metadata.get("cli_default", f.default)
    return list(default) if isinstance(default, tuple) else default  # --print-config's YAML has no tuples


def _train_option(f: dataclasses.Field) -> dict[str, Any]:
    """argparse's keywords for a TrainConfig field's option, from the field's metadata (see TrainConfig)."""
    meta = f.metadata
    kwargs: dict[str, Any] = {"help": meta.get("help", "").format(default=_train_default(f))}
    if meta.get("switch"):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif "choices" in meta:
        kwargs["choices"] = meta["choices"]
    elif "number" in meta:
        integer, zero, _ = meta["number"]
        kwargs["type"] = (_non_negative_int if zero else _positive_int) if integer else _float
    elif "nargs" in meta:  # betas: the numbers are checked by TrainConfig
        kwargs.update(type=_float, nargs=meta["nargs"])
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    return kwargs


def _rivals() -> dict[str, list[str]]:
    """dest -> the dests of the options it excludes (``epochs`` -> [``steps``]): the fields' "exclusive"."""
    groups: dict[str, list[str]] = {}
    for f in dataclasses.fields(TrainConfig):
        if "exclusive" in f.metadata:
            groups.setdefault(f.metadata["exclusive"], []).append(_train_dest(f))
    return {dest: [d for d in dests if d != dest] for dests in groups.values() for dest in dests}


# The defaults of `vitssl pretrain`: its own options', then every TrainConfig field's (by option dest).
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "dataset": "fashion_mnist",
    "model": "vit_tiny_28",
    "model_args": [],
    "method_args": [],
    "feature_validation": 5000,
    "knn_every": 0,
    "knn_val": 2000,
    "knn_train": 10000,
    **{_train_dest(f): _train_default(f) for f in dataclasses.fields(TrainConfig)},
}

PRETRAIN_EPILOG = """\
examples:
  # supervised ViT-Tiny on Fashion-MNIST, 30 epochs (lr is the base lr for a batch of 256)
  vitssl pretrain --method supervised --epochs 30 --batch-size 256 --lr 1e-3 --out runs/sup
  # the same from a YAML file; command-line flags override the file
  vitssl pretrain --config configs/supervised_fashion_mnist.yaml --epochs 5
  # a 20-step smoke test with a 2-block ViT on 512 images
  vitssl pretrain --method supervised --steps 20 --subset 512 --batch-size 32 \\
      --model-arg depth=2 --model-arg embed_dim=64 --model-arg num_heads=2 --out runs/smoke
  # continue after a crash, Ctrl-C or preemption (exactly, with --num-workers 0)
  vitssl pretrain --config configs/supervised_fashion_mnist.yaml --resume
  # watch kNN accuracy and collapse every 5 epochs (history.jsonl), then draw the curves
  vitssl pretrain --method dino --epochs 30 --knn-every 5 --out runs/dino && vitssl plot runs/dino --out dino.png
  # 2 processes on one machine (gloo on CPU, NCCL on GPU); --batch-size is per process
  torchrun --nproc_per_node=2 -m vitssl_core pretrain --method supervised --epochs 30 --out runs/ddp

the learning rate after warm-up is lr * batch_size * accum_steps * processes / 256.
outputs in --out: checkpoints/ (resumable), history.jsonl, config.json, and at the end
backbone.safetensors (timm parameter names) with its backbone.json card, which names the
feature (cls, avg or cls+avg) that kNN preferred on held-out training images (--feature-validation).
"""

EVALUATE_EPILOG = """\
examples:
  vitssl evaluate --checkpoint runs/sup --protocol knn
  vitssl evaluate --checkpoint runs/sup/backbone.safetensors --protocol linear --max-train 10000
  vitssl evaluate --checkpoint simclr --protocol knn          # a shipped backbone, by name
  vitssl evaluate --checkpoint runs/dino --max-train 10000 --max-test 2000      # a run still training:
      # its newest checkpoint's exported backbone (DINO: the teacher), to watch a long run for collapse
"""

EXPORT_EPILOG = """\
examples:
  vitssl export dino --format hf --out exports/dino-hf      # ViTModel.from_pretrained(DIR, add_pooling_layer=False)
  vitssl export runs/simclr --format timm --out exports/simclr-timm   # timm.create_model("local-dir:DIR", pretrained=True)
  vitssl export mae --format hf --out exports/mae-hf        # also DIR/mae for ViTMAEForPreTraining (with the decoder)
"""


EXIT_CODES = """\
exit status:
  0    done
  1    the run failed although its inputs were good: training diverged (a non-finite loss), the
       data set is not on this machine and could not be downloaded, or a run has no checkpoint yet
  2    bad input, with one line on stderr that names the flag or file and says what to do: an
       argument or config file; a data set file or image; a card or checkpoint; an --out that is
       busy (another run holds its lock), not writable or not a folder; a batch too big for memory
  130  stopped by Ctrl-C or SIGTERM (pretrain saved a checkpoint: --resume continues)
"""


def build_parser() -> _Parser:
    """The ``vitssl`` parser; its ``commands`` maps each subcommand's name to that subcommand's parser.

    ``vitssl pretrain`` offers one option per ``TrainConfig`` field, made from the field's metadata.
    """
    parser = _Parser(
        prog="vitssl",
        description="Self-supervised Vision Transformers: pre-train, evaluate, plot and export.",
        epilog="run 'vitssl pretrain --help', 'vitssl evaluate --help' or 'vitssl export --help' for examples.\n\n"
        + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vitssl {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{pretrain,evaluate,show,export,plot}", parser_class=_Parser
    )
    d = PRETRAIN_DEFAULTS
    p = sub.add_parser(
        "pretrain",
        help="pre-train a backbone with one method",
        epilog=PRETRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pre-train a ViT backbone with a self-supervised (or supervised) method.",
    )
    # Every default is None here, so that a value given on the command line can be told apart
    # from one in --config; the real defaults (PRETRAIN_DEFAULTS) are filled in afterwards.
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file whose keys are these option names "
        "(batch_size or batch-size; model_args / method_args as mappings); flags override it",
    )
    what = p.add_argument_group("what to train")
    p.option(what, "--method", help=f"one of: {', '.join(METHODS)}")
    p.option(
        what,
        "--dataset",
        type=_dataset_spec,
        help="fashion_mnist, cifar10 or folder:PATH: PATH/<class>/<image> (four-fifths train, every fifth "
        "image test) or PATH/train/<class>/<image> with PATH/test (or val); pretrain reads the train "
        f"images (default: {d['dataset']})",
    )
    p.option(
        what,
        "--data-root",
        metavar="DIR",
        help="folder that holds the data set files (cifar10: "
        "cifar-10-batches-py; fashion_mnist: the IDX files, plain or .gz); without it Fashion-MNIST "
        "is searched for as vitssl_core.data explains",
    )
    p.option(what, "--subset", type=_positive_int, metavar="N", help="train on the first N images only")
    p.option(what, "--model", help=f"backbone preset: {', '.join(PRESETS)} (default: {d['model']})")
    p.option(
        what,
        "--model-arg",
        dest="model_args",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="override a ViT keyword, e.g. depth=6 or drop_path_rate=0.1 (repeatable)",
    )
    p.option(
        what,
        "--method-arg",
        dest="method_args",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="keyword for the method, e.g. label_smoothing=0.1 (repeatable)",
    )
    sections: dict[str, Any] = {}  # one option per TrainConfig field, in the --help section its metadata names
    exclusive: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata.get("group", "how to run")
        if group not in sections:
            sections[group] = p.add_argument_group(group)
        container = sections[group]
        if "exclusive" in f.metadata:  # --epochs | --steps, --warmup-steps | --warmup-epochs
            if f.metadata["exclusive"] not in exclusive:
                exclusive[f.metadata["exclusive"]] = container.add_mutually_exclusive_group()
            container = exclusive[f.metadata["exclusive"]]
        p.option(container, _train_flag(f), **_train_option(f))
    run = sections["how to run"]
    p.option(
        run,
        "--feature-validation",
        type=_non_negative_int,
        metavar="N",
        help="after training, hold out the last N training images (at most a fifth) and record in "
        "backbone.json the feature (cls, avg or cls+avg) whose kNN accuracy on them is best; "
        "'vitssl evaluate' reads it by default; 0 skips the choice (default: 5000)",
    )
    p.option(
        run, "--print-config", action="store_true", default=None, help="print the resolved options as YAML and exit"
    )
    watch = p.add_argument_group(
        "monitoring while training (labels serve only this monitor; the test split stays unseen)"
    )
    p.option(
        watch,
        "--knn-every",
        type=_non_negative_int,
        metavar="N",
        help="every N epochs, log knn_top1 (weighted kNN, k=20, T=0.07, of --knn-val held-out training "
        "images against --knn-train others) and embedding_std (std of the l2-normalised embeddings, "
        "averaged over dimensions: it falls towards 0 at collapse; compare it with random weights) to "
        "history.jsonl and the progress bar, for the backbone the method exports (DINO: the teacher). "
        "It leaves the weights bit-identical. With the defaults it costs 8-12 s on vit_mini_28 on one "
        "CPU core (12,000 forward passes), 1-7 %% of an epoch of any method (benchmarks/knn_monitor_cost.py); "
        "0 turns it off (default: 0)",
    )
    p.option(
        watch,
        "--knn-val",
        type=_positive_int,
        metavar="N",
        help="the last N training images are the queries (at most a fifth) (default: 2000)",
    )
    p.option(
        watch,
        "--knn-train",
        type=_positive_int,
        metavar="N",
        help="up to N training images before them are the kNN's bank (default: 10000)",
    )

    e = sub.add_parser(
        "evaluate",
        help="evaluate a pre-trained backbone",
        epilog=EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate the backbone that 'vitssl pretrain' wrote, with one protocol.",
    )
    e.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH|NAME",
        help="a pretrain --out folder (one still training too: its newest checkpoint), a "
        "backbone.safetensors with its backbone.json beside it, a card NAME.json, or the name of a "
        "backbone shipped with the package (dino, mae, ...; an existing path wins over a name)",
    )
    e.add_argument(
        "--protocol", default="knn", choices=PROTOCOLS, help="knn, linear, finetune or label_efficiency (default: knn)"
    )
    e.add_argument(
        "--feature",
        choices=FEATURES,
        help="what the probes read: the class token, the mean of the patch "
        "tokens, or both (default: the card's \"feature\", which 'vitssl pretrain' chooses on "
        "held-out training images; else cls)",
    )
    e.add_argument("--dataset", type=_dataset_spec, help="default: the data set the backbone was trained on")
    e.add_argument("--data-root", metavar="DIR", help="folder that holds the data set files (as for pretrain)")
    e.add_argument("--max-train", type=_positive_int, metavar="N", help="use the first N training images")
    e.add_argument("--max-test", type=_positive_int, metavar="N", help="use the first N test images")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    e.add_argument("--seed", type=_non_negative_int, default=0, help="default: 0")
    e.add_argument("--out", metavar="FILE", help="also write the metrics to this JSON file")

    s = sub.add_parser(
        "show",
        help="draw attention maps or MAE reconstructions for one image",
        description="Draw what a trained backbone sees in one image file (PNG/JPEG, resized to the "
        "model's input): the last block's class-token attention per head with DINO's 60 %% mask, "
        "or an MAE card's reconstruction.",
    )
    s.add_argument("kind", choices=("attention", "reconstruction"), help="attention or reconstruction")
    s.add_argument(
        "--checkpoint",
        required=True,
        metavar="NAME",
        help="a shipped card name (dino, mae, ...) or a path to NAME.json / NAME.safetensors",
    )
    s.add_argument("--image", required=True, metavar="FILE", help="a PNG or JPEG image")
    s.add_argument("--out", required=True, metavar="FILE.png", help="where to save the figure")
    s.add_argument("--mask-ratio", type=float, default=0.75, help="reconstruction: share of patches hidden (0.75)")
    s.add_argument("--seed", type=_non_negative_int, default=0, help="reconstruction: which mask (default: 0)")

    x = sub.add_parser(
        "export",
        help="export a backbone for Hugging Face transformers or timm",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a backbone as a folder that transformers' ViTModel (--format hf) or "
        "timm.create_model('local-dir:DIR') (--format timm) loads, with a README on how.",
    )
    x.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a shipped card name (dino, mae, ...), NAME.json / NAME.safetensors, a pretrain --out "
        "folder (one still training too) or its backbone.safetensors",
    )
    x.add_argument("--format", required=True, choices=("hf", "timm"), help="hf (transformers) or timm")
    x.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for the export")

    pl = sub.add_parser(
        "plot",
        help="draw training curves from history.jsonl",
        description="Draw loss, learning rate, knn_top1, embedding_std (from --knn-every) and images/s "
        "against the epoch from each run's history.jsonl, the runs overlaid with a legend; a run "
        "still training is read as far as it has got.",
    )
    pl.add_argument("runs", nargs="+", metavar="RUN", help="pretrain --out folders or history.jsonl files")
    pl.add_argument("--out", required=True, metavar="FILE.png", help="where to save the figure (.png, .pdf or .svg)")
    pl.add_argument("--title", help="the figure's title (default: 'Training curves from history.jsonl')")
    parser.commands.update(pretrain=p, evaluate=e, show=s, export=x, plot=pl)
    return parser


def _config_argv(path: str, sub: _Parser, given: argparse.Namespace) -> list[str]:
    """The options in a YAML/JSON file as command-line words (so they are checked exactly like flags)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    except OSError as err:
        raise _CliError(f"--config {path}: cannot read it ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise _CliError(f"--config {path}: not valid YAML/JSON ({getattr(err, 'problem', err)})") from err
    if not isinstance(loaded, dict):
        raise _CliError(f"--config {path}: expected a mapping of option names to values, got {type(loaded).__name__}")
    actions = {dest: a for dest, a in sub.options.items() if dest != "config"}
    rivals = _rivals()
    argv: list[str] = []
    for raw_key, value in loaded.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions:
            raise _CliError(f"--config {path}: unknown key {raw_key!r}; allowed: {', '.join(sorted(actions))}")
        action, flag = actions[key], actions[key].option_strings[0]
        if value is None or any(getattr(given, rival) is not None for rival in rivals.get(key, ())):
            continue  # null means "the default"; a flag on the command line beats its rival in the file
        if action.nargs == 0:  # a switch: --resume / --no-resume, --print-config
            if not isinstance(value, bool):
                raise _CliError(f"--config {path}: {raw_key} must be true or false, got {value!r}")
            if value or isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else f"--no-{flag[2:]}")
        elif key in ("model_args", "method_args"):
            if not isinstance(value, dict):
                raise _CliError(f"--config {path}: {raw_key} must be a mapping such as {{depth: 2}}, got {value!r}")
            for k, v in value.items():
                argv += [flag, f"{k}={json.dumps(v)}"]
        elif action.nargs == 2:
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise _CliError(f"--config {path}: {raw_key} must be a list of two numbers, got {value!r}")
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``vitssl`` arguments, merging ``--config FILE`` under the command line; defaults filled in."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "pretrain":
        return args
    if args.config is not None:
        file_argv = _config_argv(args.config, parser.commands["pretrain"], args)
        at = argv.index("pretrain") + 1
        try:
            parser.parse_args(argv[:at] + file_argv)  # the file alone: its errors name the file
        except _CliError as err:
            raise _CliError(f"--config {args.config}: {err}") from None
        args = parser.parse_args(argv[:at] + file_argv + argv[at:])
    for key, value in PRETRAIN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.model_args, args.method_args = dict(args.model_args), dict(args.method_args)
    if args.method is None:
        raise _CliError(f"--method is required; one of: {', '.join(METHODS)}")
    if args.method not in METHODS:
        raise _CliError(f"--method {args.method!r} is unknown; one of: {', '.join(METHODS)}")
    if args.model not in PRESETS:
        raise _CliError(f"--model {args.model!r} is unknown; one of: {', '.join(PRESETS)}")
    if args.epochs is None and args.steps is None:
        raise _CliError("give --epochs N or --steps N")
    if args.out is None and not args.print_config:
        raise _CliError("--out DIR is required: the folder for checkpoints, history.jsonl and the backbone")
    if args.out == "":  # Path("") is the current folder: the run would land wherever vitssl was started
        raise _CliError("--out is empty; give the folder for checkpoints, history.jsonl and the backbone")
    return args


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``pretrain`` arguments: each field from its option (``--lr`` -> ``blr``)."""
    try:
        return TrainConfig(**{f.name: getattr(args, _train_dest(f)) for f in dataclasses.fields(TrainConfig)})
    except ValueError as err:
        raise _CliError(str(err)) from None


# --------------------------------------------------------------------------- pretrain
def _check_data_root(spec: str, data_root: str | None, splits: tuple[bool, ...]) -> None:
    """A --data-root must hold the data set itself: the library would quietly search other folders after it."""
    if data_root is None or spec.startswith("folder:"):
        return
    root = Path(data_root)
    if spec == "fashion_mnist":
        names = [name for train in splits for name in data.FASHION_MNIST_FILES[train]]
        missing = [n for n in names if not (root / n).is_file() and not (root / f"{n}.gz").is_file()]
        if missing:
            raise _CliError(
                f"--data-root {data_root} does not hold Fashion-MNIST: {', '.join(missing)} missing; "
                f"the folder must hold {', '.join(names)} (each plain or .gz)"
            )
    elif spec == "cifar10" and not (root / "cifar-10-batches-py").is_dir():
        raise _CliError(
            f"--data-root {data_root} does not hold CIFAR-10: expected the folder "
            f"{root / 'cifar-10-batches-py'} (cifar-10-python.tar.gz extracted there)"
        )


def _load_dataset(spec: str, data_root: str | None, img_size: int) -> tuple[Dataset, str, int]:
    """(data set of (float image in [0, 1], label), NORMALIZE key, number of classes)."""
    _check_data_root(spec, data_root, (True,))
    try:
        if spec == "fashion_mnist":
            return data.FashionMNIST(root=data_root, train=True), "fashion_mnist", 10
        if spec == "cifar10":
            root = data_root or os.environ.get(data.ENV_VAR) or str(Path.home() / ".cache" / "vitssl" / "cifar10")
            return data.cifar10(root, train=True), "cifar10", 10
        folder = data.folder_split(spec[len("folder:") :], train=True, img_size=img_size)
        return folder, "imagenet", len(folder.classes)
    except data.DatasetNotFoundError as err:
        raise _CliError(str(err), code=1) from None
    except (ValueError, OSError) as err:  # a corrupt IDX file, an unreadable image, a folder without classes
        raise _CliError(f"--dataset {spec}: {err}") from None


def _pretrain(args: argparse.Namespace) -> int:
    config = _train_config(args)
    if args.print_config:
        shown = {k: v for k, v in sorted(vars(args).items()) if k not in ("command", "config", "print_config")}
        print(yaml.safe_dump(shown, sort_keys=False), end="")
        return 0
    info = setup_distributed()
    held = contextlib.ExitStack()
    try:
        seed_everything(args.seed)  # the same initial weights in every process and every rerun
        method, base, data_info = _build_method(args, config, info.world_size)
        dataset, views = recipes.training_data(args.method, base, data_info, method)
        held.enter_context(_out_lock(args.out, info.rank, info.world_size))  # from the first write to the last

        started = _RunCard(args, config, info.world_size, method, data_info) if info.rank == 0 else None
        monitor = _knn_monitor(args, method, base, data_info) if args.knn_every else None
        try:
            history = train(method, dataset, config, callback=started, batch_transform=views, epoch_end=monitor)
        except KeyboardInterrupt as err:
            raise _CliError(f"stopped ({err}); continue with the same command and --resume", code=130) from None
        except FloatingPointError as err:
            raise _CliError(str(err), code=1) from None
        except (ValueError, FileExistsError, UnsafeCheckpointError) as err:  # this run's settings, data or --out
            raise _CliError("; ".join([str(err), *getattr(err, "__notes__", [])])) from None
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            raise _CliError(_memory_advice(args, err)) from None
        except OSError as err:  # a checkpoint moved away, --out unwritable mid-run, a full disk
            raise _CliError(f"--out {args.out}: {err}") from None

        if info.rank == 0:
            _write_card(args, config, info.world_size, method, history, base, data_info)
        return 0
    finally:
        held.close()
        cleanup_distributed()


@contextlib.contextmanager
def _out_lock(out: str, rank: int, world_size: int) -> Iterator[None]:
    """Rank 0 creates --out, holds its lock and removes leftover temporary files; a refusal reaches every rank."""
    with contextlib.ExitStack() as held:
        refusal = None
        if rank == 0:
            try:
                refusal = _unusable_folder(out)
                if refusal is None:
                    held.enter_context(lock_folder(out))
                    remove_leftovers(out)
            except FolderBusyError as err:
                refusal = f"--out {err}; wait until that run ends, or choose another --out"
            except OSError as err:
                refusal = f"--out {out}: cannot write in it ({err.strerror or err}); choose a folder you can write to"
        if world_size > 1:  # every rank must stop, or the others wait forever in the first collective
            said = [refusal]
            torch.distributed.broadcast_object_list(said, src=0)
            refusal = said[0]
        if refusal is not None:
            raise _CliError(refusal)
        yield


def _unusable_folder(out: str) -> str | None:
    """Why --out cannot be this run's folder (after creating it), or None."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"--out {out} is a file, not a folder; choose a folder"
    except NotADirectoryError:
        return f"--out {out}: a part of the path is a file, not a folder; choose another --out"
    except OSError as err:
        return f"--out {out} cannot be created ({err.strerror or err}); choose a folder you can write to"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--out {out} is not writable; choose a folder you can write to"
    return None


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA's, or the CPU allocator under a memory limit)."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)


def _memory_advice(args: argparse.Namespace, err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    smaller = max(1, args.batch_size // 2)
    return (
        f"out of memory with --batch-size {args.batch_size} ({first}); try --batch-size {smaller} "
        f"(with --accum-steps {2 * args.accum_steps} for the same batch per optimizer step)"
    )


def _build_method(
    args: argparse.Namespace, config: TrainConfig, world_size: int
) -> tuple[torch.nn.Module, Dataset, DataInfo]:
    """(method with its recipe's defaults, the plain training images, what the recipes know of them)."""
    try:
        backbone = PRESETS[args.model](**args.model_args)
    except (TypeError, ValueError) as err:
        raise _CliError(f"--model {args.model} with --model-arg {args.model_args}: {err}") from None
    base, norm_key, num_classes = _load_dataset(args.dataset, args.data_root, backbone.img_size[0])
    if args.subset is not None:
        base = Subset(base, range(min(args.subset, len(base))))
    try:
        shape = tuple(base[0][0].shape)
    except (ValueError, OSError) as err:  # the first image cannot be read
        raise _CliError(f"--dataset {args.dataset}: {err}") from None
    want = (backbone.in_chans, *backbone.img_size)
    if shape[0] != want[0] or (shape[1:] != want[1:] and not backbone.dynamic_img_size):
        raise _CliError(
            f"--model {args.model} takes {'x'.join(map(str, want))} images but --dataset {args.dataset} "
            f"gives {'x'.join(map(str, shape))}; choose a matching preset or set --model-arg "
            "img_size=.. / in_chans=.."
        )
    stats = data.NORMALIZE[norm_key]
    info = DataInfo(
        args.dataset, backbone.img_size[0], backbone.in_chans, tuple(stats["mean"]), tuple(stats["std"]), num_classes
    )
    steps = {}
    if METHODS[args.method].needs_steps:  # the training data set holds one item per image of base
        try:
            steps["epoch_steps"] = steps_per_epoch(len(base), config, world_size)
        except ValueError as err:
            raise _CliError(str(err)) from None
        steps["total_steps"] = config.max_steps or config.epochs * steps["epoch_steps"]
    try:
        method = recipes.build_method(args.method, backbone, info, dataset=base, **steps, **args.method_args)
    except (TypeError, ValueError) as err:
        raise _CliError(f"--method {args.method} with --method-arg {args.method_args}: {err}") from None
    return method, base, info


def _knn_monitor(args: argparse.Namespace, method: torch.nn.Module, base: Dataset, info: DataInfo) -> KNNMonitor:
    """--knn-every: the epoch-end callback that the trainer runs on rank 0 (features.KNNMonitor)."""
    try:
        return KNNMonitor(
            exported_backbone(method)[1],  # DINO: the teacher, as the card will ship
            base,  # the plain training images: no augmentation, no test split
            every=args.knn_every,
            val=args.knn_val,
            bank=args.knn_train,
            normalize={"mean": list(info.mean), "std": list(info.std)},
            precision=args.precision,
        )
    except ValueError as err:
        raise _CliError(f"--knn-every {args.knn_every}: {err}") from None


RUN_CARD = "run.json"  # in --out while a run trains: what `vitssl evaluate` needs to read its checkpoints


def _card_head(args: argparse.Namespace, exported: str, export: vit.ViT, info: DataInfo) -> dict[str, Any]:
    """The part of the card known before training: the exported backbone's name and build, method, data."""
    return {
        "exported": exported,
        "precision": resolve_precision(args.precision, args.device),  # the one used: "auto" resolved
        "model": args.model,
        "model_args": args.model_args,
        "architecture": vit.architecture(export),
        "method": args.method,
        "method_args": args.method_args,
        "dataset": args.dataset,
        "normalize": {"mean": list(info.mean), "std": list(info.std)},
    }


class _RunCard:
    """The training callback that writes --out/run.json at the first logged row of this call.

    By then the run has really started (a resume has loaded its checkpoint), so the file never
    describes a run that refused to start. Its ``"state_keys"`` map each key of the exported
    backbone to its key in the method's state dict (found by identity: MAE renames its encoder's
    keys, DINO's teacher sits under ``teacher_backbone.``), so ``vitssl evaluate`` can read the
    backbone from any training checkpoint.
    """

    def __init__(self, args: argparse.Namespace, config: TrainConfig, world_size: int, method: Any, info: DataInfo):
        self.out = Path(args.out)
        exported, export = exported_backbone(method)
        in_method = {id(t): k for k, t in method.state_dict(keep_vars=True).items()}
        keys = {k: in_method.get(id(t)) for k, t in export.state_dict(keep_vars=True).items()}
        self.pending: dict[str, Any] | None = {  # the card still to write
            "format": "vitssl-run/1",
            **_card_head(args, exported, export, info),
            "state_keys": keys,
            "train_config": dataclasses.asdict(config),
            "world_size": world_size,
        }
        if None in keys.values():  # a method that copies its backbone's tensors: no card, never a crash
            self.pending = None

    def __call__(self, row: dict[str, Any]) -> None:
        if self.pending is not None:
            atomic_write_json(self.out / RUN_CARD, self.pending)
            self.pending = None


def _write_card(
    args: argparse.Namespace,
    config: TrainConfig,
    world_size: int,
    method: torch.nn.Module,
    history: list[dict[str, Any]],
    base: Dataset,
    info: DataInfo,
) -> None:
    """backbone.safetensors and its backbone.json card in --out, with the feature chosen on training images."""
    out = Path(args.out)
    exported, export = exported_backbone(method)  # DINO ships its teacher, the others their backbone
    save_backbone(export, out / "backbone.safetensors")
    head = _card_head(args, exported, export, info)
    card = {
        "format": "vitssl-backbone/1",
        "weights": "backbone.safetensors",
        **head,
        **_feature_choice(export, base, head["normalize"], args.feature_validation, args.precision),
        "steps": history[-1]["step"] if history else 0,
        "final_loss": next((row["loss"] for row in reversed(history) if "loss" in row), None),  # not a knn row
        "train_config": dataclasses.asdict(config),
        "world_size": world_size,
        "torch_version": str(torch.__version__),
        **_segments(out),
    }
    atomic_write_json(out / "backbone.json", card)
    loss = f", final loss {card['final_loss']:.4f}" if card["final_loss"] is not None else ""
    chose = f"; probes read {card['feature']!r}" if "feature" in card else ""
    print(f"vitssl: trained {card['steps']} steps{loss}; backbone in {out / 'backbone.safetensors'}{chose}")


def _feature_choice(
    backbone: vit.ViT, base: Dataset, normalize: dict, validation: int, precision: str
) -> dict[str, Any]:
    """{"feature", "feature_choice"} for the card: kNN on the last training images against the others.

    At most a fifth of the images is held out; none (and no "feature") with ``validation=0``
    or fewer than 5 images. The test split plays no part.
    """
    held_out = min(validation, len(base) // 5)
    if held_out == 0:
        return {}
    try:
        feature, scores = choose_feature(backbone, base, validation=held_out, normalize=normalize, precision=precision)
    except (ValueError, OSError) as err:  # an image that training never drew; the weights are saved already
        raise _CliError(
            f"choosing the feature on held-out training images: {err}; --feature-validation 0 skips it"
        ) from None
    return {
        "feature": feature,
        "feature_choice": {
            "protocol": "weighted kNN (k=20 or fewer, T=0.07) of the held-out images against the others",
            "held_out": f"the last {held_out} of the {len(base)} training images",
            "top1": scores,
        },
    }


def _segments(out: Path) -> dict[str, Any]:
    """The wall time and hardware of every start and resume of the run in ``out`` (from its last checkpoint)."""
    latest = latest_checkpoint(out / CHECKPOINT_DIR)
    segments = load_checkpoint(latest)[1].get("segments", []) if latest is not None else []
    return {"train_wall_seconds": round(sum(s["seconds"] for s in segments), 1), "train_segments": segments}


# --------------------------------------------------------------------------- evaluate
def _find_backbone(path: str) -> tuple[vit.ViT, dict[str, Any]]:
    """(backbone, its card) from a pretrain --out folder, its backbone.safetensors, a card
    NAME.json (or its NAME.safetensors), or a shipped name (``dino``): an existing path wins."""
    try:
        p = resolve_checkpoint(path)
        if not p.exists():  # a NAME.json / NAME.safetensors path that is not there
            raise FileNotFoundError(path)
    except FileNotFoundError:
        names = ", ".join(row["name"] for row in list_pretrained() if row["weights"])
        raise _CliError(
            f"--checkpoint {path}: no such file or folder; give a 'vitssl pretrain' --out folder (finished: "
            f"backbone.safetensors and backbone.json; or still training), a card NAME.json, or a shipped name ({names})"
        ) from None
    except ValueError as err:  # a name that is not shipped: the message lists the shipped ones
        raise _CliError(f"--checkpoint {path}: {err}") from None
    if p.is_dir() and not (p / "backbone.safetensors").is_file() and (p / RUN_CARD).is_file():
        return _run_in_progress(p)
    weights = p / "backbone.safetensors" if p.is_dir() else p
    shipped = weights.with_suffix(".json")
    card_path = (
        shipped if weights.name != "backbone.safetensors" and shipped.is_file() else weights.with_name("backbone.json")
    )
    if card_path != shipped and (not weights.is_file() or not card_path.is_file()):
        raise _CliError(
            f"--checkpoint {path}: expected backbone.safetensors and backbone.json (written by "
            "'vitssl pretrain' when training ends), a run still training (its run.json and checkpoints/), "
            "or a shipped NAME.safetensors with NAME.json"
        )
    try:
        backbone, card = load_pretrained(card_path)  # the card's "architecture" (or "model") and its weights
    except (OSError, ValueError, TypeError) as err:  # missing weights, a corrupt file, a card without a model
        raise _CliError(f"--checkpoint {path}: {err}") from None
    _check_card(card, card_path)
    return backbone, card


def _check_card(card: dict[str, Any], where: Path) -> None:
    """A card's "feature" and "normalize", refused with the card named: either would silently spoil every score."""
    feature = card.get("feature")
    if feature is not None and feature not in FEATURES:
        raise _CliError(
            f'{where}: its "feature" {feature!r} is not one of {", ".join(FEATURES)}; correct the card, '
            "or choose with --feature"
        )
    try:
        validate.normalize_stats(card.get("normalize"))  # the library's own rule for a card's "normalize"
    except ValueError as err:
        raise _CliError(f'{where}: its "normalize" is unusable: {err}; correct the card') from None


def _run_in_progress(folder: Path, tries: int = 3) -> tuple[vit.ViT, dict[str, Any]]:
    """(exported backbone, run card with ``"steps"``) from the newest checkpoint of a run still training.

    The trainer may replace that checkpoint while it is read (it removes the previous one after
    committing the next), so a read that loses the race is tried again.
    """
    try:
        card = json.loads((folder / RUN_CARD).read_text())
        keys, architecture = dict(card["state_keys"]), dict(card["architecture"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _CliError(
            f"--checkpoint {folder}: {RUN_CARD} is not a run card from 'vitssl pretrain' ({err!r})"
        ) from None
    _check_card(card, folder / RUN_CARD)
    for attempt in range(tries):
        try:
            weights, state = load_checkpoint(folder / CHECKPOINT_DIR)
            break
        except UnsafeCheckpointError as err:
            raise _CliError(f"--checkpoint {folder}: {err}") from None
        except (FileNotFoundError, ValueError) as err:
            if attempt == tries - 1 or not (folder / CHECKPOINT_DIR).is_dir():
                raise _CliError(
                    f"--checkpoint {folder}: the run has no readable checkpoint yet ({err})", code=1
                ) from None
    missing = sorted(k for k in keys.values() if k not in weights)
    try:
        backbone = vit.ViT(**architecture)
        if missing:
            raise ValueError(f"it lacks {len(missing)} of its keys, e.g. {missing[0]!r}")
        backbone.load_state_dict(
            {k: weights[m].float() if weights[m].is_floating_point() else weights[m] for k, m in keys.items()}
        )
    except (TypeError, ValueError, RuntimeError) as err:  # a bad build, a missing key, a wrong shape
        first = " ".join(str(err).strip().splitlines()[:2])[:300]
        raise _CliError(
            f"--checkpoint {folder}: its checkpoint does not hold the backbone {RUN_CARD} describes: {first}"
        ) from None
    try:  # the trainer's resolved config.json knows the run's length
        of = f" of {int(json.loads((folder / 'config.json').read_text())['total_steps'])}"
    except (OSError, ValueError, KeyError, TypeError):
        of = ""
    exported = card.get("exported", "backbone")
    finished = _finished_card(folder)
    if finished is not None:  # backbone.json is there, its weights are not: say so, and read as the card says
        print(
            f"vitssl: {folder} finished training, but its backbone.safetensors is missing; evaluating the "
            f"{exported} of its last checkpoint (step {state['step']}) instead",
            file=sys.stderr,
        )
        return backbone.eval(), {**card, **finished, "steps": state["step"]}
    print(f"vitssl: {folder} is still training; evaluating its {exported} at step {state['step']}{of}", file=sys.stderr)
    return backbone.eval(), {**card, "steps": state["step"]}


def _finished_card(folder: Path) -> dict[str, Any] | None:
    """The "feature" (and "normalize") of a finished run's backbone.json, checked; None if there is no such card."""
    try:
        card = json.loads((folder / "backbone.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict):
        return None
    _check_card(card, folder / "backbone.json")
    return {k: card[k] for k in ("feature", "normalize") if k in card}


def _evaluate(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise _CliError(str(err)) from None
    if args.out is not None:  # before the protocol's minutes, not after
        _check_metrics_file(args.out)
    backbone, card = _find_backbone(args.checkpoint)
    seed_everything(args.seed)
    backbone.to(device).eval()
    dataset = args.dataset or card.get("dataset", "fashion_mnist")
    _check_data_root(dataset, args.data_root, (True, False))
    # The feature the card was measured with, so the CLI and the shipped cards measure the same thing.
    feature = args.feature or card.get("feature") or "cls"  # (_check_card refused any other)
    kwargs = {
        k: v
        for k, v in (("data_root", args.data_root), ("max_train", args.max_train), ("max_test", args.max_test))
        if v is not None
    }
    try:
        metrics = run_protocol(
            args.protocol, backbone, feature=feature, normalize=card.get("normalize"), dataset=dataset, **kwargs
        )
    except ValueError as err:
        raise _CliError(str(err)) from None
    except data.DatasetNotFoundError as err:  # not there and no download: the machine's, not the arguments'
        raise _CliError(str(err), code=1) from None
    except OSError as err:  # a data file that cannot be read
        raise _CliError(f"--dataset {dataset}: {err}") from None
    text = json.dumps(metrics, indent=2, default=float)
    print(text, flush=True)  # first: a failed write must not lose what the protocol measured
    if args.out is not None:
        try:
            atomic_write_json(args.out, json.loads(text))
        except OSError as err:
            raise _CliError(
                f"--out {args.out}: cannot write the metrics ({err.strerror or err}); they are printed above"
            ) from None
    return 0


def _check_metrics_file(out: str) -> None:
    """Refuse an evaluate --out that could not be written: empty, a folder, in a missing or read-only folder."""
    path = Path(out)
    if out == "" or path.is_dir():
        raise _CliError(f"--out {out!r} is {'empty' if out == '' else 'a folder'}; give a file such as metrics.json")
    folder = path.parent
    if not folder.is_dir():
        raise _CliError(f"--out {out}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _CliError(f"--out {out}: the folder {folder} is not writable; choose a folder you can write to")


# --------------------------------------------------------------------------- show
def _show(args: argparse.Namespace) -> int:
    from .visualize import render  # matplotlib only when a picture is asked for

    try:
        out = render(args.kind, args.checkpoint, args.image, args.out, mask_ratio=args.mask_ratio, seed=args.seed)
    except (OSError, ValueError, TypeError) as err:
        raise _CliError(f"show {args.kind}: {err}") from None
    print(out)
    return 0


# --------------------------------------------------------------------------- export
def _export(args: argparse.Namespace) -> int:
    from .export import save_hf, save_timm
    from .visualize import load_mae

    path, out = args.checkpoint, Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _CliError(f"--out {args.out} exists and is not an empty folder; choose a new one")
    backbone, card = _find_backbone(path)  # shipped names resolve there, through pretrained.resolve_checkpoint
    mae = None
    if args.format == "hf" and card.get("method") == "mae" and isinstance(card.get("decoder"), dict):
        try:
            mae = load_mae(path)[0]  # the decoder ships beside the encoder: ViTMAEForPreTraining gets both
        except (OSError, ValueError) as err:
            raise _CliError(f"export: {err}") from None
        backbone = mae.backbone
    try:
        (save_hf(backbone, out, card, mae) if args.format == "hf" else save_timm(backbone, out, card))
    except ValueError as err:
        raise _CliError(f"export: {err}") from None
    print(out)
    return 0


# --------------------------------------------------------------------------- plot
def _plot(args: argparse.Namespace) -> int:
    from .curves import plot_history, read_history  # matplotlib only when a picture is asked for

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise _CliError(f"--out {args.out}: give a .png, .pdf or .svg file name")
    names = [Path(r).name if Path(r).name != "history.jsonl" else Path(r).parent.name for r in args.runs]
    labels = names if len(set(names)) == len(names) else list(args.runs)
    if len(set(labels)) != len(labels):
        raise _CliError(f"plot: a run is given twice: {' '.join(args.runs)}")
    try:
        runs = {label: read_history(run) for label, run in zip(labels, args.runs)}
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_history(runs, title=args.title).savefig(out, dpi=120)
    except (OSError, ValueError) as err:
        raise _CliError(f"plot: {err}") from None
    print(out)
    return 0


# --------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vitssl``; returns the exit code (``--help`` exits through SystemExit(0))."""
    try:
        args = parse_args(argv)
        if args.command == "show":
            return _show(args)
        if args.command == "export":
            return _export(args)
        if args.command == "plot":
            return _plot(args)
        return _pretrain(args) if args.command == "pretrain" else _evaluate(args)
    except _CliError as err:
        text = str(err)
        if err.code == 2:  # the promise: one line
            text = " ".join(line.strip() for line in text.splitlines() if line.strip())
        print(f"vitssl: error: {text}", file=sys.stderr)
        return err.code


if __name__ == "__main__":
    sys.exit(main())
