"""Shared test settings.

Tiny models run 15-20x faster on one thread than on torch's default thread pool on a 2-core machine.
Every test here runs on one thread, whatever tests elsewhere in the session left the pool at.
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
