"""One place that seeds every random number generator the project uses."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # data-only tools do not need torch
        return
    torch.manual_seed(seed)
