"""End-of-run integrity check of the destination's guest memory.

Every page must be present (the kernel's own word: /proc/self/pagemap), have
been installed exactly once (UFFDIO_COPY success count), carry the right
header (page number, generation, checksum of the source body), and, where
the guest did not write, hold exactly the source's body. Mismatches are
listed page by page; any mismatch fails the run.
"""

from __future__ import annotations

import array
import ctypes
import os
from typing import NamedTuple

from pctop.engine.image import HEADER_SIZE, PageImage

MAX_LISTED = 100
_PRESENT = 1 << 63


class Mismatch(NamedTuple):
    page: int  # -1: about the whole region
    reason: str


class IntegrityReport(NamedTuple):
    pages_total: int
    pages_verified: int  # present, right header and (if not written by the guest) right body
    mismatches: list[Mismatch]  # the first MAX_LISTED
    mismatch_count: int

    @property
    def ok(self) -> bool:
        return self.mismatch_count == 0 and self.pages_verified == self.pages_total


def present_pages(addr: int, npages: int, page_size: int, proc_root: str = "/proc") -> bytearray | None:
    """1 per page the kernel maps, from /proc/self/pagemap; None if unreadable."""
    try:
        with open(os.path.join(proc_root, "self", "pagemap"), "rb") as f:
            f.seek((addr // page_size) * 8)
            raw = f.read(npages * 8)
    except OSError:
        return None
    entries = array.array("Q")
    entries.frombytes(raw[: len(raw) // 8 * 8])
    if len(entries) != npages:
        return None
    return bytearray(1 if e & _PRESENT else 0 for e in entries)


def verify(addr: int, image: PageImage, dirty: set[int] | frozenset[int], installs: int,
           present: bytearray | None = None, proc_root: str = "/proc") -> IntegrityReport:
    """Check guest memory at addr against the source image. `present` (the
    engine's own bitmap) guards the reads when pagemap is unavailable: reading
    a missing uffd-registered page would block forever."""
    n, ps = image.npages, image.page_size
    kernel = present_pages(addr, n, ps, proc_root)
    mapped = kernel if kernel is not None else present
    mism: list[Mismatch] = []
    count = 0

    def bad(page: int, reason: str) -> None:
        nonlocal count
        count += 1
        if len(mism) < MAX_LISTED:
            mism.append(Mismatch(page, reason))

    if installs != n:
        bad(-1, f"{installs} pages installed for {n} pages (each must be installed exactly once)")
    mem = memoryview((ctypes.c_char * (n * ps)).from_address(addr)).cast("B")
    verified = 0
    try:
        for p in range(n):
            if mapped is None or not mapped[p]:
                bad(p, "missing")
                continue
            off = p * ps
            body = image.body(p)
            if mem[off:off + HEADER_SIZE] != image.header(p, body):
                bad(p, "header wrong (page number, generation or checksum)")
                continue
            if p not in dirty and mem[off + HEADER_SIZE:off + ps] != body:
                bad(p, "content differs from the source's (page not written by the guest)")
                continue
            verified += 1
    finally:
        mem.release()
    return IntegrityReport(n, verified, mism, count)
