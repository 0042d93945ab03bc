"""The training loop every method shares: AdamW, cosine schedules, accumulation, bf16, DDP, checkpoints.

It follows the engines of MAE (He et al., 2022) and DINO (Caron et al., 2021): AdamW
(Loshchilov and Hutter, 2019) without weight decay on biases, norms and tokens; learning rate
and weight decay precomputed per optimisation step (linear warm-up, then cosine); the base
learning rate scaled linearly with the batch (Goyal et al., 2017):

    lr = blr * batch_size * accum_steps * world_size / 256

where ``batch_size`` is per process. The loop knows nothing of any method. It relies on the
method protocol only: an ``nn.Module`` with a ``backbone`` attribute, a
``training_step(batch) -> (loss, logs)`` and optionally

- ``on_before_optimizer_step(step, max_steps)``, called once the gradients of a step are
  complete and clipped, just before the optimizer uses them (DINO drops its frozen last
  layer's gradients there);
- ``on_step_end(step, max_steps)``, called after every optimizer step with the index
  (0 .. max_steps - 1) of the step just taken;
- ``export_backbone() -> (name, module)``, the backbone to evaluate and ship when it is not
  ``backbone`` (DINO: its EMA teacher); ``exported_backbone(method)`` reads it.

What a user can count on:

- Deterministic: fixed seeds, a sampler whose order depends only on (seed, epoch), a DataLoader
  with a seeded generator and ``drop_last=True``. With ``num_workers=0`` and fp32 on a CPU, a
  run stopped at any step (even by SIGKILL) and resumed with ``resume=True`` ends with the very
  same weights as one that never stopped.
- Nothing trained is lost: checkpoints every ``checkpoint_every`` steps and at the end; on
  Ctrl-C or SIGTERM the current step finishes, a checkpoint is saved and ``KeyboardInterrupt``
  is raised (a second Ctrl-C stops at once); on any other exception the last completed step
  is saved before re-raising. A non-finite loss or gradient raises ``FloatingPointError`` naming
  the step, before the weights are touched, and leaves the last good checkpoint as it is.
- Distributed: under ``torchrun`` the method is wrapped in DDP (gloo on CPU, NCCL on GPU),
  its BatchNorm layers turned into SyncBatchNorm on GPUs (``sync_batchnorm``; torch syncs no
  CPU tensors); only rank 0 writes files or shows progress.

``train`` reads as its steps: ``_set_up`` (processes, device, schedules, optimizer),
``_start_or_resume``, ``_wrap_model``, ``_make_loader``, then ``_run``, which repeats
``_train_step`` (``_forward_backward``, one collective, ``_optimizer_step``, ``_log_row``,
``_save``). Device, precision and seeding rules come from ``runtime``, the weight-decay rule
from ``optim.param_groups``; both are shared with ``probes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .distributed import all_reduce_sum, is_distributed
from .optim import clip_grad_per_param_, param_groups
from .runtime import (
    PRECISIONS,
    hardware,
    resolve_device,
    resolve_precision,
    seed_everything,
    setup_distributed,
    sync_batchnorm,
    to_device,
)
from .schedules import cosine_schedule

__all__ = [
    "TrainConfig",
    "train",
    "steps_per_epoch",
    "make_schedules",
    "exported_backbone",
]

CLIP_MODES = ("global", "per_param")
HISTORY_FILE = "history.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


# --------------------------------------------------------------------------- configuration
_SCHEDULE, _RUN = "schedule and optimiser", "how to run"  # TrainConfig's two sections of `vitssl pretrain --help`


def _field(default: Any, help: str, **metadata: Any) -> Any:
    """A TrainConfig field with its default, its check and its CLI option (see the comment in TrainConfig)."""
    return field(default=default, metadata={"help": help, **metadata})


def _check_number(name: str, value: Any, integer: bool, zero: bool, optional: bool) -> None:
    """Refuse a value that is not a finite number (an int if ``integer``) > 0 (>= 0 if ``zero``), or None if ``optional``."""
    if value is None and optional:
        return
    kinds = int if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value)
    if bad or not (value >= 0 if zero else value > 0):  # inf passes "> 0": one step at lr=inf
        raise ValueError(
            f"{name}={value!r} must be {'an int' if integer else 'a finite number'} "
            f"{'>=' if zero else '>'} 0{' or None' if optional else ''}"
        )


@dataclass
class TrainConfig:
    """Everything the loop needs; a run is given by exactly one of ``epochs`` or ``max_steps``.

    ``batch_size`` is per process; the peak learning rate is
    ``blr * batch_size * accum_steps * world_size / 256`` (``peak_lr``). ``min_lr`` is absolute.
    ``precision="auto"`` means bf16 autocast on a CUDA GPU that supports it, fp32 elsewhere (on
    CPUs too: ``runtime.resolve_precision``). ``out_dir=None`` writes nothing (no checkpoints, no history file).
    ``resume=True`` continues the newest checkpoint in ``out_dir`` (or starts fresh if there is
    none); without it an ``out_dir`` that already holds a checkpoint is refused.
    ``grad_clip`` with ``clip_mode="global"`` scales all gradients by one factor so that their
    joint norm is at most ``grad_clip`` (``clip_grad_norm_``); ``"per_param"`` clips each
    parameter's gradient on its own (DINO, ``clip_grad_per_param_``).
    """

    # Each field's metadata holds its check and how ``vitssl pretrain`` offers it (the CLI builds
    # one option per field from it):
    #   number    (whole numbers only, 0 allowed, None allowed); every number must be finite
    #   choices   the strings allowed;  switch: a bool (--name / --no-name on the command line)
    #   help      the option's help; "{default}" in it becomes the CLI's default
    #   group     the --help section;  exclusive: the options of one name exclude each other
    #   flag      the option when it is not --name-with-dashes (its dest is a --config key)
    #   cli_default   the CLI's default where it differs from this class's
    #   metavar, nargs   as argparse's
    epochs: int | None = _field(
        None, "passes over the data", number=(True, False, True), group=_SCHEDULE, exclusive="length", metavar="N"
    )
    max_steps: int | None = _field(
        None,
        "optimizer steps (instead of --epochs)",
        number=(True, False, True),
        group=_SCHEDULE,
        exclusive="length",
        flag="--steps",
        metavar="N",
    )
    batch_size: int = _field(
        64,
        "images per step per process (default: {default})",
        number=(True, False, False),
        group=_SCHEDULE,
        cli_default=128,
        metavar="N",
    )
    blr: float = _field(
        5e-4,
        "base learning rate for a batch of 256 (default: {default})",
        number=(False, False, False),
        group=_SCHEDULE,
        flag="--lr",
        metavar="BLR",
    )
    min_lr: float = _field(
        0.0,
        "final learning rate of the cosine (default: {default})",
        number=(False, True, False),
        group=_SCHEDULE,
        cli_default=1e-6,
    )
    warmup_steps: int | None = _field(
        None, "linear warm-up length in steps", number=(True, True, True), group=_SCHEDULE, exclusive="warm-up"
    )
    warmup_epochs: float | None = _field(
        None,
        "linear warm-up length in epochs (default: none)",
        number=(False, True, True),
        group=_SCHEDULE,
        exclusive="warm-up",
    )
    weight_decay: float = _field(
        0.05, "AdamW weight decay (default: {default})", number=(False, True, False), group=_SCHEDULE
    )
    weight_decay_end: float | None = _field(
        None,
        "final weight decay of a cosine schedule (default: constant)",
        number=(False, True, True),
        group=_SCHEDULE,
    )
    betas: tuple[float, float] = _field(
        (0.9, 0.999), "AdamW betas (default: 0.9 0.999)", group=_SCHEDULE, nargs=2, metavar=("B1", "B2")
    )  # checked in __post_init__: two numbers in [0, 1)
    grad_clip: float | None = _field(
        None, "clip the gradient norm (default: off)", number=(False, False, True), group=_SCHEDULE, metavar="NORM"
    )
    clip_mode: str = _field(
        "global",
        "global: one factor from the joint norm of all gradients; per_param: each parameter's gradient "
        "on its own, as DINO (default: {default})",
        choices=CLIP_MODES,
        group=_SCHEDULE,
    )
    accum_steps: int = _field(
        1,
        "micro-batches per optimizer step (default: {default})",
        number=(True, False, False),
        group=_SCHEDULE,
        metavar="N",
    )
    precision: str = _field(
        "auto",
        "bf16 autocast or fp32; auto: bf16 on a GPU with bf16, fp32 on CPUs, where bf16 slows "
        "vit_mini_28 to 0.82x (benchmarks/precision_speed.py); bf16 forces it anywhere (default: {default})",
        choices=PRECISIONS,
        group=_RUN,
    )
    compile: bool = _field(False, "torch.compile the training step", switch=True, group=_RUN)
    seed: int = _field(0, "seed of every RNG (default: {default})", number=(True, True, False), group=_RUN, metavar="N")
    num_workers: int = _field(
        0,
        "DataLoader worker processes; 0 makes a resumed run bit-identical (default: {default})",
        number=(True, True, False),
        group=_RUN,
        metavar="N",
    )
    out_dir: str | None = _field(
        None,
        "folder for checkpoints, history.jsonl and the backbone (required); one run at a time: "
        "a second run on a folder in use is refused",
        group=_RUN,
        flag="--out",
        metavar="DIR",
    )  # checked in __post_init__: a path or None
    checkpoint_every: int | None = _field(
        1000, "default: {default} (and at the end)", number=(True, False, True), group=_RUN, metavar="STEPS"
    )
    log_every: int = _field(
        10,
        "history row every STEPS (default: {default})",
        number=(True, False, False),
        group=_RUN,
        metavar="STEPS",
    )
    progress: bool = _field(True, "progress bar (default: on)", switch=True, group=_RUN)
    resume: bool = _field(False, "continue the checkpoint in --out", switch=True, group=_RUN)
    device: str = _field(
        "auto", "auto, cpu, cuda or cuda:N (default: auto = the GPU if there is one)", group=_RUN
    )  # checked in __post_init__ by runtime.resolve_device

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError(f"give exactly one of epochs={self.epochs!r} and max_steps={self.max_steps!r}")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError(
                f"give at most one of warmup_steps={self.warmup_steps!r} and warmup_epochs={self.warmup_epochs!r}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "number" in f.metadata:
                _check_number(f.name, value, *f.metadata["number"])
            elif "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"{f.name}={value!r} is not one of {f.metadata['choices']}")
            elif f.metadata.get("switch") and not isinstance(value, bool):
                raise ValueError(f"{f.name}={value!r} must be a bool")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={self.betas!r} must be two numbers in [0, 1), e.g. (0.9, 0.999)")
        self.betas = (float(betas[0]), float(betas[1]))
        if self.out_dir is not None and not isinstance(self.out_dir, (str, os.PathLike)):
            raise ValueError(f"out_dir={self.out_dir!r} must be a path or None")
        if self.out_dir is not None:
            self.out_dir = os.fspath(self.out_dir)
        if self.resume and self.out_dir is None:
            raise ValueError("resume=True needs out_dir, the folder whose checkpoint to continue")
        resolve_device(self.device)  # validates

    def peak_lr(self, world_size: int = 1) -> float:
        """The learning rate after warm-up: ``blr * batch_size * accum_steps * world_size / 256``."""
        return self.blr * self.batch_size * self.accum_steps * world_size / 256


# --------------------------------------------------------------------------- optimizer and schedules
def steps_per_epoch(num_samples: int, config: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps in one pass: each process gets num_samples // world_size, in full batches."""
    per_step = config.batch_size * config.accum_steps * world_size
    steps = (num_samples // world_size) // config.batch_size // config.accum_steps
    if steps == 0:
        raise ValueError(
            f"the dataset has {num_samples} samples, fewer than one step needs: batch_size={config.batch_size} "
            f"x accum_steps={config.accum_steps} x {world_size} process(es) = {per_step} "
            "(incomplete batches are dropped)"
        )
    return steps


def make_schedules(
    config: TrainConfig, total_steps: int, epoch_steps: int, world_size: int = 1
) -> tuple[Tensor, Tensor]:
    """(lr, weight decay), each a float64 (total_steps,) tensor: linear warm-up then cosine for lr; cosine for wd."""
    if config.warmup_steps is not None:
        warmup = config.warmup_steps
    elif config.warmup_epochs is not None:
        warmup = round(config.warmup_epochs * epoch_steps)
    else:
        warmup = 0
    if warmup > total_steps:
        raise ValueError(
            f"the warm-up ({warmup} steps) is longer than the run ({total_steps} steps); "
            "shorten warmup_steps / warmup_epochs"
        )
    lr = cosine_schedule(config.peak_lr(world_size), config.min_lr, total_steps, warmup_steps=warmup)
    wd_end = config.weight_decay if config.weight_decay_end is None else config.weight_decay_end
    wd = cosine_schedule(config.weight_decay, wd_end, total_steps)
    return lr, wd


# --------------------------------------------------------------------------- small helpers of the loop
class _StepModule(nn.Module):
    """Makes ``training_step`` the forward, so DDP (which arms its gradient sync in forward) and compile see it."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        return self.method.training_step(batch)


class _ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (``start`` samples of this rank skipped).

    Used in one process too (num_replicas=1), so the order of samples depends only on
    (seed, epoch): N processes with batch b see, step by step, the same samples as one with N*b.
    """

    start: int = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class _StopSignals:
    """While active, a first SIGINT / SIGTERM only sets ``requested``; a second SIGINT raises at once.

    Handlers are installed only in the main thread and only over the default ones, so a caller's
    own handler is left alone.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.getsignal(sig)
                if old in (signal.default_int_handler, signal.SIG_DFL):
                    self._old[sig] = old
                    signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.requested = signal.Signals(signum).name

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def _check_method(method: Any) -> None:
    if not isinstance(method, nn.Module):
        raise TypeError(f"method must be an nn.Module following the method protocol, got {type(method).__name__}")
    if not isinstance(getattr(method, "backbone", None), nn.Module):
        raise TypeError(f"method {type(method).__name__} has no `backbone` module (the protocol needs one)")
    if not callable(getattr(method, "training_step", None)):
        raise TypeError(f"method {type(method).__name__} has no training_step(batch) -> (loss, logs)")


def exported_backbone(method: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the backbone to evaluate and ship: ``method.export_backbone()`` if the method
    defines it (DINO: ``("teacher", method.teacher_backbone)``), else ``("backbone", method.backbone)``."""
    _check_method(method)
    export = getattr(method, "export_backbone", None)
    if not callable(export):
        return "backbone", method.backbone
    found = export()
    if not (
        isinstance(found, tuple) and len(found) == 2 and isinstance(found[0], str) and isinstance(found[1], nn.Module)
    ):
        raise TypeError(
            f"{type(method).__name__}.export_backbone() must return (name, nn.Module), got {type(found).__name__}"
        )
    return found


def _read_history(path: Path, rows: int) -> list[dict[str, Any]]:
    """The first ``rows`` rows of history.jsonl (rows written after the checkpoint are dropped)."""
    history: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if len(history) == rows:
                break
            try:
                history.append(json.loads(line))
            except ValueError:  # a line cut short by a crash: nothing after it is trusted
                break
    if len(history) < rows:
        warnings.warn(
            f"{path} holds {len(history)} complete rows, the checkpoint expected {rows}; "
            "the history before the resume is incomplete",
            stacklevel=5,
        )  # train's caller
    return history


def _warn_config_changes(saved: dict[str, Any], config: TrainConfig) -> None:
    ignore = {"resume", "progress", "out_dir", "device", "num_workers", "compile", "log_every", "checkpoint_every"}
    now = dataclasses.asdict(config)
    changed = [
        f"{k}: {saved[k]!r} -> {now[k]!r}"
        for k in now
        if k in saved
        and k not in ignore
        and (list(saved[k]) if isinstance(saved[k], tuple) else saved[k])
        != (list(now[k]) if isinstance(now[k], tuple) else now[k])
    ]
    if changed:
        warnings.warn(
            "resuming with a config that differs from the checkpoint's ("
            + "; ".join(changed)
            + "); the schedules follow the new config",
            stacklevel=5,
        )  # train's caller


def _same_on_all_ranks(value: int, device: torch.device, what: str) -> None:
    if not is_distributed():
        return
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)  # integers, exactly (and MPS has no float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[0].item() != -t[1].item():
        raise RuntimeError(
            f"the processes disagree on {what} (min {-t[1].item():.0f}, max {t[0].item():.0f}); "
            "out_dir must be on a file system that every node sees"
        )


