"""pytest configuration: the ``cuda`` marker and shared fixtures.

Run from the repository root: ``python -m pytest -q tests``. Tests marked ``cuda`` need a GPU
and an extension built with CUDA kernels; they are skipped otherwise.
"""
import os
import sys
from dataclasses import dataclass

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "methods")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import baseline  # noqa: E402  (methods/baseline.py)
from common import ops  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the extension's CUDA kernels")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def _cuda_ready():
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
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


@dataclass
class TinyTeacher:
    path: str     # its checkpoint
    data: list    # the data flags it was trained with: 8 + 4 embedded images, one iteration


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """One cpu-tiny Deformable DETR teacher for every method test: methods/baseline.py, one
    iteration on 8 embedded training images (4 validation), on one thread."""
    tmp = tmp_path_factory.mktemp("tiny_teacher")
    data = ["--synth-num-train", "8", "--synth-num-val", "4", "--data-cache", str(tmp / "cache"),
            "--num-workers", "0", "--max-iters", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        baseline.main(["--preset", "cpu-tiny", "--output-dir", str(tmp / "teacher")] + data)
    finally:
        torch.set_num_threads(threads)
    return TinyTeacher(str(tmp / "teacher" / "checkpoint.pth"), data)
