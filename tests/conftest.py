"""Shared test setup.

TRITON_INTERPRET must be set before any @triton.jit function is *decorated* (triton reads it at import), so it
is set here, before the tests import `kernels`. On a machine with CUDA the real kernels run instead.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ../shared beside the checkout holds the authors' real data sample; tests that read it skip when it is absent.
# TWICE_SHARED points elsewhere (a git worktree that does not sit beside shared/).
SHARED = Path(os.environ.get("TWICE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
OFFICIAL_SAMPLE = SHARED / "data" / "twice_official_sample"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (real 270m weights, benchmarks); not run in CI")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny shapes gain
    nothing from more, and on a shared 2-core CI box their spin-waits make tests 5-20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def official_sample_dir():
    if not OFFICIAL_SAMPLE.is_dir():
        pytest.skip("../shared/data/twice_official_sample is absent")
    return OFFICIAL_SAMPLE
