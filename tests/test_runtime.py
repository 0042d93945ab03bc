"""Device, precision and seeding rules (vitssl_core/runtime.py), and the layering they allow."""

import ast
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vitssl_core import runtime
from vitssl_core import train as train_function

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


def test_the_trainer_keeps_the_old_names():
    import importlib

    module = importlib.import_module("vitssl_core.train")
    for name in (
        "resolve_device",
        "resolve_precision",
        "seed_everything",
        "setup_distributed",
        "hardware",
        "sync_batchnorm",
        "DistInfo",
        "cleanup_distributed",
    ):
        assert getattr(module, name) is getattr(runtime, name)
    assert callable(train_function)


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


@pytest.mark.parametrize(
    "module, never",
    [
        ("runtime", {"train", "evaluate", "recipes", "__main__"}),
        ("schedules", {"train", "evaluate", "recipes", "__main__", "runtime"}),
        ("evaluate", {"train", "recipes", "__main__"}),  # evaluation needs no trainer
        ("train", {"evaluate", "recipes", "__main__"}),  # the loop knows no concrete method
        ("recipes", {"train", "evaluate", "__main__"}),
    ],
)
def test_layers_point_one_way(module, never):
    reach = _reach(_imports(), module)
    assert module not in reach, f"{module} imports itself through {reach}"
    assert not reach & never
