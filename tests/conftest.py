"""Shared test set-up: one intra-op thread per test, and one rule for tests that need Fashion-MNIST.

One thread: the models in these tests are tiny; a second thread buys nothing on them, and on a
shared 2-core machine the two threads wait on each other whenever another process holds a core
(measured: a 25-step tiny-ViT loop took 70 s with 2 threads under load, 2 s with one).

The data rule: a test that needs the real Fashion-MNIST asks for the ``needs_fashion_mnist`` fixture
(or calls ``require_fashion_mnist()``). Where the files are on disk it runs; where they are not,
it is skipped with the way to get them, except in CI (``CI`` set, as ``.ci/run`` does), where
the data is installed on purpose and its absence is a failure.
"""

import os
import re
from pathlib import Path

import pytest
import torch

from vitssl_core import data

IN_CI = os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _fashion_mnist_folder() -> Path | None:
    """The first searched folder that holds both splits (plain or gzip), without downloading."""
    for folder in data.fashion_mnist_dirs():
        names = [n for split in (True, False) for n in data.FASHION_MNIST_FILES[split]]
        if all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names):
            return folder
    return None


# Looked up once, at import, in the real environment (some tests point $VITSSL_DATA elsewhere).
FASHION_MNIST_DIR = _fashion_mnist_folder()
HOW_TO_GET = (
    "Fashion-MNIST is not on this machine (searched: "
    + ", ".join(str(d) for d in data.fashion_mnist_dirs())
    + "). Get it with `sudo apt-get install dataset-fashion-mnist`, or let torchvision download it: "
    'python -c "from vitssl_core.data import FashionMNIST; FashionMNIST(train=True); FashionMNIST(train=False)"'
)


def require_fashion_mnist() -> Path:
    """The folder holding Fashion-MNIST; skips the test without it, or fails it in CI."""
    if FASHION_MNIST_DIR is not None:
        return FASHION_MNIST_DIR
    if IN_CI:
        pytest.fail(f"CI is set, so missing data is an error. {HOW_TO_GET}", pytrace=False)
    pytest.skip(HOW_TO_GET)


@pytest.fixture(scope="session")
def needs_fashion_mnist() -> Path:
    """Request this in any test or fixture that reads the real Fashion-MNIST."""
    return require_fashion_mnist()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TESTS = Path(__file__).resolve().parent
SPREAD = {"test_checkpoints.py"}  # files of minute-long independent tests: one group per test


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's ``--dist loadgroup`` (CI): a test file runs on one worker, so its module
    fixtures are built once, except the card checks (a minute or more each), which spread over both.
    book/conftest.py keeps each notebook on one worker (its cells share a kernel)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.parent == TESTS:
            group = item.nodeid if path.name in SPREAD else path.name
            item.add_marker(pytest.mark.xdist_group(re.sub(r"\W", "_", group)))  # a plain name
