"""A fixture for test modules that run small models: one torch thread for the module (faster
than two on tiny tensors, and robust when the cores are shared), restored afterwards. Import
it into a test module (``from threads import one_thread``) to apply it there."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
