"""Tiny models run many times faster on one thread."""

import torch

torch.set_num_threads(1)
