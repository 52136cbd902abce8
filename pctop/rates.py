"""Every rate, delta, fraction and percentile pctop shows: small pure functions.

Each one has its own unit test (tests/unit/test_rates.py). Nothing here reads the
clock or the kernel; callers pass the measured interval in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

from pctop.hist import percentile_us

NS_PER_S = 1_000_000_000


def per_second(count: float, interval_s: float) -> float:
    """A count over an interval as a rate; 0 for an empty or invalid interval."""
    if interval_s <= 0:
        return 0.0
    return count / interval_s


def counter_delta(current: int, previous: int | None) -> int:
    """Increase of a cumulative counter. A counter that went backwards was reset
    (the publisher restarted), so everything it shows now is new."""
    if previous is None:
        return current
    return current - previous if current >= previous else current


def hist_delta(current: Sequence[int], previous: Sequence[int] | None) -> tuple[int, ...]:
    """Bucket-wise increase of a cumulative histogram; a reset in any bucket
    means the whole histogram restarted."""
    if previous is None or len(previous) != len(current):
        return tuple(current)
    if any(c < p for c, p in zip(current, previous)):
        return tuple(current)
    return tuple(c - p for c, p in zip(current, previous))


def stalled_fraction(stall_ns: int, interval_s: float) -> float:
    """Share of the interval a thread spent stalled, clamped to 0..1 (a stall that
    began in an earlier interval may be accounted wholly in this one)."""
    if interval_s <= 0:
        return 0.0
    return min(1.0, max(0.0, stall_ns / (interval_s * NS_PER_S)))


def cpu_percent(cpu_s: float, interval_s: float) -> float:
    """CPU time used over the interval, in percent of one CPU (may exceed 100
    for several threads)."""
    if interval_s <= 0:
        return 0.0
    return max(0.0, 100.0 * cpu_s / interval_s)


def mean(total: float, n: int) -> float:
    """Mean of n gauge samples summing to `total`; 0 without samples."""
    return total / n if n > 0 else 0.0


def ns_to_us(ns: int | None) -> float | None:
    return None if ns is None else ns / 1000.0


def max_stall_us(max_ns: int, faults: int) -> float | None:
    """The longest stall in us; None when there were no faults or the source
    does not measure single stalls (max_ns == 0)."""
    if faults <= 0 or max_ns <= 0:
        return None
    return max_ns / 1000.0


def stall_percentiles(
    hist: Sequence[int], max_us: float | None, qs: Sequence[float] = (50, 90, 99)
) -> tuple[float | None, ...]:
    """Percentiles (us) of one interval's stall histogram, never above max_us."""
    return tuple(percentile_us(hist, q, max_us) for q in qs)


def progress_fraction(received: int | None, total: int | None) -> float | None:
    """Share of the pages that have arrived, 0..1; None when unknown."""
    if received is None or not total:
        return None
    return min(1.0, max(0.0, received / total))


def eta_s(remaining: int | None, per_s: float) -> float | None:
    """Seconds until `remaining` units are done at `per_s`; 0 when done, None
    when unknown or not moving."""
    if remaining is None:
        return None
    if remaining <= 0:
        return 0.0
    if per_s <= 0:
        return None
    return remaining / per_s


def next_due(due: float, interval_s: float, now: float) -> float:
    """When the next sample is due, one interval after the last due time (so the rate
    does not drift); after a stall longer than that (a starved CPU), from now instead
    of a burst of catch-up samples. The one pacing rule of every live loop."""
    return max(due + interval_s, now)
