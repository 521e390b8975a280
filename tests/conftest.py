"""Test-wide settings: one torch thread keeps tests deterministic and immune to a busy machine."""

import torch

torch.set_num_threads(1)