def _state_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor]) -> str:
    """'2 missing keys (a, b), 1 unexpected key (c), ...': how ``found`` differs from ``expected``, a few names each."""
    kinds = (
        ("missing", [k for k in expected if k not in found]),
        ("unexpected", [k for k in found if k not in expected]),
        ("of another shape", [k for k in expected if k in found and expected[k].shape != found[k].shape]),
    )
    return (
        ", ".join(
            f"{len(keys)} key(s) {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for kind, keys in kinds
            if keys
        )
        or "keys of another dtype"
    )


def _non_finite(what: str, value: float, step: int, total: int, epoch: int, saved: Path | None) -> FloatingPointError:
    """The error for a non-finite loss or gradient norm at 0-based ``step``; ``saved``: the checkpoints, if any."""
    kept = (
        f"the last checkpoint ({latest_checkpoint(saved)}) is kept"
        if saved is not None
        else "no checkpoint had been saved yet"
    )
    return FloatingPointError(
        f"{what} is {value} at step {step + 1} of {total} (epoch {epoch}); the weights were not updated and "
        f"{kept}. Lower the learning rate, set grad_clip, or use precision='fp32'."
    )


# --------------------------------------------------------------------------- the loop's state
def _empty_interval() -> dict[str, Any]:
    """The sums since the last history row (checkpoints carry them, so a resumed row averages the same steps)."""
    return {"steps": 0, "loss": 0.0, "grad_norm": 0.0, "logs": {}}


