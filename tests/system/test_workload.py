"""pctop.engine.guest / workload: the hand-assembled guest in real KVM, the thread stand-in,
and both under real userfaultfd (MISSING mode and UFFD_FEATURE_SIGBUS)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import threading
import time

import pytest

from pctop.engine import guest as g
from pctop.engine.uffd import AnonMemory, Uffd
from pctop.engine.workload import KvmWorkload, ThreadWorkload, WorkloadError
from tests.helpers.procs import read_wchan, wait_for

PAGE = 4096
HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
HAVE_UFFD = os.path.exists("/dev/userfaultfd") or os.path.exists("/proc/sys/vm/unprivileged_userfaultfd")

KVM_MARKS = [pytest.mark.kvm,
             pytest.mark.skipif(not HAVE_KVM, reason="/dev/kvm is missing or not accessible")]
kvm_only = pytest.param(KvmWorkload, marks=KVM_MARKS, id="kvm")


def on_kvm(test):
    for mark in KVM_MARKS:
        test = mark(test)
    return test
BOTH = [kvm_only, pytest.param(ThreadWorkload, id="threads")]


def header(index: int) -> bytes:
    return index.to_bytes(8, "little") * 8            # 64 bytes that name the page


@pytest.fixture
def prefilled():
    """A 4 MiB data region whose every page starts with its own 64-byte header."""
    mem = AnonMemory(4 << 20)
    for i in range((4 << 20) // PAGE):
        ctypes.memmove(mem.addr + i * PAGE, header(i), 64)
    yield mem
    mem.close()


def read_data(mem: AnonMemory) -> bytes:
    return ctypes.string_at(mem.addr, mem.size)


def expected(workload) -> tuple[set[int], list[int]]:
    """Pages written and accesses made, per the Python model of the guest."""
    dirty, touched = set(), []
    for i, plan in enumerate(workload.plans):
        model = workload.model(i)
        accesses = plan.npages * workload.params.max_passes
        for _ in range(accesses):
            index, write_offset = model.next()
            if write_offset >= 0:
                dirty.add(plan.first_page + index)
        touched.append(accesses)
    return dirty, touched


# --- the guest code -----------------------------------------------------------

@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.parametrize("pattern", ["seq", "random", "hotset"])
@pytest.mark.parametrize("write_ratio", [0.0, 0.5, 1.0])
def test_listing_matches_objdump(pattern, write_ratio, tmp_path):
    """Every instruction's bytes decode to the assembly written next to them."""
    asm = g.build_code(g.GuestParams(pattern, 12, write_ratio, 3))
    code = tmp_path / "code.bin"
    code.write_bytes(asm.assemble())
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", "-M", "intel",
                          str(code)], capture_output=True, text=True, check=True).stdout
    decoded = {}
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\t[0-9a-f ]+\t(.*)$", line)
        if m:
            decoded[int(m.group(1), 16)] = m.group(2)
    aliases = {"jnz": "jne", "jz": "je"}
    for insn in asm.insns:
        theirs = re.sub(r"\s+", " ", decoded[insn.offset].replace("QWORD PTR ", "").replace("*1+", "+")).split(" <")[0]
        mine = insn.asm.replace("qword ", "")
        jump = re.fullmatch(r"(j\w+) (\w+)", mine)
        if jump:   # a label: compare the mnemonic and the resolved target address
            mine = f"{aliases.get(jump[1], jump[1])} {asm.labels[jump[2]]:#x}"
        theirs = re.sub(r"0x([0-9a-f]+)", lambda m: str(int(m[1], 16)), theirs).replace(", ", ",")
        mine = re.sub(r"0x([0-9a-f]+)", lambda m: str(int(m[1], 16)), mine).replace(", ", ",")
        assert theirs == mine, f"{insn.offset:#x}: {insn.data.hex(' ')} is {theirs!r}, not {insn.asm!r}"


