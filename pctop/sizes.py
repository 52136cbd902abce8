"""Sizes on the command line: 4096, 64K, 256M, 1G (powers of 1024; an optional
trailing B or iB is accepted, so 1GiB and 1GB mean the same)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`; ValueError with a one-line reason if it is not a size."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use a number with an optional K, M or G suffix)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_size(n: float) -> str:
    """The largest unit that keeps the number >= 1, e.g. 268435456 -> '256M'."""
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            v = n / _UNITS[unit]
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n:.0f}"