@dataclass
class _Setup:
    """What ``train`` fixes once: processes, device, schedules, optimizer, model wrappers and data."""

    method: nn.Module
    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    bf16: bool
    epoch_steps: int
    total: int
    lr_schedule: Tensor
    wd_schedule: Tensor
    groups: list[dict[str, Any]]
    optimizer: torch.optim.Optimizer
    out: Path | None
    ckpt_root: Path | None
    callback: Callable[[dict[str, Any]], None] | None = None
    batch_transform: Callable[[Any], Any] | None = None
    epoch_end: Callable[[int], dict[str, float] | None] | None = None
    # set by _wrap_model and _make_loader
    model: nn.Module | None = None
    ddp: DistributedDataParallel | None = None
    sampler: _ResumableSampler | None = None
    generator: torch.Generator | None = None
    loader: DataLoader | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def params(self) -> list[Tensor]:
        return [p for g in self.groups for p in g["params"]]

    @property
    def images_per_step(self) -> int:
        return self.config.batch_size * self.config.accum_steps * self.world


@dataclass
class _RunState:
    """Where the run is: the position checkpoints save, and what one call of ``train`` tracks besides."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    pos: int = 0  # optimizer steps done in this epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    interval: dict[str, Any] = field(default_factory=_empty_interval)
    segments: list[dict[str, Any]] = field(default_factory=list)  # one per start or resume
    last_saved: int | None = None  # the step of the newest checkpoint, None before the first
    rng_snapshot: dict[str, Any] | None = None  # the RNGs as they are at the start of step `step`
    updating: bool = False  # True while weights are half-way through an update: nothing may be saved then
    batches: Iterator | None = None
    t_start: float = 0.0
    t_last: float = 0.0
    bar: Any = None
    history_file: Any = None
    monitor: dict[str, float] = field(default_factory=dict)  # epoch_end's latest metrics, for the bar
    stop: _StopSignals = field(default_factory=_StopSignals)


# --------------------------------------------------------------------------- the loop, step by step
def train(
    method: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    callback: Callable[[dict[str, Any]], None] | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    epoch_end: Callable[[int], dict[str, float] | None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``method`` on ``dataset``; return the history (one dict per logged step).

    Each history row holds ``step`` (optimizer steps done), ``epoch`` (fractional), ``loss``,
    ``lr``, ``wd``, ``img_per_s`` (all processes together), ``grad_norm`` when clipping (the
    joint norm before clipping), and the method's logs, averaged over the steps since the
    previous row (``loss`` over all processes, the method's logs over this process's batches).
    With ``out_dir`` the rows also go to ``out_dir/history.jsonl`` and checkpoints to
    ``out_dir/checkpoints``.
    ``callback(row)`` is called on rank 0 after each row. ``batch_transform(batch) -> batch``
    runs on every collated batch once it is on the training device, without gradients: batched
    augmentation (``vitssl_core.batch_augment.BatchViews``) that draws from torch's RNG, so
    resuming stays exact. Rank 0 returns the whole history
    (also the rows from before a resume); other processes return the rows of this call.
    ``epoch_end(epoch) -> {name: number} or None`` is called on rank 0 after each full epoch
    (``epoch`` = epochs done), before that step's checkpoint, while the other ranks wait; what it
    returns becomes a row ``{"step", "epoch", **metrics}`` of the history and the progress bar (a
    monitor such as ``features.KNNMonitor``). The trainer restores every RNG after it and keeps its
    time out of ``img_per_s``, so a run's weights do not depend on it.
    """
    _check_train_args(method, dataset, config, callback, batch_transform)
    if epoch_end is not None and not callable(epoch_end):
        raise TypeError(f"epoch_end={epoch_end!r} must be callable or None")
    setup = _set_up(method, dataset, config)
    setup.callback, setup.batch_transform, setup.epoch_end = callback, batch_transform, epoch_end
    state = _start_or_resume(setup)
    _wrap_model(setup)
    _make_loader(setup, dataset)
    return _run(setup, state)


