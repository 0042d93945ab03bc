"""Checkpoints that survive a crash, and backbones that load anywhere.

Weights go to safetensors (Hugging Face's format: tensors and a JSON header, nothing that can
run code when read). The training state (optimizer moments, step, epoch, position in the epoch,
RNG states, config) goes to ``state.pt``, read back only with ``torch.load(weights_only=True)``,
which refuses any pickle that would build an arbitrary Python object.

A training run's checkpoints live in one folder (``train`` uses ``out_dir/checkpoints``)::

    checkpoints/step_00001000/model.safetensors   the method's full state dict
    checkpoints/step_00001000/state.pt            optimizer, step, epoch, RNG states, config
    checkpoints/last.json                         {"step": 1000, "dir": "step_00001000"}

Every write is atomic. A step folder is written as ``step_XXXXXXXX.tmp/`` (each file flushed
and fsynced, then the folder fsynced) and renamed in one ``os.replace``; ``last.json`` is
replaced last, through a temporary file in the same folder. ``last.json`` is the commit point:
whenever a process dies (even by SIGKILL, or the machine loses power), ``last.json`` names a
complete, consistent (weights, state) pair, and a half-written ``.tmp`` folder is ignored and
later removed.

``save_backbone`` exports only the ViT, with timm's plain keys (``blocks.0.attn.qkv.weight``,
no ``backbone.`` prefix), so ``vitssl_core.ViT`` and timm's ``VisionTransformer`` built with the
same sizes both read ``load_backbone(path)`` with ``strict=True``. ``pretrained.load_pretrained`` reads
a shipped backbone with the JSON card beside it that says how to rebuild it.

``lock_folder`` holds an exclusive lock on a run folder (its ``.lock`` file) for a run's
lifetime, so two runs never write into one folder; ``remove_leftovers`` then deletes the
temporary files (``.last.json.tmp-<pid>``) that a killed process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import random
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

try:  # POSIX record locks: released when the process dies, not inherited by forked workers
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save as _st_save
from torch import Tensor, nn

from .runtime import mps_available


__all__ = [
    "UnsafeCheckpointError",
    "FolderBusyError",
    "lock_folder",
    "remove_leftovers",
    "atomic_write_bytes",
    "atomic_write_json",
    "save_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "save_backbone",
    "load_backbone",
]

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
POINTER_FILE = "last.json"
LOCK_FILE = ".lock"
_STEP_PREFIX = "step_"
_BACKBONE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)


class UnsafeCheckpointError(RuntimeError):
    """A ``state.pt`` holds Python objects that unpickling would have to construct (code could run)."""


# --------------------------------------------------------------------------- atomic files
def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; NTFS journals renames itself
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic by itself)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically: a reader sees the old file or the new one, never half.

    Temp file in the same folder, flush + fsync, ``os.replace``, fsync of the folder.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_durable(tmp, bytes(data))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``atomic_write_bytes`` of ``obj`` as indented JSON (plus a final newline)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# --------------------------------------------------------------------------- one run per folder
class FolderBusyError(RuntimeError):
    """Another process holds the lock on a run folder (``lock_folder``)."""


def _try_lock(fd: int) -> None:
    """Take an exclusive, non-blocking lock on the open file ``fd``; OSError if it cannot."""
    if fcntl is not None:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


@contextlib.contextmanager
def lock_folder(folder: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder/.lock`` while the ``with`` block runs; yields whether it is locked.

    ``fcntl.lockf`` (``msvcrt.locking`` on Windows): the kernel releases the lock when the process
    ends, even by SIGKILL, so a killed run never blocks the next one. The file names its holder
    (process id, host, start time). Raises ``FolderBusyError`` naming the holder if another process
    holds the lock, ``OSError`` if the file cannot be created. Where the file system cannot lock
    (some network file systems) it warns once and yields False. A process must not lock the same
    folder twice: closing either lock releases both.
    """
    path = Path(folder) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            _try_lock(fd)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN, errno.EDEADLK):  # ENOLCK, EOPNOTSUPP: no locks here
                warnings.warn(
                    f"cannot lock {path} ({err.strerror or err}); nothing stops a second run from writing "
                    "into this folder at the same time",
                    stacklevel=3,
                )
                yield False
                return
            try:
                os.lseek(fd, 0, os.SEEK_SET)  # (os.pread does not exist on Windows)
                holder = os.read(fd, 400).decode(errors="replace").strip() or "another process"
            except OSError:
                holder = "another process"
            raise FolderBusyError(f"{folder} is in use by {holder}") from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (since {started})\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes (``.NAME.tmp-<pid>``) in ``folder`` and its ``checkpoints/``.

    Only call it while holding ``lock_folder(folder)``: then no other process is writing them.
    Returns the files removed.
    """
    removed = []
    for sub in (Path(folder), Path(folder) / "checkpoints"):
        for tmp in sub.glob(".*.tmp-*") if sub.is_dir() else ():
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


# --------------------------------------------------------------------------- tensors for safetensors
def _plain_tensors(state: Mapping[str, Any], what: str) -> dict[str, Tensor]:
    """CPU, contiguous tensors that own their memory: what safetensors accepts (tied weights are copied)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(f"{what} must map str to torch.Tensor; {key!r} holds {type(value).__name__}")
        t = value.detach().cpu()
        storage = t.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()
        if shared or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


