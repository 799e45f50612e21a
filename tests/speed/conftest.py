"""Shared by the speed tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops with two OpenMP threads on a busy 2-core box wait on each other (100x slower seen here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