def _check_train_args(method: Any, dataset: Any, config: Any, callback: Any, batch_transform: Any) -> None:
    _check_method(method)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r} must be callable or None")
    if batch_transform is not None and not callable(batch_transform):
        raise TypeError(f"batch_transform={batch_transform!r} must be callable or None")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"dataset must be a map-style Dataset (with __len__ and __getitem__), got {type(dataset).__name__}"
        )


def _set_up(method: nn.Module, dataset: Dataset, config: TrainConfig) -> _Setup:
    """Processes, device and precision; the run's length, schedules and optimizer."""
    info = setup_distributed()
    device = resolve_device(config.device)
    bf16 = resolve_precision(config.precision, device) == "bf16"
    method.to(device)
    method.train()

    world = info.world_size
    epoch_steps = steps_per_epoch(len(dataset), config, world)
    total = config.max_steps if config.max_steps is not None else config.epochs * epoch_steps
    lr_schedule, wd_schedule = make_schedules(config, total, epoch_steps, world)
    groups = param_groups(method, config.weight_decay)
    # The fused kernel updates every tensor in one pass: 2.2x faster than the per-tensor loop on a
    # CPU for vit_mini_28 (benchmarks/method_speed.py counts it in "update"), the same maths.
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=float(lr_schedule[0]), betas=config.betas, fused=fused)
    out = Path(config.out_dir) if config.out_dir is not None else None
    return _Setup(
        method=method,
        config=config,
        rank=info.rank,
        world=world,
        device=device,
        bf16=bf16,
        epoch_steps=epoch_steps,
        total=total,
        lr_schedule=lr_schedule,
        wd_schedule=wd_schedule,
        groups=groups,
        optimizer=optimizer,
        out=out,
        ckpt_root=out / CHECKPOINT_DIR if out is not None else None,
    )


