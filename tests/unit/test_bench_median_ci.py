"""bench/median_ci.py: the distribution-free interval the overhead benchmarks report."""

import random
import statistics

import pytest

from bench.median_ci import median_ci, verdict


def test_thirty_pairs_use_the_tenth_and_twenty_first_values():
    # Binomial(30, 1/2): P(X <= 9) = 0.0214, so [x_10, x_21] covers 95.7 %; [x_11, x_20] only 90.1 %
    ci = median_ci([float(v) for v in range(1, 31)])
    assert (ci.low, ci.high) == (10.0, 21.0)
    assert ci.confidence == pytest.approx(0.9572, abs=1e-4)
    assert ci.median == 15.5


def test_too_few_values_give_the_whole_range_and_say_what_it_covers():
    ci = median_ci([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (ci.low, ci.median, ci.high) == (1.0, 3.0, 5.0)
    assert ci.confidence == pytest.approx(1 - 2 / 32)  # below the 95 % asked for
    assert median_ci([2.0]).confidence == 0.0
    with pytest.raises(ValueError):
        median_ci([])


def test_the_interval_covers_the_true_median_at_least_as_often_as_it_claims():
    # pairs drawn from a skewed distribution whose median is known exactly: lognormal(0, s)
    rng = random.Random(20261125)
    hits = trials = 0
    for _ in range(2000):
        sample = [rng.lognormvariate(0.0, 0.3) for _ in range(24)]
        ci = median_ci(sample)
        trials += 1
        hits += ci.low <= 1.0 <= ci.high
    assert ci.confidence >= 0.95
    assert hits / trials >= 0.94  # 0.957 nominal for n = 24, less a little sampling error
    assert hits / trials <= 0.99  # and not trivially wide


def test_the_median_is_the_sample_median():
    rng = random.Random(7)
    xs = [rng.random() for _ in range(41)]
    assert median_ci(xs).median == statistics.median(xs)


def test_verdict_against_a_ratio_target():
    assert verdict(median_ci([0.96, 0.97, 0.98, 0.99, 1.0, 1.01]), 0.95) == "met"
    assert verdict(median_ci([0.90, 0.91, 0.92, 0.93, 0.94, 0.94]), 0.95) == "missed"
    assert verdict(median_ci([0.90, 0.93, 0.95, 0.97, 0.99, 1.0]), 0.95) == "undecided"
    # two pairs both below the target prove nothing at 95 %
    assert verdict(median_ci([0.87, 0.88]), 0.95) == "undecided"
