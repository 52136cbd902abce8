"""Which pages a uffd installed: the probes' page map turned into address runs.

With the page map on (EbpfSource(page_map=True), `--page-ranges`), the probes
OR one bit per installed 4 KiB page into a u64 word per 64 pages (word index =
address >> 18, bit = (address >> 12) & 63), per uffd and interval; an install
too big for their bounded loop is kept whole as a span (start, bytes). These
pure functions turn that into sorted, coalesced runs of (start address, pages),
the form UffdCounters.installed_ranges and the Sample carry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

PAGE_SHIFT = 12
WORD_SHIFT = 18  # 64 pages per bitmask word; must match PAGE_MAP_WORD_SHIFT in probes/pctop_defs.h
PAGES_PER_WORD = 1 << (WORD_SHIFT - PAGE_SHIFT)
FULL_WORD = (1 << PAGES_PER_WORD) - 1

Runs = tuple[tuple[int, int], ...]  # (start address, number of 4 KiB pages), sorted, disjoint


def _word_runs(word: int, bits: int) -> Iterable[tuple[int, int]]:
    """(first page number, pages) for each run of set bits in one word."""
    base = word << (WORD_SHIFT - PAGE_SHIFT)
    if bits == FULL_WORD:  # the common case for streamed memory
        yield base, PAGES_PER_WORD
        return
    bit = 0
    while bits:
        skip = (bits & -bits).bit_length() - 1  # lowest set bit
        bits >>= skip
        bit += skip
        ones = (~bits & (bits + 1)).bit_length() - 1  # length of the run of ones
        yield base + bit, ones
        bits >>= ones
        bit += ones


def coalesce(words: Mapping[int, int], spans: Iterable[tuple[int, int]] = ()) -> Runs:
    """Bitmask words {word index: bits} plus spans [(start address, bytes)] -> Runs."""
    page_runs = [r for w in sorted(words) for r in _word_runs(w, words[w])]
    page_runs += [(start >> PAGE_SHIFT, (length + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT)
                  for start, length in spans if length > 0]
    page_runs.sort()
    out: list[list[int]] = []
    for first, n in page_runs:
        if out and first <= out[-1][0] + out[-1][1]:  # touches or overlaps the previous run
            out[-1][1] = max(out[-1][1], first + n - out[-1][0])
        else:
            out.append([first, n])
    return tuple((first << PAGE_SHIFT, n) for first, n in out)


def merge_runs(*many: Iterable[tuple[int, int]]) -> Runs:
    """The union of several Runs (e.g. one uffd's runs over many intervals)."""
    spans = [(start, n << PAGE_SHIFT) for runs in many for start, n in runs]
    return coalesce({}, spans)


def page_count(runs: Iterable[tuple[int, int]]) -> int:
    return sum(n for _, n in runs)


def pages_missing(runs: Runs, addresses: Iterable[int]) -> list[int]:
    """The page addresses (4 KiB aligned) among `addresses` that no run covers, sorted."""
    import bisect

    starts = [s for s, _ in runs]
    missing = []
    for a in sorted({a & ~((1 << PAGE_SHIFT) - 1) for a in addresses}):
        i = bisect.bisect_right(starts, a) - 1
        if i < 0 or a >= runs[i][0] + (runs[i][1] << PAGE_SHIFT):
            missing.append(a)
    return missing