def _start_or_resume(setup: _Setup) -> _RunState:
    """A fresh state (seeded), or the newest checkpoint's; then the run's files are (re)written."""
    config, root = setup.config, setup.ckpt_root
    found = latest_checkpoint(root) if root is not None and root.is_dir() else None
    if found is not None and not config.resume:
        raise FileExistsError(
            f"out_dir={config.out_dir!r} already holds a checkpoint ({found}); pass resume=True "
            "to continue it, or choose another out_dir"
        )
    if found is not None:
        state = _resume(setup, found)
    else:
        state = _RunState()
        seed_everything(config.seed + setup.rank)
    _same_on_all_ranks(state.step, setup.device, "the step to start from")
    if state.step > setup.total:
        raise ValueError(f"the checkpoint is at step {state.step}, beyond this config's {setup.total} steps")
    if setup.main and setup.out is not None:
        setup.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(setup.out / HISTORY_FILE, "".join(json.dumps(r) + "\n" for r in state.history).encode())
        if found is None:
            atomic_write_json(
                setup.out / CONFIG_FILE,
                {
                    **dataclasses.asdict(config),
                    "world_size": setup.world,
                    "peak_lr": config.peak_lr(setup.world),
                    "total_steps": setup.total,
                    "steps_per_epoch": setup.epoch_steps,
                    "precision_used": "bf16" if setup.bf16 else "fp32",
                },
            )
    return state


