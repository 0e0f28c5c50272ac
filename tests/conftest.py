"""Test tiers: the default run is fast and CPU-only; `--runslow` adds slow tests; GPU tests need CUDA;
data tests need the public datasets beside the repository (../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter. The variable must be set before anything imports
# triton (torchrec does), so it is set here, when pytest loads this file, not in a test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    import torch

    # Test tensors are tiny: one intra-op thread avoids thread oversubscription on small CI machines
    # (torch's default of one thread per core spins badly when other processes share the cores).
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_data = pytest.mark.skip(reason=f"public datasets not found at {SHARED_DATA}")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public datasets folder (tests using it are marked `data`)."""
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after (for modules whose code under test may change it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