# --------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every global RNG state (torch, CUDA, NumPy, Python) as tensors, numbers and lists.

    That is what ``torch.load(weights_only=True)`` reads back, so it can go into ``state.pt``.
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "mps": [torch.mps.get_rng_state()] if mps_available() else [],
        "numpy": [
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [int(py_state[0]), list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the global RNGs from a ``rng_state()`` dict."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if state.get("mps") and mps_available():  # checkpoints written before MPS support have no "mps"
        torch.mps.set_rng_state(state["mps"][0].cpu())
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- training checkpoints
def _step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def save_checkpoint(
    root: str | os.PathLike, step: int, model_state: Mapping[str, Tensor], state: Mapping[str, Any], keep: int = 1
) -> Path:
    """Write ``root/step_XXXXXXXX/{model.safetensors, state.pt}`` atomically, then point ``last.json`` at it.

    ``model_state`` is a state dict (str -> Tensor); ``state`` may hold only tensors, numbers,
    strings, None and lists/tuples/dicts of those (what ``torch.load(weights_only=True)`` reads).
    The ``keep`` newest step folders are kept, older ones removed. Returns the step folder.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be an int >= 0")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep={keep!r} must be an int >= 1")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    weights = _st_save(_plain_tensors(model_state, "model_state"), metadata={"format": "pt", "step": str(step)})
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    try:  # refuse now what could not be read back later
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except pickle.UnpicklingError as err:
        raise TypeError(
            f"state holds objects that torch.load(weights_only=True) refuses; keep to tensors, "
            f"numbers, strings, None and lists/tuples/dicts of those ({_unpickling_detail(err)})"
        ) from err

    name = _step_dir_name(step)
    final, tmp = root / name, root / f"{name}.tmp"
    if latest_checkpoint(root) == final:
        raise ValueError(f"step={step} is the committed checkpoint in {root} already; it is never overwritten")
    if tmp.exists():  # left by a process that died while writing
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_durable(tmp / WEIGHTS_FILE, weights)
    _write_durable(tmp / STATE_FILE, buffer.getvalue())
    _fsync_dir(tmp)
    if final.exists():  # renamed but never committed by last.json: a crash came in between
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_json(root / POINTER_FILE, {"step": step, "dir": name})  # the commit point

    # Keep `final` and the keep - 1 newest earlier checkpoints; remove the rest, .tmp leftovers included.
    others = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX) and p != final)
    earlier = [p for p in others if not p.name.endswith(".tmp") and p.name < name]
    kept = set(earlier[len(earlier) - (keep - 1) :]) if keep > 1 else set()
    for old in others:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The step folder of the newest committed checkpoint under ``path``, or None if there is none.

    ``path`` may be a run folder (holding ``checkpoints/``), a checkpoints folder (holding
    ``last.json``) or a step folder itself.
    """
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() and (path / STATE_FILE).is_file():
        return path
    for folder in (path, path / "checkpoints"):
        pointer = folder / POINTER_FILE
        if pointer.is_file():
            try:
                name = json.loads(pointer.read_text())["dir"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{pointer} is not a checkpoint pointer ({err}); expected {{'step': .., 'dir': ..}}"
                ) from err
            step_dir = folder / name
            if not ((step_dir / WEIGHTS_FILE).is_file() and (step_dir / STATE_FILE).is_file()):
                raise FileNotFoundError(
                    f"{pointer} names {step_dir}, which lacks {WEIGHTS_FILE} or {STATE_FILE}: that checkpoint "
                    "was moved or deleted; restore it, or start again in another folder"
                )
            return step_dir
    return None


def _unpickling_detail(err: Exception) -> str:
    """The line of torch's weights-only error that names the refused global."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = next((line for line in lines if "GLOBAL" in line), lines[-1] if lines else type(err).__name__)
    return line.split(" Please use")[0]  # drop torch's advice to allow-list the class


# Pickle opcodes that import or build an arbitrary object: how a pickle runs code. The weights-only
# unpickler names a refused GLOBAL / STACK_GLOBAL in its message and reports these as "Unsupported operand".
_CODE_OPCODES = {ord("c"), ord("i"), ord("o"), ord("R"), 0x81, 0x82, 0x83, 0x84, 0x92, 0x93}


def _tries_to_run_code(err: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only refusal is of an object to import or build (else the bytes are just bad)."""
    text = str(err)
    if "GLOBAL" in text:
        return True
    operand = text.partition("Unsupported operand ")[2].split(maxsplit=1)
    return bool(operand) and operand[0].isdigit() and int(operand[0]) in _CODE_OPCODES


def _load_state(path: Path, map_location: str | torch.device) -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _tries_to_run_code(err):
            detail = next((line.strip() for line in str(err).splitlines() if "Unsupported operand" in line), "")
            raise ValueError(
                f"{path} is corrupt: it is not a training state torch.load can read "
                f"({detail or 'not a pickle'}); resume from another checkpoint or start again"
            ) from err
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors, numbers, strings and "
            f"containers, and unpickling them could run arbitrary code ({_unpickling_detail(err)}). Only load "
            f"training states written by vitssl; the weights in {WEIGHTS_FILE} are safe to read on their own."
        ) from err
    except (RuntimeError, EOFError, KeyError) as err:  # a truncated or damaged zip, or no zip at all
        if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err):
            raise  # e.g. map_location names a device this machine lacks
        detail = str(err).splitlines()[0].split(". This is an internal")[0] if str(err) else ""
        detail = detail if isinstance(err, RuntimeError) else f"{type(err).__name__} {detail}".strip()
        raise ValueError(
            f"{path} is corrupt or truncated: torch.load cannot read it ({detail}); resume from "
            "another checkpoint or start again"
        ) from err


