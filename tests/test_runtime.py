"""Device, precision and seeding rules (vitssl_core/runtime.py), and the layering they allow."""

import ast
import importlib
import inspect
import pkgutil
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vitssl_core import runtime

PACKAGE = Path(runtime.__file__).parent


def test_to_device_moves_every_nested_tensor_and_keeps_the_containers():
    batch = ([torch.ones(2), torch.zeros(1)], {"labels": torch.arange(3), "name": "x"}, 7)
    moved = runtime.to_device(batch, "meta")
    assert isinstance(moved, tuple) and isinstance(moved[0], list) and isinstance(moved[1], dict)
    assert moved[0][0].device.type == "meta" and moved[1]["labels"].device.type == "meta"
    assert moved[1]["name"] == "x" and moved[2] == 7


def test_autocast_follows_the_precision_rule():
    a = torch.rand(4, 4)
    with runtime.autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with runtime.autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    with runtime.autocast("cpu", "auto"):  # fp32 on every CPU
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError, match="precision='half'"):
        runtime.autocast("cpu", "half")


def test_seed_everything_seeds_python_numpy_and_torch():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    runtime.seed_everything(3)
    first = draw()
    runtime.seed_everything(3)
    assert draw() == first
    with pytest.raises(ValueError, match="seed=-1"):
        runtime.seed_everything(-1)


def test_every_public_name_has_one_home():
    """A module's ``__all__`` lists the functions and classes it defines, never another module's."""
    found = 0
    for info in pkgutil.iter_modules([str(PACKAGE)]):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"vitssl_core.{info.name}")
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found += 1
                assert obj.__module__ == module.__name__, f"{module.__name__}.{name} is {obj.__module__}.{name}"
    assert found > 50  # the loop saw the package's modules at all


def _imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (relative imports), from the source."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = found
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen and name in graph:
            seen.add(name)
            todo += graph[name]
    return seen


EVALUATION = ("features", "probes", "paired", "interpret")


@pytest.mark.parametrize(
    "module, never",
    [
        ("validate", {"vit", "data", "train", "features", "probes", "recipes", "__main__"}),  # a leaf
        ("runtime", {"train", *EVALUATION, "recipes", "__main__"}),
        ("schedules", {"train", *EVALUATION, "recipes", "__main__", "runtime"}),
        ("optim", {"train", *EVALUATION, "vit", "recipes", "__main__"}),  # rules and a loop, no model
        *[(m, {"train", "recipes", "__main__"}) for m in EVALUATION],  # evaluation needs no trainer
        ("features", {"probes", "paired", "interpret"}),  # the others read features, not the reverse
        ("paired", {"features", "probes", "interpret", "vit"}),  # statistics on booleans, no model
        ("train", {*EVALUATION, "recipes", "__main__"}),  # the loop knows no concrete method
        ("recipes", {"train", *EVALUATION, "__main__"}),
    ],
)
def test_layers_point_one_way(module, never):
    reach = _reach(_imports(), module)
    assert module not in reach, f"{module} imports itself through {reach}"
    assert not reach & never


# --------------------------------------------------------------------------- Apple GPUs (MPS), by patching
# No Mac runs our tests: these patch availability and check the rules, not Metal itself.
def _machine(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


def test_auto_picks_cuda_then_mps_then_the_cpu(monkeypatch):
    _machine(monkeypatch, cuda=False, mps=True)
    assert runtime.resolve_device("auto") == torch.device("mps")
    assert runtime.resolve_precision("auto", "mps") == "fp32"  # fp32 on MPS: bf16 autocast is untested there
    _machine(monkeypatch, cuda=False, mps=False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    _machine(monkeypatch, cuda=True, mps=True)
    assert runtime.resolve_device("auto").type == "cuda"


def test_mps_is_refused_where_there_is_none_and_bf16_is_refused_on_it(monkeypatch):
    _machine(monkeypatch, cuda=False, mps=False)
    with pytest.raises(ValueError, match="MPS is not available on this machine"):
        runtime.resolve_device("mps")
    _machine(monkeypatch, cuda=False, mps=True)
    with pytest.raises(ValueError, match="bf16.*not supported on MPS"):
        runtime.resolve_precision("bf16", "mps")


def test_no_autocast_object_is_built_for_fp32(monkeypatch):
    built = []
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: built.append(a) or real(*a, **k))
    with runtime.autocast("cpu", "fp32"):
        pass
    assert built == []  # a device without autocast support (MPS in older torch) never sees one
    with runtime.autocast("cpu", "bf16"):
        pass
    assert built == [("cpu",)]


def test_the_cli_refuses_mps_where_there_is_none_in_one_line(monkeypatch, capsys):
    from vitssl_core.__main__ import main

    _machine(monkeypatch, cuda=False, mps=False)
    code = main(["pretrain", "--method", "simclr", "--steps", "1", "--device", "mps", "--out", "unused"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "MPS is not available" in err[0], err


def test_checkpoints_carry_the_mps_random_state(monkeypatch):
    from vitssl_core import checkpoint

    saved = torch.tensor([1, 2, 3], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(checkpoint, "mps_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: saved.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: restored.append(s))
    state = checkpoint.rng_state()
    assert torch.equal(state["mps"][0], saved)
    checkpoint.set_rng_state(state)
    assert torch.equal(restored[0], saved)
    older = {k: v for k, v in state.items() if k != "mps"}  # a checkpoint written before MPS support
    checkpoint.set_rng_state(older)
    assert len(restored) == 1
