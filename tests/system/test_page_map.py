"""Which pages a uffd installed: the page map (EbpfSource(page_map=True), --page-ranges).

A real child process (INSTALLER below, a userfaultfd user built on pctop.engine.uffd)
installs a known set of pages into its uffd-registered memory with UFFDIO_COPY and
UFFDIO_ZEROPAGE: single pages, pages on both sides of a bitmask-word boundary, a
multi-page COPY, a COPY cut short by a page already present (EEXIST: only the pages
before it are installed), a 2 MiB COPY that is not 2 MiB aligned (9 words), an 8 MiB
COPY (beyond the probes' per-install loop: kept as a span) and, when the machine can
reserve one, a 2 MiB hugetlb page. The probes' runs must equal exactly those pages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pctop.sources import pagemap
from pctop.sources.pagemap import coalesce, merge_runs, page_count, pages_missing
from tests.helpers.probes import running_probes

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096
HUGE = 2 << 20

# ---- the pure part: bitmask words and spans -> runs ------------------------------------------


def test_words_become_runs_split_at_clear_bits():
    # word 1 covers pages 64..127: bits 0, 2-4 and 63 set
    runs = coalesce({1: 0b11101 | 1 << 63})
    assert runs == ((64 * PAGE, 1), (66 * PAGE, 3), (127 * PAGE, 1))


def test_runs_join_across_words_and_with_spans():
    full = pagemap.FULL_WORD
    runs = coalesce({2: full, 3: 0b1, 5: 1 << 63}, [(6 * 64 * PAGE, 10 * PAGE), (1000 * PAGE, PAGE)])
    # words 2-3: pages 128..192; word 5 bit 63 (page 383) touches the span at 384..393
    assert runs == ((128 * PAGE, 65), (383 * PAGE, 11), (1000 * PAGE, 1))
    assert page_count(runs) == 77


def test_overlapping_spans_and_words_count_each_page_once():
    runs = coalesce({0: 0b1111}, [(2 * PAGE, 4 * PAGE), (3 * PAGE, PAGE)])
    assert runs == ((0, 6),)
    assert merge_runs(runs, ((6 * PAGE, 2),), ((100 * PAGE, 1),)) == ((0, 8), (100 * PAGE, 1))


def test_pages_missing_names_each_uncovered_page():
    runs = ((10 * PAGE, 3), (20 * PAGE, 1))
    assert pages_missing(runs, [10 * PAGE, 12 * PAGE + 5, 13 * PAGE, 9 * PAGE, 20 * PAGE]) == [9 * PAGE, 13 * PAGE]
    assert pages_missing((), [PAGE]) == [PAGE]


# ---- the probes against a real uffd process ----------------------------------------------------

INSTALLER = r"""
import ctypes, json, mmap, os, sys
sys.path.insert(0, sys.argv[1])
from pctop.engine.uffd import AnonMemory, Uffd
PAGE, HUGE = 4096, 2 << 20
plan = json.loads(sys.argv[2])
print(os.getpid(), flush=True)
sys.stdin.readline()  # followed now: the probes see the registrations
uffd = Uffd(nonblock=True)
mem = AnonMemory(plan["pages"] * PAGE)
uffd.register(mem.addr, mem.size)
src = ctypes.create_string_buffer(b"\x5a" * (8 << 20))
huge = None
if plan["huge"]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, HUGE, 3, 0x02 | 0x20 | 0x40000, -1, 0)  # PRIVATE|ANONYMOUS|HUGETLB
    if addr not in (None, ctypes.c_void_p(-1).value):
        uffd.register(addr, HUGE)
        huge = addr
print(json.dumps({"pid": os.getpid(), "fd": uffd.fd, "base": mem.addr, "huge": huge}), flush=True)
sys.stdin.readline()
done = []
for op, first, n in plan["ops"]:
    if op == "copy":
        got = uffd.copy(mem.addr + first * PAGE, ctypes.addressof(src), n * PAGE)
    elif op == "zero":
        got = uffd.zeropage(mem.addr + first * PAGE, n * PAGE)
    elif op == "stride":  # n single pages, one every 64 pages: one page-map word each
        got = sum(uffd.copy(mem.addr + (first + 64 * i) * PAGE, ctypes.addressof(src), PAGE)
                  for i in range(n))
    else:
        got = uffd.copy(huge, ctypes.addressof(src), HUGE)
    done.append(got)
