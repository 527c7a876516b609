"""Shared pytest set-up: make Testing/ helpers importable and keep torch on the CI's 2 cores."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture()
def one_torch_thread():
    """One torch thread for the test, restored afterwards. Tiny grids run several times faster on one
    thread than on two contended ones on the shared 2-core machine. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
