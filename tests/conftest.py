"""Shared test set-up: one intra-op thread, set again for every test (a test may change it).

The models in these tests are tiny; a second thread buys nothing on them, and on a shared
2-core machine the two threads wait on each other whenever another process holds a core
(measured: a 25-step tiny-ViT loop took 70 s with 2 threads under load, 2 s with one).
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
