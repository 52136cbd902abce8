"""The source's memory image: deterministic content per page, with a header.

Every page starts with a 64-byte header the guest never writes (the guest
workload only writes at offsets >= HEADER_SIZE):

    magic b"PCTOPPG1" | page number u64 | generation u64 | crc32 of the body u64 | 32 zero bytes

and a body (the rest of the page) that is a deterministic function of
(seed, page number). So the destination can check, page by page, that the
page sits at the right place (page number), is the right version
(generation), and that its body is the source's (checksum and content)
wherever the guest did not write.

Bodies are windows into one seeded random block, so building a 1 GiB image
is slicing plus one crc32 per page, not a random generator per page.
"""

from __future__ import annotations

import random
import struct
import zlib
from typing import NamedTuple

HEADER = struct.Struct("<8sQQQ32x")
HEADER_SIZE = HEADER.size  # 64
MAGIC = b"PCTOPPG1"
_BLOCK = 1 << 18  # seeded random bytes that bodies are cut from


class PageHeader(NamedTuple):
    magic: bytes
    page: int
    generation: int
    checksum: int


class PageImage:
    """Deterministic page contents for a region of `npages` pages."""

    def __init__(self, npages: int, page_size: int = 4096, seed: int = 1, generation: int = 1):
        if page_size <= HEADER_SIZE or page_size & (page_size - 1):
            raise ValueError(f"page size must be a power of two above {HEADER_SIZE}, got {page_size}")
        self.npages = npages
        self.page_size = page_size
        self.seed = seed
        self.generation = generation
        self.body_size = page_size - HEADER_SIZE
        self._block = random.Random(seed).randbytes(_BLOCK + self.body_size)

    def body(self, page: int) -> bytes:
        # A multiplicative hash spreads neighbouring pages over the block.
        off = ((page * 0x9E3779B1) & 0xFFFFFFFF) % _BLOCK
        return self._block[off:off + self.body_size]

    def header(self, page: int, body: bytes | None = None) -> bytes:
        crc = zlib.crc32(self.body(page) if body is None else body)
        return HEADER.pack(MAGIC, page, self.generation, crc)

    def page(self, page: int) -> bytes:
        body = self.body(page)
        return self.header(page, body) + body

    def fill(self, buf, first_page: int = 0, count: int | None = None) -> None:
        """Write pages [first_page, first_page+count) into the writable buffer buf (from offset 0)."""
        count = self.npages - first_page if count is None else count
        ps = self.page_size
        mv = memoryview(buf).cast("B")
        for i in range(count):
            p = first_page + i
            body = self.body(p)
            off = i * ps
            mv[off:off + HEADER_SIZE] = self.header(p, body)
            mv[off + HEADER_SIZE:off + ps] = body

    def build(self) -> bytearray:
        """The whole image in one buffer (what the source process serves)."""
        buf = bytearray(self.npages * self.page_size)
        self.fill(buf)
        return buf


def parse_header(data) -> PageHeader:
    return PageHeader(*HEADER.unpack_from(data, 0))
