"""Log2 histograms of stall durations in microseconds (QEMU's convention).

Bucket N holds [2^N, 2^(N+1)) us, HIST_BUCKETS = 24 buckets; bucket 0 also
takes everything below 1 us and the last bucket everything above 2^24 us.
This is what the kernel-side maps, the engine's `hist` and QEMU's
postcopy-latency-dist use, so histograms from any source merge by addition.

Percentiles from such a histogram are estimates: the rank is located in its
bucket and interpolated linearly inside it, each of the bucket's n members
taking the middle of its 1/n share (a lone member sits mid-bucket). With the
true maximum known, no estimate exceeds it, which matters for the sparse top
buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from pctop.model import HIST_BUCKETS

Counts = tuple[int, ...]
EMPTY: Counts = (0,) * HIST_BUCKETS


def bucket_index(value_us: float) -> int:
    """The bucket a duration of `value_us` microseconds falls into."""
    if not value_us >= 2:  # also catches NaN and negatives
        return 0
    return min(int(value_us).bit_length() - 1, HIST_BUCKETS - 1)


def bucket_bounds(index: int) -> tuple[float, float]:
    """[low, high) of a bucket in us; bucket 0 starts at 0 (it takes < 1 us too)."""
    low = 0.0 if index == 0 else float(2**index)
    return low, float(2 ** (index + 1))


def merge_counts(a: Sequence[int], b: Sequence[int]) -> Counts:
    """Bucket-wise sum of two histograms."""
    if len(a) != HIST_BUCKETS or len(b) != HIST_BUCKETS:
        raise ValueError(f"histograms must have {HIST_BUCKETS} buckets, got {len(a)} and {len(b)}")
    return tuple(x + y for x, y in zip(a, b))


def percentile_us(counts: Sequence[int], q: float, max_us: float | None = None) -> float | None:
    """Estimated q-th percentile (0..100) in us, None for an empty histogram."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    total = sum(counts)
    if total <= 0:
        return None
    if q == 100 and max_us is not None:
        return max_us
    rank = max(1, math.ceil(q / 100 * total))
    seen = 0
    for index, n in enumerate(counts):
        if n <= 0:
            continue
        if seen + n >= rank:
            low, high = bucket_bounds(index)
            value = low + (high - low) * (rank - seen - 0.5) / n
            return min(value, max_us) if max_us is not None else value
        seen += n
    raise AssertionError("unreachable: rank is at most the total")


class Log2Hist:
    """A mutable log2 histogram: add values, merge others, ask percentiles."""

    __slots__ = ("_counts", "max_us")

    def __init__(self, counts: Iterable[int] = EMPTY, max_us: float | None = None) -> None:
        self._counts = list(counts)
        if len(self._counts) != HIST_BUCKETS:
            raise ValueError(f"a histogram has {HIST_BUCKETS} buckets, got {len(self._counts)}")
        self.max_us = max_us

    @property
    def counts(self) -> Counts:
        return tuple(self._counts)

    @property
    def total(self) -> int:
        return sum(self._counts)

    def add(self, value_us: float, n: int = 1) -> None:
        self._counts[bucket_index(value_us)] += n
        if self.max_us is None or value_us > self.max_us:
            self.max_us = float(value_us)

    def merge(self, other: "Log2Hist") -> None:
        self._counts = list(merge_counts(self._counts, other._counts))
        if other.max_us is not None and (self.max_us is None or other.max_us > self.max_us):
            self.max_us = other.max_us

    def percentile(self, q: float) -> float | None:
        return percentile_us(self._counts, q, self.max_us)

    def __repr__(self) -> str:
        return f"Log2Hist(total={self.total}, max_us={self.max_us})"