# What _resume reads from state.pt (written by _save).
_STATE_KEYS = ("optimizer", "step", "epoch", "pos", "interval", "rng", "history_len", "config", "world_size")


def _resume(setup: _Setup, found: Path) -> _RunState:
    """Weights, optimizer, position, RNGs and history from the checkpoint ``found``."""
    method, world, rank = setup.method, setup.world, setup.rank
    weights, saved = load_checkpoint(found)
    lacking = [k for k in _STATE_KEYS if k not in saved]
    if lacking:  # an edited or foreign state.pt: say so, not KeyError
        raise ValueError(
            f"{found / 'state.pt'} lacks {', '.join(map(repr, lacking))}: it was not written by "
            "vitssl's trainer, or was edited; resume from another checkpoint or start again in another out_dir"
        )
    try:
        method.load_state_dict(weights)
    except RuntimeError as err:  # torch lists every key; say in one line what does not fit
        raise ValueError(
            f"the checkpoint {found} does not fit this {type(method).__name__}: "
            f"{_state_mismatch(method.state_dict(), weights)}; resume with the method, model and "
            "method arguments that wrote it, or choose another out_dir"
        ) from err
    try:
        setup.optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, TypeError) as err:  # torch: "a different number of parameter groups", ...
        raise ValueError(
            f"the optimizer state in {found / 'state.pt'} does not fit this run ({err}); resume with the "
            "method and settings that wrote it, or start again in another out_dir"
        ) from None
    state = _RunState(
        step=saved["step"],
        epoch=saved["epoch"],
        pos=saved["pos"],
        interval=saved["interval"],
        segments=list(saved.get("segments", [])),
        last_saved=saved["step"],
    )
    if len(saved["rng"]) == world:
        set_rng_state(saved["rng"][rank])
    else:  # an emergency save of a multi-process run holds rank 0's RNG only
        seed_everything(setup.config.seed + rank + 7919 * state.step)
        if rank != 0:
            warnings.warn(
                f"the checkpoint holds RNG states for {len(saved['rng'])} process(es), not {world}; "
                "process RNGs were reseeded",
                stacklevel=4,
            )
    if setup.main:  # the history file and the warnings are rank 0's business
        state.history = _read_history(setup.out / HISTORY_FILE, saved["history_len"])
        _warn_config_changes(saved["config"], setup.config)
    if setup.main and saved["world_size"] != world:
        warnings.warn(
            f"the checkpoint was written by {saved['world_size']} process(es), this run has {world}: "
            "the global batch and the order of samples change",
            stacklevel=4,
        )
    return state


def _wrap_model(setup: _Setup) -> None:
    """The module each micro-batch runs: the method's training_step, under DDP and compile if asked."""
    if is_distributed():  # BatchNorm over the global batch: SyncBN on GPUs (a no-op on CPUs, see sync_batchnorm)
        setup.method = sync_batchnorm(setup.method, setup.device)
    model: nn.Module = _StepModule(setup.method)
    if is_distributed():
        device = setup.device
        setup.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        model = setup.ddp
    if setup.config.compile:
        model = torch.compile(model)
    setup.model = model


def _make_loader(setup: _Setup, dataset: Dataset) -> None:
    """A sampler whose order depends only on (seed, epoch) and a loader with its own seeded generator."""
    config = setup.config
    setup.sampler = _ResumableSampler(
        dataset, num_replicas=setup.world, rank=setup.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    setup.generator = torch.Generator()
    setup.loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=setup.sampler,
        num_workers=config.num_workers,
        drop_last=True,
        generator=setup.generator,
        pin_memory=setup.device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )


def _run(setup: _Setup, state: _RunState) -> list[dict[str, Any]]:
    """Steps until the end; on an interruption or error the last completed step is saved first."""
    state.segments.append(
        {
            "hardware": hardware(setup.device),
            "world_size": setup.world,
            "precision": "bf16" if setup.bf16 else "fp32",
            "from_step": state.step,
            "to_step": state.step,
            "seconds": 0.0,
        }
    )
    state.t_start = time.perf_counter()
    state.rng_snapshot = rng_state()
    state.bar = tqdm(
        total=setup.total,
        initial=state.step,
        disable=not (setup.config.progress and setup.main),
        unit="step",
        dynamic_ncols=True,
    )
    state.history_file = open(setup.out / HISTORY_FILE, "a") if setup.main and setup.out is not None else None
    state.t_last = time.perf_counter()
    try:
        with state.stop:
            while state.step < setup.total:
                _train_step(setup, state)
    except FloatingPointError:
        raise
    except BaseException as err:
        _save_after_error(setup, state, err)
        if state.stop.requested is not None and not isinstance(err, KeyboardInterrupt):
            raise KeyboardInterrupt(f"training stopped by {state.stop.requested} at step {state.step}") from err
        raise
    finally:
        state.bar.close()
        if state.history_file is not None:
            state.history_file.close()
        state.batches = None
    return state.history


