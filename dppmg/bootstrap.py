"""Confidence intervals by the bootstrap over pairs: means, and paired differences between two conditions.

Every condition of an evaluation is generated for the same (user, target) pairs, so two conditions are compared
pair by pair: the difference of their per-pair values is resampled, not the two means separately (which would
ignore that both see the same hard and easy pairs). Percentile intervals, 95 % by default, a fixed seed so the
same numbers give the same interval. Pairs where either value is not finite are left out and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dppmg.errors import DppmgError

N_BOOT = 2000
LEVEL = 0.95


@dataclass
class Interval:
    """A mean and its bootstrap interval over `n` pairs; `significant` when the interval excludes 0."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def significant(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "significant": self.significant}


def bootstrap_mean(
    values: Sequence[float] | np.ndarray, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> Interval:
    """The mean of the finite values and its percentile bootstrap interval (NaNs with no finite value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise DppmgError(f"bootstrap_mean needs one value per pair, got shape {x.shape}")
    if not 0 < level < 1:
        raise DppmgError(f"bootstrap level must be in (0, 1), got {level}")
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(x.mean()), float(low), float(high), len(x))


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """mean(a − b) over the pairs where both are finite, with its bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise DppmgError(
            f"paired_difference needs values for the same pairs, got shapes {a.shape} and {b.shape}"
        )
    # A NaN on either side makes the difference NaN, and bootstrap_mean leaves it out.
    return bootstrap_mean(a - b, n_boot, level, seed)
