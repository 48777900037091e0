"""pytest configuration: the ``cuda`` marker and shared fixtures.

Run from the repository root: ``python -m pytest -q tests``. Tests marked ``cuda`` need a GPU
and an extension built with CUDA kernels; they are skipped otherwise.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the extension's CUDA kernels")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def _cuda_ready():
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    from common import ops
    if ops.backend("cuda") != "ext":
        return False, "the extension was built without CUDA kernels"
    return True, ""


def pytest_collection_modifyitems(config, items):
    ok, why = _cuda_ready()
    if ok:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from seed 0 on one CPU thread (tests that exercise threading set their
    own count): small tensors run several times slower with two threads on a busy 2-core CI
    machine, and one thread keeps the CPU kernels' results independent of the machine."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