print(json.dumps(done), flush=True)
sys.stdin.readline()
"""

# (op, first page, pages): what the installer does, in order, in a 4096-page region.
OPS = [
    ["copy", 0, 1], ["copy", 2, 1], ["copy", 63, 2],  # 63 and 64: two words
    ["copy", 100, 5],
    ["zero", 200, 3],
    ["copy", 300, 1], ["copy", 298, 4],  # stops at 300 (EEXIST): installs 298, 299 only
    ["copy", 1031, 512],  # 2 MiB, not aligned: pages 1031..1542, 9 words
    ["copy", 2048, 2048],  # 8 MiB in one COPY: 32 words, beyond the probes' loop -> a span
]


def expected_pages(base: int) -> set[int]:
    pages = {0, 2, 63, 64, 298, 299, 300} | set(range(100, 105)) | set(range(200, 203))
    pages |= set(range(1031, 1031 + 512)) | set(range(2048, 4096))
    return {base + p * PAGE for p in pages}


class HugePages:
    """Reserve one more 2 MiB hugetlb page for the test, and give it back."""

    PATH = Path("/proc/sys/vm/nr_hugepages")

    def __init__(self) -> None:
        self.before: int | None = None

    def __enter__(self) -> bool:
        try:
            self.before = int(self.PATH.read_text())
            self.PATH.write_text(str(self.before + 1))
            return int(self.PATH.read_text()) > self.before
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            try:
                self.PATH.write_text(str(self.before))
            except OSError:
                pass


def run_installer(src, huge: bool, ops=OPS, pages: int = 4096) -> tuple[dict, list[int], object]:
    """Start the installer, follow it, let it install `ops` inside one interval -> (info, results, Reading)."""
    plan = {"pages": pages, "ops": ops + ([["huge", 0, 0]] if huge else []), "huge": huge}
    p = subprocess.Popen([sys.executable, "-c", INSTALLER, str(ROOT), json.dumps(plan)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        src.add_pid(int(p.stdout.readline()))
        p.stdin.write("register\n")
        p.stdin.flush()
        info = json.loads(p.stdout.readline())
        src.collect()  # what came before belongs to the previous interval
        p.stdin.write("go\n")
        p.stdin.flush()
        results = json.loads(p.stdout.readline())
        reading = src.collect()
        p.stdin.write("end\n")
        p.stdin.flush()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return info, results, reading


@pytest.fixture(scope="module")
def with_page_map():
    with running_probes([], page_map=True) as src:
        yield src


@pytest.mark.bpf
def test_installed_ranges_are_exactly_the_pages_installed(with_page_map):
    with HugePages() as have_huge:
        info, results, r = run_installer(with_page_map, huge=have_huge)
    assert results[:6] == [PAGE, PAGE, 2 * PAGE, 5 * PAGE, 3 * PAGE, PAGE]
    assert results[6] == 2 * PAGE  # the COPY cut short by the present page 300
    want = expected_pages(info["base"])
    if info["huge"]:
        assert results[-1] == HUGE
        want |= {info["huge"] + i * PAGE for i in range(HUGE // PAGE)}
    u = [c for c in r.uffds if c.pid == info["pid"] and c.fd == info["fd"]]
    assert len(u) == 1, r.uffds
    u = u[0]
    assert u.installed_ranges == coalesce({}, [(a, PAGE) for a in want])
    assert u.pages_installed == len(want) and u.page_map_lost == 0
    # the registered ranges come along, exactly as registered
    t = next(t for t in r.targets if t.pid == info["pid"])
    reg = {(info["base"], 4096)} | ({(info["huge"], HUGE // PAGE)} if info["huge"] else set())
    assert set(t.registered_ranges) == reg


@pytest.mark.bpf
def test_without_the_page_map_no_ranges_and_no_page_map_entries():
    with running_probes([], page_map=False) as src:
        info, _, r = run_installer(src, huge=False)
        entries = len(src._table("page_map").items()) + len(src._table("page_spans").items())
    u = next(c for c in r.uffds if c.pid == info["pid"])
    assert u.pages_installed == len(expected_pages(info["base"]))
    assert u.installed_ranges is None
    assert all(t.registered_ranges is None for t in r.targets)
    assert entries == 0  # the probes did not record pages at all


PAGE_MAP_WORDS = 65536  # BPF_HASH(page_map, ..., 65536) in probes/pctop_state.c


@pytest.mark.bpf
def test_a_full_page_map_counts_the_pages_it_could_not_record(with_page_map):
    # One page in each of PAGE_MAP_WORDS + 300 words (16 GiB of address space, 257 MiB touched):
    # the map fills, and every page it cannot hold is counted, none silently dropped.
    n = PAGE_MAP_WORDS + 300
    before = with_page_map.debug_counters()["page_map_lost"]
    info, results, r = run_installer(with_page_map, huge=False, ops=[["stride", 0, n]], pages=64 * n)
    assert results == [n * PAGE]
    (u,) = [c for c in r.uffds if c.pid == info["pid"]]
    assert u.pages_installed == n
    recorded = page_count(u.installed_ranges)
    assert u.page_map_lost >= 300 and recorded + u.page_map_lost == n
    assert with_page_map.debug_counters()["page_map_lost"] - before == u.page_map_lost
    # what it kept are pages it did install: single pages, 64 pages apart, inside the region
    assert all(pages == 1 and (a - info["base"]) % (64 * PAGE) == 0 and 0 <= a - info["base"] < 64 * n * PAGE
               for a, pages in u.installed_ranges)
    # the next interval starts with room again
    info2, _, r2 = run_installer(with_page_map, huge=False, ops=[["copy", 5, 3]], pages=16)
    (u2,) = [c for c in r2.uffds if c.pid == info2["pid"]]
    assert u2.installed_ranges == ((info2["base"] + 5 * PAGE, 3),) and u2.page_map_lost == 0