def _train_step(setup: _Setup, state: _RunState) -> None:
    """One optimizer step: micro-batches, one collective, checks, update, then the row and checkpoint due."""
    if state.batches is None:  # a new epoch, or the rest of one after a resume
        _start_epoch(setup, state)
    loss_sum, logs = _forward_backward(setup, state)
    # one collective: the loss averaged over processes, and whether any process was told to stop
    stopping = torch.tensor(float(state.stop.requested is not None), device=setup.device)
    reduced = all_reduce_sum(torch.stack([loss_sum / setup.config.accum_steps, stopping]))
    loss_value = reduced[0].item() / setup.world
    stop_now = reduced[1].item() > 0
    if not math.isfinite(loss_value):
        raise _non_finite(
            "loss",
            loss_value,
            state.step,
            setup.total,
            state.epoch,
            setup.ckpt_root if state.last_saved is not None else None,
        )
    grad_norm = _optimizer_step(setup, state)
    state.bar.update(1)
    _accumulate(state, loss_value, grad_norm, logs)
    if state.step % setup.config.log_every == 0 or state.step == setup.total:
        _log_row(setup, state)
    if setup.epoch_end is not None and state.step % setup.epoch_steps == 0:
        _epoch_end(setup, state)
    every = setup.config.checkpoint_every
    if setup.ckpt_root is not None and (
        state.step == setup.total or stop_now or (every is not None and state.step % every == 0)
    ):
        rngs = _gather_rng(setup, state)
        if setup.main:
            _save(setup, state, rngs)
        state.last_saved = state.step
    if stop_now:
        where = f"; checkpoint saved in {setup.ckpt_root}, continue with resume=True" if setup.ckpt_root else ""
        raise KeyboardInterrupt(
            f"training stopped by {state.stop.requested or 'another process'} after step {state.step}{where}"
        )


def _start_epoch(setup: _Setup, state: _RunState) -> None:
    """Batches from ``state.pos`` of the epoch on, in the order that depends only on (seed, epoch, rank)."""
    config = setup.config
    if state.pos >= setup.epoch_steps:
        state.epoch, state.pos = state.epoch + 1, 0
    setup.sampler.set_epoch(state.epoch)
    setup.sampler.start = state.pos * config.accum_steps * config.batch_size
    setup.generator.manual_seed(
        int(np.random.SeedSequence([config.seed, state.epoch, setup.rank]).generate_state(1)[0])
    )
    state.batches = iter(setup.loader)


def _forward_backward(setup: _Setup, state: _RunState) -> tuple[Tensor, dict[str, float]]:
    """Gradients of one step summed over ``accum_steps`` micro-batches; (summed loss, mean logs)."""
    config, device, method = setup.config, setup.device, setup.method
    loss_sum = torch.zeros((), device=device)
    logs_sum: dict[str, float] = {}
    for micro in range(config.accum_steps):
        batch = to_device(next(state.batches), device)
        if setup.batch_transform is not None:
            with torch.no_grad():
                batch = setup.batch_transform(batch)
        last_micro = micro == config.accum_steps - 1
        # gradients are reduced across processes only with the last micro-batch
        with setup.ddp.no_sync() if setup.ddp is not None and not last_micro else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16) if setup.bf16 else contextlib.nullcontext():
                loss, logs = setup.model(batch)
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise TypeError(
                    f"{type(method).__name__}.training_step must return (scalar Tensor, dict); "
                    f"got a loss of type {type(loss).__name__}"
                )
            (loss.float() / config.accum_steps).backward()
        loss_sum += loss.detach().float()
        for k, v in logs.items():
            logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / config.accum_steps
    return loss_sum, logs_sum


def _optimizer_step(setup: _Setup, state: _RunState) -> float | None:
    """Schedules, clipping, the finite-gradient check, the method's hooks and AdamW; the norm if clipped."""
    config, method, optimizer, step = setup.config, setup.method, setup.optimizer, state.step
    for group in optimizer.param_groups:
        group["lr"] = float(setup.lr_schedule[step])
        group["weight_decay"] = float(setup.wd_schedule[step]) if group["apply_wd"] else 0.0
    params = setup.params
    grad_norm = None
    if config.grad_clip is not None:
        clip = torch.nn.utils.clip_grad_norm_ if config.clip_mode == "global" else clip_grad_per_param_
        grad_norm = float(clip(params, config.grad_clip))
    # A finite loss can still have non-finite gradients (an overflow in the backward); they must
    # not reach AdamW either. Their joint norm is non-finite then: the clip's, or one fused pass.
    # Under DDP every process holds the same reduced gradients, so all of them stop together.
    norm = (
        grad_norm
        if grad_norm is not None
        else float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    )
    if not math.isfinite(norm):
        raise _non_finite(
            "gradient norm",
            norm,
            step,
            setup.total,
            state.epoch,
            setup.ckpt_root if state.last_saved is not None else None,
        )
    if callable(getattr(method, "on_before_optimizer_step", None)):
        method.on_before_optimizer_step(step, setup.total)
    state.updating = True
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if callable(getattr(method, "on_step_end", None)):
        method.on_step_end(step, setup.total)
    state.step, state.pos = step + 1, state.pos + 1
    state.updating = False
    state.rng_snapshot = rng_state()
    if state.pos >= setup.epoch_steps:
        state.batches = None  # never fetch past the epoch's last full step
    return grad_norm