def _read_safetensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """``safetensors.torch.load_file``, with errors that name the file."""
    try:
        return _st_load_file(path, device=device)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt") from err


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model state dict, training state) of the newest checkpoint under ``path`` (see ``latest_checkpoint``).

    Raises ``FileNotFoundError`` if there is none, ``UnsafeCheckpointError`` if ``state.pt``
    would need to run code to be read, ``ValueError`` naming the file if a file is corrupt.
    """
    step_dir = latest_checkpoint(path)
    if step_dir is None:
        raise FileNotFoundError(
            f"no checkpoint under {path}: expected {POINTER_FILE} (in it or in its checkpoints/ folder) "
            f"or a folder holding {WEIGHTS_FILE} and {STATE_FILE}"
        )
    state = _load_state(step_dir / STATE_FILE, map_location)
    if not isinstance(state, dict):
        raise ValueError(f"{step_dir / STATE_FILE} holds a {type(state).__name__}, expected a dict")
    weights = _read_safetensors(step_dir / WEIGHTS_FILE, device=str(map_location))
    return weights, state


# --------------------------------------------------------------------------- backbone export
def save_backbone(
    backbone: nn.Module,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the backbone's state dict (timm keys, no prefix) to a safetensors file, atomically.

    ``dtype`` (torch.float16, torch.bfloat16, torch.float32) casts floating tensors, e.g.
    float16 halves the file; None keeps them as they are. ``metadata`` (str -> str) goes into the
    safetensors header.
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module (a vitssl_core.ViT), got {type(backbone).__name__}")
    if dtype not in _BACKBONE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; use one of {_BACKBONE_DTYPES}")
    meta = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str; {key!r} holds {type(value).__name__}")
        meta[key] = value
    tensors = _plain_tensors(backbone.state_dict(), "backbone.state_dict()")
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    atomic_write_bytes(path, _st_save(tensors, metadata=meta))


def load_backbone(path: str | os.PathLike) -> dict[str, Tensor]:
    """The backbone state dict (timm keys) stored at ``path``, on CPU.

    ``path`` is a file written by ``save_backbone``, or a training checkpoint's
    ``model.safetensors``, whose ``backbone.*`` entries are returned without the prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r} is not a file; expected a .safetensors file from save_backbone")
    state = _read_safetensors(path)
    if "patch_embed.proj.weight" not in state and "backbone.patch_embed.proj.weight" in state:
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state
