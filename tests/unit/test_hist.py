"""The log2 histogram: bucket edges, merge, percentiles (QEMU's convention)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pctop.hist import (
    EMPTY,
    HIST_BUCKETS,
    Log2Hist,
    bucket_bounds,
    bucket_index,
    merge_counts,
    percentile_us,
)


@pytest.mark.parametrize(
    "us, index",
    [(0, 0), (0.5, 0), (1, 0), (1.99, 0), (2, 1), (3.9, 1), (4, 2), (1023, 9), (1024, 10),
     (2**23, 23), (2**30, 23), (-5, 0), (float("nan"), 0)],
)
def test_bucket_index_edges(us, index):
    assert bucket_index(us) == index


def test_bucket_bounds_cover_the_value():
    for us in (2, 3, 5, 100, 4096, 10**6):
        low, high = bucket_bounds(bucket_index(us))
        assert low <= us < high
    assert bucket_bounds(0) == (0.0, 2.0)


def test_merge_adds_buckets_and_rejects_wrong_length():
    a = tuple(range(HIST_BUCKETS))
    b = tuple(1 for _ in range(HIST_BUCKETS))
    assert merge_counts(a, b) == tuple(i + 1 for i in range(HIST_BUCKETS))
    with pytest.raises(ValueError):
        merge_counts(a, (1, 2))


def test_percentile_of_empty_is_none():
    assert percentile_us(EMPTY, 50) is None


def test_percentile_single_value_sits_mid_bucket_and_is_capped_by_max():
    h = list(EMPTY)
    h[bucket_index(100)] += 1  # bucket 6: [64, 128)
    assert percentile_us(h, 50) == 96.0
    assert percentile_us(h, 99, max_us=90.0) == 90.0
    assert percentile_us(h, 100, max_us=100.0) == 100.0


def test_percentile_picks_the_right_bucket():
    h = list(EMPTY)
    h[3] = 90  # [8, 16)
    h[10] = 10  # [1024, 2048)
    p50 = percentile_us(h, 50)
    p90 = percentile_us(h, 90)
    p99 = percentile_us(h, 99)
    assert 8 <= p50 < 16 and 8 <= p90 < 16
    assert 1024 <= p99 < 2048


def test_percentile_rejects_out_of_range_q():
    with pytest.raises(ValueError):
        percentile_us(EMPTY, 101)


@given(st.lists(st.floats(min_value=0, max_value=2e7), min_size=1, max_size=200),
       st.floats(min_value=0, max_value=100))
def test_percentile_is_within_data_bucket_range(values, q):
    h = Log2Hist()
    for v in values:
        h.add(v)
    p = h.percentile(q)
    lowest_low, _ = bucket_bounds(bucket_index(min(values)))
    assert lowest_low <= p <= max(values)


@given(st.lists(st.floats(min_value=0, max_value=1e6), max_size=50),
       st.lists(st.floats(min_value=0, max_value=1e6), max_size=50))
def test_merge_equals_adding_everything_to_one(xs, ys):
    a, b, both = Log2Hist(), Log2Hist(), Log2Hist()
    for v in xs:
        a.add(v)
        both.add(v)
    for v in ys:
        b.add(v)
        both.add(v)
    a.merge(b)
    assert a.counts == both.counts
    assert a.max_us == both.max_us
    assert a.total == len(xs) + len(ys)


def test_percentiles_are_monotonic_in_q():
    h = Log2Hist()
    for v in (1, 5, 5, 40, 300, 300, 300, 7000):
        h.add(v)
    ps = [h.percentile(q) for q in (0, 10, 50, 90, 99, 100)]
    assert ps == sorted(ps)
    assert ps[-1] == 7000


def test_hist_rejects_wrong_bucket_count():
    with pytest.raises(ValueError):
        Log2Hist((1, 2, 3))
