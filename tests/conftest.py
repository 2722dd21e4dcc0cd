"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: thread hand-offs cost more than they save (and the machine is shared).  Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
