"""Each rate/delta/fraction helper on its own (pure functions, no clock)."""

import pytest

from pctop import rates
from pctop.hist import EMPTY


def test_per_second():
    assert rates.per_second(50, 0.5) == 100.0
    assert rates.per_second(50, 0) == 0.0
    assert rates.per_second(50, -1) == 0.0


def test_counter_delta_normal_first_and_reset():
    assert rates.counter_delta(150, 100) == 50
    assert rates.counter_delta(150, None) == 150  # first sight: everything is new
    assert rates.counter_delta(7, 100) == 7  # publisher restarted


def test_hist_delta_normal_and_reset():
    prev = (1, 2, 3)
    assert rates.hist_delta((2, 2, 5), prev) == (1, 0, 2)
    assert rates.hist_delta((0, 9, 9), prev) == (0, 9, 9)
    assert rates.hist_delta((4, 4, 4), None) == (4, 4, 4)


def test_stalled_fraction_clamps():
    assert rates.stalled_fraction(250_000_000, 1.0) == 0.25
    assert rates.stalled_fraction(3_000_000_000, 1.0) == 1.0
    assert rates.stalled_fraction(-1, 1.0) == 0.0
    assert rates.stalled_fraction(5, 0) == 0.0


def test_cpu_percent():
    assert rates.cpu_percent(0.5, 2.0) == 25.0
    assert rates.cpu_percent(3.0, 2.0) == 150.0  # several threads
    assert rates.cpu_percent(1.0, 0) == 0.0


def test_mean():
    assert rates.mean(10, 4) == 2.5
    assert rates.mean(10, 0) == 0.0


def test_ns_to_us():
    assert rates.ns_to_us(1500) == 1.5
    assert rates.ns_to_us(None) is None


def test_max_stall_us():
    assert rates.max_stall_us(2_500_000, 3) == 2500.0
    assert rates.max_stall_us(2_500_000, 0) is None
    assert rates.max_stall_us(0, 5) is None  # source does not measure single stalls


def test_stall_percentiles():
    h = list(EMPTY)
    h[4] = 100  # [16, 32) us
    p50, p90, p99 = rates.stall_percentiles(h, max_us=20.0)
    assert 16 <= p50 <= p90 <= p99 <= 20.0
    assert rates.stall_percentiles(EMPTY, None) == (None, None, None)


def test_progress_fraction():
    assert rates.progress_fraction(25, 100) == 0.25
    assert rates.progress_fraction(None, 100) is None
    assert rates.progress_fraction(5, 0) is None
    assert rates.progress_fraction(150, 100) == 1.0


@pytest.mark.parametrize("remaining, per_s, expected", [
    (100, 50.0, 2.0), (0, 0.0, 0.0), (-3, 1.0, 0.0), (100, 0.0, None), (None, 5.0, None)])
def test_eta_s(remaining, per_s, expected):
    assert rates.eta_s(remaining, per_s) == expected


def test_next_due_keeps_the_cadence_and_restarts_after_a_stall():
    assert rates.next_due(10.0, 1.0, 10.2) == 11.0  # on time: one interval after the last due
    assert rates.next_due(10.0, 1.0, 10.9) == 11.0  # late within the interval: no drift
    assert rates.next_due(10.0, 1.0, 13.5) == 13.5  # starved for seconds: from now, no burst
