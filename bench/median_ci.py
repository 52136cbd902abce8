"""A confidence interval for a median that assumes nothing about the distribution.

The benchmarks compare on/off windows in pairs; on these shared, noisy VMs single pairs swing
by 10-20 %, so a median alone can land either side of a target. The order-statistic interval
below says how far the median of n pairs can be trusted, needing only that the pairs are
independent: the true median lies between the k-th smallest and the k-th largest pair with
probability >= `confidence`, k from the Binomial(n, 1/2) distribution.
"""

from __future__ import annotations

from math import comb
from typing import NamedTuple


class MedianCI(NamedTuple):
    median: float
    low: float
    high: float
    confidence: float  # the interval's actual coverage (>= the one asked for), 0 if n is too small
    n: int


def _binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(comb(n, i) for i in range(k + 1)) / 2 ** n


def median_ci(values: list[float], confidence: float = 0.95) -> MedianCI:
    """The median of `values` and a distribution-free interval around it.

    With fewer than 6 values no interval reaches 95 %: the whole range is returned and
    `confidence` says what it covers."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci of no values")
    mid = n // 2
    median = xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2
    # the largest k (1-based) whose interval [x_k, x_{n-k+1}] still covers >= confidence
    k, cover = 1, 1 - 2 * _binom_cdf_half(0, n)
    while k + 1 <= (n + 1) // 2:
        c = 1 - 2 * _binom_cdf_half(k, n)
        if c < confidence:
            break
        k, cover = k + 1, c
    return MedianCI(median, xs[k - 1], xs[n - k], max(0.0, cover), n)


def verdict(ci: MedianCI, target: float, confidence: float = 0.95) -> str:
    """'met', 'missed' or 'undecided' for a ratio whose target is `ratio >= target`
    ('undecided' too when there are too few values for an interval of `confidence`)."""
    if ci.confidence < confidence:
        return "undecided"
    if ci.low >= target:
        return "met"
    if ci.high < target:
        return "missed"
    return "undecided"
