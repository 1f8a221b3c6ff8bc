"""Fixtures shared by test modules that ask for them (``pytest.mark.usefixtures``)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster than two and robust when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