def test_shards_split_like_the_engine_does():
    from pctop.engine.workload import plan_vcpus
    plans = plan_vcpus(10, 3, "sharded", 1)
    assert [(p.first_page, p.npages) for p in plans] == [(0, 3), (3, 3), (6, 4)]
    assert len({p.seed for p in plans}) == 3 and all(p.seed for p in plans)
    shared = plan_vcpus(10, 3, "shared", 1)
    assert [(p.first_page, p.npages, p.start_index) for p in shared] == [(0, 10, 0), (0, 10, 3),
                                                                          (0, 10, 6)]


def test_model_index_ranges():
    plan = g.VcpuPlan(0, 1000, 0, 12345)
    for pattern in ("random", "hotset"):
        model = g.AccessModel(plan, g.GuestParams(pattern, 12, 0.5, 1), 100, 0.9)
        draws = [model.next() for _ in range(5000)]
        assert all(0 <= i < 1000 for i, _ in draws)
        assert all(off == -1 or 64 <= off <= PAGE - 8 for _, off in draws)
        hot = sum(i < 100 for i, _ in draws) / len(draws)
        if pattern == "hotset":
            assert hot > 0.85            # 0.9 + 0.1 * 0.1 expected
        else:
            assert hot < 0.15


@pytest.mark.parametrize("kwargs, message", [
    ({"pattern": "zigzag"}, "pattern"), ({"layout": "striped"}, "layout"),
    ({"write_ratio": 1.5}, "write_ratio"), ({"passes": 0}, "passes"),
    ({"hot_fraction": 0.0}, "hot_fraction"), ({"page_size": 3000}, "page size"),
])
def test_bad_parameters_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThreadWorkload(0x10000, 16 * PAGE, 1, **kwargs)


