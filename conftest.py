"""Shared test settings for every test folder (tests/, plugins/*/tests, examples/*/tests).

Tiny models run 15-20x faster on one thread than on torch's default thread pool on a 2-core machine, so
every test runs on one thread, whatever an earlier test left the pool at; a test that measures the
machine (the real-model smoke test) sets its own count inside this.
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
