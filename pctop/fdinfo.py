"""What /proc says of a userfaultfd: its fd link name and its fdinfo.

Shared by the engine (pctop.engine.uffd, which makes uffds) and the collectors
(pctop.sources.procfs, which watches other processes' uffds), so neither
imports the other.
"""

from __future__ import annotations

from typing import NamedTuple

UFFD_LINK = "anon_inode:[userfaultfd]"  # readlink of /proc/<pid>/fd/<n> for a uffd


class UffdFdinfo(NamedTuple):
    """/proc/<pid>/fdinfo/<fd> of a uffd: queue depth gauges and negotiated features."""

    pending: int  # faults queued, not yet read
    total: int  # pending + read but not yet woken
    features: int


def parse_fdinfo(text: str) -> UffdFdinfo | None:
    """pending, total and features (the hex middle of `API: aa:<features>:<ioctls>`) from a
    uffd's fdinfo text; None if it is not a userfaultfd's."""
    pending = total = features = None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key == "pending":
            pending = int(val)
        elif key == "total":
            total = int(val)
        elif key == "API":
            features = int(val.split(":")[1], 16)
    if pending is None or total is None or features is None:
        return None
    return UffdFdinfo(pending, total, features)