# --- behaviour over present memory ---------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("pattern, layout, write_ratio", [
    ("seq", "sharded", 1.0), ("random", "sharded", 0.5), ("hotset", "shared", 0.3),
    ("random", "shared", 0.7),
])
def test_accesses_follow_the_model(cls, pattern, layout, write_ratio, prefilled):
    """Dirty pages are exactly the model's writes; headers are never touched; only
    dirty pages changed; touched/passes/done are what the model says."""
    w = cls(prefilled.addr, prefilled.size, 2, pattern=pattern, write_ratio=write_ratio,
            seed=7, layout=layout, passes=2)
    want_dirty, want_touched = expected(w)
    with w:
        w.start()
        assert w.wait(60)
        progress = w.progress()
    assert [p.touched for p in progress] == want_touched
    assert all(p.passes == 2 and p.done for p in progress)
    assert w.dirty_pages() == want_dirty
    data = read_data(prefilled)
    changed = set()
    for i in range(prefilled.size // PAGE):
        page = data[i * PAGE:(i + 1) * PAGE]
        assert page[:64] == header(i), f"page {i}: the 64-byte header was written"
        if page[64:] != bytes(PAGE - 64):
            changed.add(i)
    assert changed <= want_dirty
    assert len(changed) >= len(want_dirty) - 2 * len(progress)   # a store of value 0 changes nothing


@pytest.mark.parametrize("cls", BOTH)
def test_seq_touches_every_page_once_per_pass(cls, prefilled):
    npages = prefilled.size // PAGE
    w = cls(prefilled.addr, prefilled.size, 1, pattern="seq", write_ratio=1.0, passes=1)
    with w:
        w.start()
        assert w.wait(60)
    # npages accesses that dirtied npages distinct pages: each page exactly once
    assert w.progress()[0].touched == npages
    assert w.dirty_pages() == set(range(npages))


@pytest.mark.parametrize("cls", BOTH)
def test_random_is_deterministic_per_seed(cls, prefilled):
    def dirty(seed: int) -> set[int]:
        w = cls(prefilled.addr, prefilled.size, 2, pattern="random", write_ratio=0.2,
                seed=seed, passes=1)
        with w:
            w.start()
            assert w.wait(60)
        return w.dirty_pages()
    first = dirty(11)
    assert first == dirty(11)
    assert first != dirty(12)


@on_kvm
@pytest.mark.timeout(60)
def test_guest_runs_natively_and_stop_returns_while_it_spins(prefilled):
    """The mailbox advances; KVM emulated (almost) no instructions for it (the
    vCPU's KVM stats: an emulated guest would emulate every instruction);
    stop() ends a guest that would run forever; vCPU threads carry VMM-style names."""
    w = KvmWorkload(prefilled.addr, prefilled.size, 2, pattern="random", passes=None)
    w.start()
    try:
        tids = w.vcpu_tids()
        for i, (tid, fd) in enumerate(zip(tids, w.vcpu_fds())):
            with open(f"/proc/self/task/{tid}/comm") as f:
                assert f.read().strip() == f"CPU {i}/KVM"
            assert os.readlink(f"/proc/self/fd/{fd}") == f"anon_inode:kvm-vcpu:{i}"
        assert wait_for(lambda: min(p.touched for p in w.progress()) >= 50_000, 30)
        stats = w.kvm_stats()
        touched = sum(p.touched for p in w.progress())
    finally:
        w.stop()
    assert not any(p.done for p in w.progress())
    assert sum(p.touched for p in w.progress()) >= touched
    if not all(stats):
        pytest.skip("KVM has no binary stats (KVM_CAP_BINARY_STATS_FD)")
    assert all("insn_emulation" in s and "exits" in s for s in stats)
    assert sum(s["insn_emulation"] for s in stats) < touched // 100


# --- under userfaultfd ----------------------------------------------------------

needs_uffd = pytest.mark.skipif(not HAVE_UFFD, reason="userfaultfd is not available")


@pytest.fixture
def source():
    """The 'source' image: every page has its header and a zero body."""
    src = AnonMemory(4 << 20)
    for i in range(src.size // PAGE):
        ctypes.memmove(src.addr + i * PAGE, header(i), 64)
    yield src
    src.close()


@pytest.fixture
def registered(source):
    """make(sigbus) -> (dest, uffd): an empty destination region registered with a new uffd."""
    made = []

    def make(sigbus: bool) -> tuple[AnonMemory, Uffd]:
        dest, uffd = AnonMemory(source.size), Uffd(sigbus=sigbus)
        made.append((dest, uffd))
        uffd.register(dest.addr, dest.size)
        return dest, uffd
    yield make
    for dest, uffd in made:
        uffd.close()       # wakes any thread still waiting in a fault
        dest.close()


@needs_uffd
@pytest.mark.timeout(60)
@pytest.mark.parametrize("cls", BOTH)
def test_missing_mode_blocks_until_the_page_is_copied(cls, source, registered):
    dest, uffd = registered(sigbus=False)
    w = cls(dest.addr, dest.size, 1, pattern="seq", write_ratio=0.0, passes=1)
    try:
        w.start()
        tid = w.vcpu_tids()[0]
        with open(f"/proc/self/task/{tid}/comm") as f:
            assert f.read().strip() == ("CPU 0/KVM" if cls is KvmWorkload else "vcpu 0")
        for expected_page in range(3):
            assert uffd.wait(10)
            faults = uffd.read_faults()
            assert [(f.address, f.ptid) for f in faults] == [(dest.addr + expected_page * PAGE, tid)]
            # the message is queued just before the thread sleeps: wait for the sleep
            assert wait_for(lambda: read_wchan(tid) == "handle_userfault"), read_wchan(tid)
            assert w.progress()[0].touched == expected_page     # blocked on that page
            assert uffd.copy(dest.addr + expected_page * PAGE,
                             source.addr + expected_page * PAGE, PAGE) == PAGE
        assert uffd.copy(dest.addr + 3 * PAGE, source.addr + 3 * PAGE, dest.size - 3 * PAGE) \
            == dest.size - 3 * PAGE
        assert w.wait(30)
        assert w.progress()[0].touched == dest.size // PAGE
    finally:
        if cls is KvmWorkload:
            w.stop()
        else:
            _stop_threads(w, uffd, dest, source)


def _stop_threads(w, uffd, dest, source) -> None:
    """Thread workers blocked in a fault only return once their page arrives."""
    stopper = threading.Thread(target=w.stop)
    stopper.start()
    while stopper.is_alive():
        uffd.copy_range(dest.addr, source.addr, dest.size, PAGE)
        stopper.join(0.05)


@needs_uffd
@on_kvm
@pytest.mark.timeout(30)
def test_kvm_stop_interrupts_a_vcpu_blocked_in_a_fault(registered):
    dest, uffd = registered(sigbus=False)
    w = KvmWorkload(dest.addr, dest.size, 1, pattern="seq", passes=1)
    w.start()
    assert uffd.wait(10)                 # the vCPU sleeps in handle_userfault
    w.stop()                             # the kick wakes it (interruptible wait)
    assert w.errors == [] and not w.progress()[0].done


@needs_uffd
@pytest.mark.timeout(60)
@pytest.mark.parametrize("cls", BOTH)
def test_vcpu_exit_callback_gets_the_address_and_the_guest_proceeds(cls, source, registered):
    dest, uffd = registered(sigbus=True)
    calls = []

    def on_memory_fault(vcpu: int, addr: int, address_source: str) -> None:
        calls.append((vcpu, addr, address_source, threading.get_native_id()))
        assert uffd.copy(addr, source.addr + (addr - dest.addr), PAGE) == PAGE

    w = cls(dest.addr, dest.size, 2, pattern="seq", write_ratio=0.5, seed=3, passes=2)
    want_dirty, _ = expected(w)
    try:
        w.start(on_memory_fault)
        assert w.wait(60)
    finally:
        w.stop()
    tids = w.vcpu_tids()
    npages = dest.size // PAGE
    # seq: each vCPU faults once on each page of its shard, in order, on its own thread
    for vcpu in range(2):
        mine = [c for c in calls if c[0] == vcpu]
        first = vcpu * (npages // 2)
        assert [c[1] for c in mine] == [dest.addr + (first + i) * PAGE for i in range(npages // 2)]
        assert {c[3] for c in mine} == {tids[vcpu]}
    sources = {c[2] for c in calls}
    assert sources in ({"guest-assisted"}, {"memory_fault"})
    if cls is ThreadWorkload:
        assert sources == {"guest-assisted"}
    assert w.dirty_pages() == want_dirty
    data = read_data(dest)
    assert all(data[i * PAGE:i * PAGE + 64] == header(i) for i in range(npages))


def _run_resolving(w: KvmWorkload, uffd: Uffd, dest: AnonMemory, resolve, sigbus: bool, timeout: float) -> int:
    """Run w to completion while resolve(fault address) serves its faults: on the vCPU
    thread (SIGBUS, vcpu-exit) or on one reader thread (MISSING). Closes uffd and dest.
    Returns the run's wall time (ns)."""
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if uffd.wait(0.05):
                for f in uffd.read_faults():
                    resolve(f.address)

    handler = None if sigbus else threading.Thread(target=reader)
    start = time.monotonic_ns()
    try:
        if handler:
            handler.start()
        w.start((lambda _vcpu, addr, _source: resolve(addr)) if sigbus else None)
        assert w.wait(timeout)
        return time.monotonic_ns() - start
    finally:
        stop.set()
        w.stop()
        if handler:
            handler.join()
        uffd.close()
        dest.close()


def _fault_rate(vcpus: int, npages: int) -> tuple[float, float]:
    """Faults/s for a KVM guest: (MISSING + one Python reader thread, SIGBUS + vCPU resolves)."""
    size = npages * PAGE
    src = AnonMemory(size)
    ctypes.memset(src.addr, 1, size)
    rates = []
    for sigbus in (False, True):
        dest = AnonMemory(size)
        uffd = Uffd(sigbus=sigbus)
        uffd.register(dest.addr, size)
        w = KvmWorkload(dest.addr, size, vcpus, pattern="seq", passes=1)

        def resolve(addr: int, dest=dest, uffd=uffd) -> None:
            page = addr & ~(PAGE - 1)
            uffd.copy(page, src.addr + page - dest.addr, PAGE)

        rates.append(npages / (_run_resolving(w, uffd, dest, resolve, sigbus, 120) / 1e9))
    src.close()
    return rates[0], rates[1]


@needs_uffd
@on_kvm
@pytest.mark.timeout(120)
def test_fault_throughput_is_measured(record_property):
    """Measured, not asserted (speed targets belong in bench/): every page faults once."""
    for vcpus in (1, 2):
        missing, sigbus = _fault_rate(vcpus, 16384)
        record_property(f"faults_per_s_{vcpus}vcpu_missing", round(missing))
        record_property(f"faults_per_s_{vcpus}vcpu_sigbus", round(sigbus))
        print(f"\n{vcpus} vCPU: MISSING+reader {missing:.0f}/s, SIGBUS+vCPU-resolves {sigbus:.0f}/s")
        assert missing > 0 and sigbus > 0


@needs_uffd
@on_kvm
@pytest.mark.timeout(30)
def test_efault_without_a_handler_is_reported_by_wait(registered):
    """A SIGBUS-mode uffd but no on_memory_fault: the vCPU fails, wait() says why."""
    dest, _uffd = registered(sigbus=True)
    w = KvmWorkload(dest.addr, dest.size, 1, pattern="seq", passes=1)
    with w:
        w.start()
        with pytest.raises(WorkloadError, match="EFAULT"):
            w.wait(20)


@needs_uffd
@on_kvm
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sigbus, native", [(False, True), (True, True), (True, False)],
                         ids=["missing", "vcpu-exit", "vcpu-exit-python-clock"])
def test_stall_clocks_count_each_fault_once_and_span_the_handlers_hold(sigbus, native, source, monkeypatch):
    """The guest's TSC clock and the native KVM_RUN clock (KvmWorkload.stall_clocks):
    every fault is one slow first touch, and each stall spans at least the time the
    handler held the page back (hold_s, slept before the copy), at most the whole run.
    A second pass touches only present pages: nothing more is counted. Without the
    native helper KVM_RUN is timed in Python, and the workload says so."""
    from pctop.engine import kvm

    if not native:
        monkeypatch.setattr(kvm, "_native", [None])

    npages, hold_s = 16, 0.003
    dest, uffd = AnonMemory(npages * PAGE), Uffd(sigbus=sigbus)
    uffd.register(dest.addr, dest.size)
    copied = []

    def resolve(addr: int) -> None:
        time.sleep(hold_s)
        page = addr & ~(PAGE - 1)
        assert uffd.copy(page, source.addr + page - dest.addr, PAGE) == PAGE
        copied.append(page)

    w = KvmWorkload(dest.addr, dest.size, 1, pattern="seq", passes=2)
    wall = _run_resolving(w, uffd, dest, resolve, sigbus, 30)
    (c,) = w.stall_clocks()
    assert len(copied) == npages
    assert c.guest_stalls == npages
    if sigbus:
        assert c.exit_stalls == npages and npages * hold_s * 1e9 <= c.exit_stall_ns <= wall
    else:
        assert (c.exit_stalls, c.exit_stall_ns) == (0, 0)
    if not native:
        assert w.stall_clock == "python" and c.guest_stall_ns is None
        return
    if kvm.native_run() is None:
        pytest.skip(f"no native helper ({kvm.native_error}): the guest's cycles cannot be converted")
    assert w.stall_clock == "native"
    assert max(npages * hold_s * 1e9, c.exit_stall_ns) <= c.guest_stall_ns <= wall  # the guest's span holds the exit's