def _accumulate(state: _RunState, loss_value: float, grad_norm: float | None, logs: dict[str, float]) -> None:
    interval = state.interval
    interval["steps"] += 1
    interval["loss"] += loss_value
    interval["grad_norm"] += grad_norm or 0.0
    for k, v in logs.items():
        interval["logs"][k] = interval["logs"].get(k, 0.0) + v


def _log_row(setup: _Setup, state: _RunState) -> None:
    """The interval's means as one history row: to the history, the file, the bar and the callback."""
    now = time.perf_counter()
    interval, step = state.interval, state.step
    n = interval["steps"]
    row = {k: v / n for k, v in interval["logs"].items()}
    row.update(
        step=step,
        epoch=round(step / setup.epoch_steps, 4),
        loss=interval["loss"] / n,
        lr=float(setup.lr_schedule[step - 1]),
        wd=float(setup.wd_schedule[step - 1]),
        img_per_s=n * setup.images_per_step / max(now - state.t_last, 1e-9),
        wall_s=round(sum(g["seconds"] for g in state.segments[:-1]) + now - state.t_start, 1),
    )
    if setup.config.grad_clip is not None:
        row["grad_norm"] = interval["grad_norm"] / n
    _append_row(state, row)
    state.interval = _empty_interval()
    state.t_last = now
    state.bar.set_postfix(
        loss=f"{row['loss']:.4f}",
        lr=f"{row['lr']:.2e}",
        img_s=f"{row['img_per_s']:.0f}",
        **{k: f"{v:.4g}" for k, v in state.monitor.items()},
        refresh=False,
    )
    if setup.callback is not None and setup.main:
        setup.callback(row)
    state.rng_snapshot = rng_state()  # a callback may draw random numbers: resume after it


def _epoch_end(setup: _Setup, state: _RunState) -> None:
    """Rank 0 runs ``epoch_end`` with every RNG saved and restored; its metrics become a history row."""
    metrics = None
    if setup.main:
        started, rngs = time.perf_counter(), rng_state()
        try:
            metrics = setup.epoch_end(state.step // setup.epoch_steps)
        finally:
            set_rng_state(rngs)  # the training streams go on as if nothing had run
            state.t_last += time.perf_counter() - started  # not counted against the training's img/s
    if is_distributed():
        dist.barrier()  # the other ranks wait for rank 0's monitor
    if not metrics:
        return
    _append_row(state, {"step": state.step, "epoch": round(state.step / setup.epoch_steps, 4), **metrics})
    state.monitor = dict(metrics)
    state.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)


def _append_row(state: _RunState, row: dict[str, Any]) -> None:
    """One history row: kept in memory and appended, flushed, to history.jsonl (when the run writes one)."""
    state.history.append(row)
    if state.history_file is not None:
        state.history_file.write(json.dumps(row) + "\n")
        state.history_file.flush()


def _gather_rng(setup: _Setup, state: _RunState) -> list[dict[str, Any]]:
    """Every process's RNG snapshot, in rank order (a collective under DDP)."""
    if not is_distributed():
        return [state.rng_snapshot]
    states: list[Any] = [None] * setup.world
    dist.all_gather_object(states, state.rng_snapshot)
    return states


def _save(setup: _Setup, state: _RunState, rng_states: list[dict[str, Any]]) -> None:
    """A checkpoint of step ``state.step``: weights, optimizer, position, RNGs and this segment's time."""
    state.segments[-1].update(to_step=state.step, seconds=round(time.perf_counter() - state.t_start, 1))
    saved = {
        "format": 1,
        "step": state.step,
        "epoch": state.epoch,
        "pos": state.pos,
        "optimizer": setup.optimizer.state_dict(),
        "rng": rng_states,
        "config": dataclasses.asdict(setup.config),
        "history_len": len(state.history),
        "interval": state.interval,
        "world_size": setup.world,
        "torch_version": str(torch.__version__),
        "segments": state.segments,
    }
    save_checkpoint(setup.ckpt_root, state.step, setup.method.state_dict(), saved)


def _save_after_error(setup: _Setup, state: _RunState, err: BaseException) -> None:
    """Save the last completed step if no checkpoint holds it yet, and say so in a note on ``err``."""
    step = state.step
    if setup.main and setup.ckpt_root is not None and not state.updating and step > 0 and state.last_saved != step:
        try:
            _save(setup, state, [state.rng_snapshot])  # no collective here: another process may be gone
        except Exception as save_err:  # the original error matters more; say what happened
            err.add_note(f"vitssl: saving a checkpoint at step {step} failed too: {save_err!r}")
        else:
            err.add_note(f"vitssl: checkpoint of step {step} saved in {setup.ckpt_root}; continue with resume=True")
