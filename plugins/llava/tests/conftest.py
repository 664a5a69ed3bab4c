"""Shared test settings.

Tiny models run 15-20x faster on one thread than on torch's default thread pool on a 2-core machine.
"""

import torch

torch.set_num_threads(1)
