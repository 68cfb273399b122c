"""Bootstrap intervals: they cover the truth at about their level, pair correctly, and leave NaNs out."""

import numpy as np
import pytest

from dppmg.bootstrap import bootstrap_mean, paired_difference
from dppmg.errors import DppmgError


def test_interval_contains_the_mean_and_shrinks_with_more_pairs():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.normal(1.0, 1.0, 50))
    large = bootstrap_mean(rng.normal(1.0, 1.0, 2000))
    assert small.low < small.mean < small.high
    assert (large.high - large.low) < (small.high - small.low) / 4  # width ~ 1/sqrt(n): 6x narrower
    # The normal-theory 95 % half-width is 1.96 / sqrt(n).
    assert large.high - large.low == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.15)


def test_coverage_is_close_to_the_level():
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(200):
        ci = bootstrap_mean(rng.exponential(1.0, 60), n_boot=500, seed=trial)  # true mean 1
        hits += ci.low <= 1.0 <= ci.high
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_difference_sees_a_shift_that_unpaired_noise_hides():
    rng = np.random.default_rng(2)
    base = rng.normal(0.0, 1.0, 100)  # large spread between pairs
    shifted = base + 0.05 + rng.normal(0.0, 0.01, 100)  # small, consistent gain on every pair
    d = paired_difference(shifted, base)
    assert d.significant and d.low > 0
    assert d.mean == pytest.approx(0.05, abs=0.005)
    # The two means' own intervals overlap almost entirely: only the pairing shows the gain.
    a, b = bootstrap_mean(shifted), bootstrap_mean(base)
    assert a.low < b.high
    same = paired_difference(base, base + rng.normal(0, 0.01, 100) - 0.0)
    assert same.low < 0 < same.high


def test_non_finite_values_are_left_out_and_counted():
    ci = bootstrap_mean([1.0, np.nan, 3.0, np.inf])
    assert ci.n == 2 and ci.mean == 2.0
    d = paired_difference([1.0, 2.0, np.nan], [0.0, np.nan, 1.0])
    assert d.n == 1 and d.mean == 1.0
    empty = bootstrap_mean([np.nan])
    assert empty.n == 0 and np.isnan(empty.mean) and not empty.significant
    assert set(ci.as_dict()) == {"mean", "low", "high", "n", "significant"}


def test_same_seed_same_interval_and_bad_input_is_an_error():
    x = np.arange(30.0)
    assert bootstrap_mean(x, seed=4) == bootstrap_mean(x, seed=4)
    with pytest.raises(DppmgError, match="same pairs"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(DppmgError, match="one value per pair"):
        bootstrap_mean(np.zeros((2, 2)))
    with pytest.raises(DppmgError, match="level"):
        bootstrap_mean(x, level=1.5)
