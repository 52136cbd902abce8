"""The values the BPF programs and Python share, read from probes/pctop_defs.h.

The header is the one place they are written (libbpf-tools' shared header, for
a bcc program that is compiled from text at run time): config slots, target
flags, how a vCPU was identified, debug-counter slots, table sizes. Python
reads its integer #defines here instead of repeating them.
tests/unit/test_probe_defs.py holds the few values Python must also know
without the header (HIST_BUCKETS of the model) to it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def probe_dir() -> Path:
    """The BPF C: $PCTOP_PROBES, else pctop/probes in an installed wheel, else the source tree's probes/."""
    if os.environ.get("PCTOP_PROBES"):
        return Path(os.environ["PCTOP_PROBES"])
    package = Path(__file__).resolve().parents[1]
    installed = package / "probes"
    return installed if installed.is_dir() else package.parent / "probes"


PROBE_DIR = probe_dir()
_DEFINE = re.compile(r"^#define\s+([A-Z][A-Z0-9_]*)\s+\(?(0x[0-9a-fA-F]+|\d+)(?:ULL|UL|LL|U)?\)?\s*(?:/\*.*)?$", re.M)


def read_defines(text: str) -> dict[str, int]:
    """Every `#define NAME <integer>` of a C header (hex or decimal, with or without U/ULL)."""
    return {name: int(value, 0) for name, value in _DEFINE.findall(text)}


def _load() -> dict[str, int]:
    try:
        return read_defines((PROBE_DIR / "pctop_defs.h").read_text())
    except OSError:  # no probe sources: ebpf_unavailable_reason says so; keep imports working
        return {}


DEFS = _load()


def with_prefix(prefix: str) -> dict[str, int]:
    """{name without the prefix, lower case: value} of the defines named PREFIX*."""
    return {k[len(prefix):].lower(): v for k, v in DEFS.items() if k.startswith(prefix)}


def slots_named(prefix: str) -> tuple[str, ...]:
    """Names of PREFIX* slots (0, 1, ...), in slot order; PREFIX + "SLOTS" is their count."""
    named = {v: k for k, v in with_prefix(prefix).items() if k != "slots"}
    return tuple(named[i] for i in range(len(named)))
