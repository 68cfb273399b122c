"""One place that seeds every random number generator the project uses, and asks torch for reproducible kernels."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; with `deterministic`, also make torch pick deterministic kernels.

    Seeding alone does not make a run repeatable: on the CPU, the backward of a gather such as `emb[users]` (an
    accumulating `index_put_`) adds its rows in a thread-dependent order, so two processes with the same seed drifted
    apart by ~1e-10 per step and stage 1 ended with different tokens. `torch.use_deterministic_algorithms` selects
    the sorted, order-fixed kernel; `warn_only` keeps the few ops without one (some CUDA kernels) running, with a
    warning, instead of failing the run.
    """
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # data-only tools do not need torch
        return
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
