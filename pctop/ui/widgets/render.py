"""Pure text rendering shared by the widgets: numbers, bars, sparklines, severity.

Everything returns strings or rich Text, so it is unit-testable without an
App. Severity is always carried by a symbol and a word as well as a colour,
so the screen stays readable on a monochrome terminal (NO_COLOR).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉█"


class Severity(NamedTuple):
    level: int  # 0 idle, 1 ok, 2 warn, 3 crit
    symbol: str
    word: str
    style: str


IDLE = Severity(0, " ", "idle", "dim")
OK = Severity(1, "·", "ok", "green")
WARN = Severity(2, "▲", "warn", "yellow")
CRIT = Severity(3, "■", "high", "bold red")

# Share of wall time a vCPU spends stalled: under 5% is tolerable, from 25% the
# guest is visibly slowed (a quarter of its CPU time lost to page waits).
STALL_WARN, STALL_CRIT = 0.05, 0.25
# Single-stall latency: a local UFFDIO_COPY round trip is tens of us; a
# network fetch is hundreds; milliseconds mean queueing or a slow link.
LAT_WARN_US, LAT_CRIT_US = 500.0, 5000.0


def stall_severity(faults: int, stalled_frac: float) -> Severity:
    if faults <= 0 and stalled_frac <= 0:
        return IDLE
    if stalled_frac >= STALL_CRIT:
        return CRIT
    if stalled_frac >= STALL_WARN:
        return WARN
    return OK


def latency_severity(us: float | None) -> Severity:
    if us is None:
        return IDLE
    if us >= LAT_CRIT_US:
        return CRIT
    if us >= LAT_WARN_US:
        return WARN
    return OK


def _digits(v: float, decimals_below: float) -> str:
    """v with one decimal while it stays under `decimals_below` once rounded, else none."""
    s = f"{v:.1f}"
    return s if float(s) < decimals_below else f"{v:.0f}"


def _scaled(x: float, steps: tuple[tuple[float, str, float], ...]) -> str:
    """x in the first unit of `steps` (divisor, unit, decimals below) whose rounded
    figure stays under 1000: the unit is picked after rounding, so 999.6 us is 1.0ms,
    never a 4-digit 1000us that overflows its column."""
    for div, unit, dec in steps:
        s = _digits(x / div, dec)
        if float(s) < 1000:
            return s + unit
    return s + unit


_RATE_STEPS = ((1.0, "", 10.0), (1e3, "k", 100.0), (1e6, "M", 100.0), (1e9, "G", 100.0), (1e12, "T", 100.0))
_US_STEPS = ((1.0, "µs", 10.0), (1e3, "ms", 100.0), (1e6, "s", 100.0))


def fmt_rate(x: float | None) -> str:
    """A per-second rate in at most 6 characters."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return _scaled(x, _RATE_STEPS)


def fmt_count(n: int) -> str:
    """A whole count: exact below 1000, then like a rate (12.3k)."""
    return str(int(n)) if n < 1000 else fmt_rate(n)


def fmt_us(us: float | None) -> str:
    """A duration given in microseconds, in at most 6 characters."""
    if us is None:
        return "-"
    if us == 0:
        return "0"  # like fmt_rate and fmt_ms: an exact zero, not a measured 0.0µs
    return _scaled(us, _US_STEPS)


def fmt_bytes(n: float | None, per_s: bool = False) -> str:
    if n is None:
        return "-"
    suffix = "/s" if per_s else ""
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}{suffix}"
    return f"{n:.0f} B{suffix}"


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def bucket_label(n: int) -> str:
    """Lower bound of log2 bucket n ([2^n, 2^(n+1)) us), e.g. 1µs, 512µs, 1ms, 2s."""
    us = 1 << n
    if us < 1000:
        return f"{us}µs"
    if us < 1_000_000:
        return f"{us // 1000}ms" if us >= 10_000 else f"{us / 1000:.0f}ms"
    return f"{us / 1e6:.0f}s"


def sparkline(values: Sequence[float], width: int, top: float | None = None) -> str:
    """The last `width` values as block characters, scaled to `top` (default: their
    max); left-aligned, so a short history grows from its label like a table cell."""
    vals = list(values)[-width:]
    if not vals:
        return " " * width
    hi = top if top is not None else max(vals)
    if hi <= 0:
        return (SPARK[0] * len(vals)).ljust(width)
    out = []
    for v in vals:
        i = int(round(max(0.0, v) / hi * (len(SPARK) - 1)))
        out.append(SPARK[min(i, len(SPARK) - 1)])
    return "".join(out).ljust(width)


def bar(frac: float, width: int) -> str:
    """A left-aligned bar `frac` (0..1) of `width` cells, in eighths."""
    frac = min(1.0, max(0.0, frac))
    eighths = int(round(frac * width * 8))
    full, rest = divmod(eighths, 8)
    s = "█" * full + (EIGHTHS[rest] if rest and full < width else "")
    return s.ljust(width)


class Part(NamedTuple):
    label: str
    value: float
    char: str  # distinct fill per part, so it reads without colour
    style: str


def stacked_runs(parts: Iterable[Part], width: int) -> list[tuple[str, str]]:
    """(text, style) runs of one bar split by the parts' shares, each part in
    its own fill character so it reads without colour; exactly `width` cells."""
    parts = list(parts)
    total = sum(max(0.0, p.value) for p in parts)
    if total <= 0:
        return [("·" * width, "dim")]
    # Largest-remainder rounding so the cells add up to exactly `width`.
    shares = [max(0.0, p.value) / total * width for p in parts]
    cells = [int(s) for s in shares]
    order = sorted(range(len(parts)), key=lambda i: shares[i] - cells[i], reverse=True)
    for i in order[: width - sum(cells)]:
        cells[i] += 1
    return [(p.char * n, p.style) for p, n in zip(parts, cells) if n]


def stacked_bar(parts: Iterable[Part], width: int) -> Text:
    text = Text()
    for run, st in stacked_runs(parts, width):
        text.append(run, style=st)
    return text
