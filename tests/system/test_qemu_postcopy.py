"""A real QEMU post-copy migration under pctop (Debian's QEMU 7.2, eBPF probes, QMP).

Two QEMUs on 127.0.0.1 migrate pctop's boot-sector guest, whose two vCPUs each
rewrite 4 MiB of its memory in a loop, with max-postcopy-bandwidth at 2 MiB/s so post-copy
lasts about 4 s. pctop watches in-process exactly as `pctop monitor --json
--page-ranges --qmp DEST --qmp SOURCE` does (open_live + the QMP source), and the
tests compare what its probes measured with what QEMU itself reports.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from pctop.qemu import control
from pctop.qemu.migration import MIB, MigrationSettings, QemuMigration
from pctop.root import open_live
from pctop.sources.pagemap import PAGE_SHIFT, merge_runs, page_count, pages_missing
from pctop.sources.qmp import attach
from tests.conftest import need_qemu, need_root
from tests.helpers.probes import need_ebpf

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

SAMPLE_S = 0.25


def need_qemu_and_ebpf(accel: str) -> None:
    need_root()
    need_qemu(accel)
    need_ebpf()


class Watcher:
    """pctop's live pipeline on one migration, sampled every SAMPLE_S in a thread."""

    def __init__(self, mig: QemuMigration) -> None:
        self.dest_pid = mig.pair.destination.pid
        pids = (self.dest_pid, mig.pair.source.pid)
        # page_ranges: which pages the destination installed, not only how many
        self.header, self.stats = open_live(pids, None, page_ranges=True)
        try:
            self.header, self.qmp = attach(self.header, self.stats, [mig.pair.destination.qmp_path,
                                                                     mig.pair.source.qmp_path])
        except BaseException:
            self.stats.close()
            raise
        self.samples = []
        self._stop = threading.Event()
        self.stats.collect()  # baseline: the probes now follow both QEMUs
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.samples.append(self.stats.collect())

    def stop(self) -> list:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.samples.append(self.stats.collect())  # what ended after the last interval
            self.stats.close()
        return self.samples

    def dest(self, sample):
        return next((t for t in sample.targets if t.pid == self.dest_pid), None)

    def dest_targets(self):
        return [t for t in (self.dest(s) for s in self.samples) if t is not None]


@pytest.fixture(scope="module", params=["kvm", "tcg"])
def watched(request):
    """One post-copy migration, watched from before pre-copy to after completion."""
    accel = request.param
    need_qemu_and_ebpf(accel)
    # The KVM run also proves vCPU threads are found without QEMU naming them.
    mig = QemuMigration(MigrationSettings(accel=accel, vcpus=2, region_mib=8, postcopy_bandwidth=2 * MIB,
                                          name_threads=accel == "tcg"))
    request.addfinalizer(mig.close)
    mig.boot()
    watcher = Watcher(mig)
    request.addfinalizer(watcher.stop)
    src_info = mig.run()
    passes_done = [mig.guest_passes(mig.dst, i) for i in range(2)]
    time.sleep(0.5)
    samples = watcher.stop()
    return {"mig": mig, "watcher": watcher, "samples": samples, "src_info": src_info,
            "dst_info": control.query(mig.dst), "passes_done": passes_done,
            "vcpu_tids": control.vcpu_threads(mig.dst)}


def test_postcopy_lasted_seconds(watched):
    # The bandwidth cap is what makes the numbers below meaningful: a real post-copy phase.
    assert watched["mig"].times.postcopy_s > 2.0
    assert watched["src_info"]["ram"]["postcopy-requests"] > 0


# Guest physical addresses below this are guest RAM at offset = gpa in QEMU's pc.ram
# (the pc machine puts RAM above 4 GiB only for guests bigger than this).
PC_LOW_RAM_END = 0xE0000000


def guest_ram_base(targets, ram_bytes: int) -> int:
    """Host virtual address of the destination's guest RAM: QEMU registers each RAM block
    with the uffd whole, and pc.ram is the one whose size is the guest's RAM size."""
    registered = {r for t in targets for r in (t.registered_ranges or ())}
    ram = [start for start, pages in registered if pages << PAGE_SHIFT == ram_bytes]
    assert len(ram) == 1, ("no single uffd range of the RAM size", ram_bytes, sorted(registered))
    return ram[0]


def test_installed_pages_cover_every_page_the_guest_dirtied(watched):
    w = watched["watcher"]
    mig = watched["mig"]
    targets = w.dest_targets()
    base = guest_ram_base(targets, mig.settings.memory_mib * MIB)
    runs = merge_runs(*(u.installed_ranges for t in targets for u in t.uffds if u.installed_ranges))
    assert sum(u.page_map_lost or 0 for t in targets for u in t.uffds) == 0  # the map held every page
    dirtied = mig.guest.dirtied_pages()
    assert max(dirtied) << PAGE_SHIFT < PC_LOW_RAM_END
    # The guest dirties exactly these pages, and at the switch to post-copy every one of them is
    # dirty (a pass takes milliseconds, a pre-copy round seconds), so each must arrive through
    # the uffd: page by page, at its own address in the destination's guest RAM.
    missing = pages_missing(runs, [base + (gfn << PAGE_SHIFT) for gfn in dirtied])
    assert not missing, (f"{len(missing)} of {len(dirtied)} dirtied pages never installed, first gfns",
                         [(a - base) >> PAGE_SHIFT for a in missing[:8]])
    # and pctop's page map agrees with its own count: no page installed that it did not count
    assert page_count(runs) <= sum(u.pages_installed for t in targets for u in t.uffds)


def test_uffd_messages_read_at_least_the_sources_postcopy_requests(watched):
    w = watched["watcher"]
    msgs = sum(u.msgs_read for t in w.dest_targets() for u in t.uffds)
    requests = watched["src_info"]["ram"]["postcopy-requests"]
    # Every request QEMU sends to the source starts from a fault message its fault thread read.
    assert msgs >= requests > 0, (msgs, requests)


def test_stall_per_vcpu_at_least_qemu_blocktime(watched):
    w = watched["watcher"]
    qemu_ms = watched["dst_info"]["postcopy-vcpu-blocktime"]
    stall_ns: dict[int, int] = {}
    faults: dict[int, int] = {}
    vmm_ms: dict[int, float] = {}
    for t in w.dest_targets():
        for v in t.vcpus:
            if v.vcpu is None:
                continue
            stall_ns[v.vcpu] = stall_ns.get(v.vcpu, 0) + v.stall_ns
            faults[v.vcpu] = faults.get(v.vcpu, 0) + v.faults
            vmm_ms[v.vcpu] = vmm_ms.get(v.vcpu, 0.0) + (v.vmm_blocktime_ms or 0.0)
    assert sorted(stall_ns) == list(range(len(qemu_ms)))
    for idx, ms in enumerate(qemu_ms):
        assert ms > 0
        # QEMU 7.2 loses a wait when the vCPU faults again before it marks the previous
        # fault resolved (docs/qemu.md); pctop times each sleep from the outside, so it
        # sees at least QEMU's blocktime, up to QEMU's rounding: each wait is the
        # difference of two clock reads truncated to the ms, off by less than 1 ms either
        # way, about 0.41 ms sd, and such errors add up over n waits to ~0.41 * sqrt(n) ms.
        # Six times that: a lost class of stalls (or their run-queue part) still fails it.
        rounding_ns = 6 * 0.41e6 * faults[idx] ** 0.5 + 1e6
        assert stall_ns[idx] + rounding_ns >= ms * 1_000_000, (idx, stall_ns[idx], ms, faults[idx])
        # The Samples carry QEMU's number too: per-interval growth that adds up to it.
        assert vmm_ms[idx] == pytest.approx(ms)


def test_vcpu_rows_are_the_threads_qemu_names_as_vcpus(watched):
    w = watched["watcher"]
    last = w.dest(w.samples[-1])
    rows = {v.vcpu: v for v in last.vcpus if v.vcpu is not None}
    for idx, tid in watched["vcpu_tids"].items():
        assert rows[idx].tid == tid
        assert rows[idx].identity != "unknown"


def test_migration_state_and_qemu_numbers_in_the_samples(watched):
    w = watched["watcher"]
    states = [t.migration.state for t in w.dest_targets() if t.migration]
    assert "postcopy" in states and states[-1] == "completed"
    extra = w.dest_targets()[-1].migration.extra
    assert extra["role"] == "destination"
    assert extra["postcopy_requests"] == watched["src_info"]["ram"]["postcopy-requests"]
    assert extra["postcopy_vcpu_blocktime_ms"] == watched["dst_info"]["postcopy-vcpu-blocktime"]
    assert "qmp" in w.header.sources


def test_guest_keeps_running_on_the_destination(watched):
    mig = watched["mig"]
    for vcpu, done in enumerate(watched["passes_done"]):
        first = mig.guest_passes(mig.dst, vcpu)
        deadline = time.monotonic() + 10
        while mig.guest_passes(mig.dst, vcpu) == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mig.guest_passes(mig.dst, vcpu) > first >= done
    assert control.query(mig.src)["status"] == "completed"


# ---- pause and recover through pctop's controls ------------------------------------------------

@pytest.fixture(scope="module")
def paused_and_recovered(request):
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    need_qemu_and_ebpf(accel)
    mig = QemuMigration(MigrationSettings(accel=accel, region_mib=8, postcopy_bandwidth=1 * MIB))
    request.addfinalizer(mig.close)
    mig.boot()
    watcher = Watcher(mig)
    request.addfinalizer(watcher.stop)
    mig.prepare()
    mig.start_precopy()
    mig.wait_precopy_pass()
    mig.switch_to_postcopy()
    time.sleep(0.5)
    paused = watcher.qmp.send("drop-link")  # what the TUI's "x" key sends
    control.wait_status(mig.dst, ("postcopy-paused",), 10)
    t_paused = time.monotonic()
    time.sleep(1.5)  # (guest memory cannot be read now: QEMU's monitor would wait for the page too)
    recovered = watcher.qmp.send("recover")  # the TUI's "r" key
    pause_s = time.monotonic() - t_paused
    mig.wait_completed()
    time.sleep(0.5)
    return {"mig": mig, "watcher": watcher, "samples": watcher.stop(), "paused": paused,
            "recovered": recovered, "pause_s": pause_s}


def test_pause_and_recover_work_through_pctop(paused_and_recovered):
    r = paused_and_recovered
    assert r["paused"]["ok"], r["paused"]
    assert r["recovered"]["ok"], r["recovered"]
    mig = r["mig"]
    assert control.query(mig.dst)["status"] == "completed"
    first = mig.guest_passes(mig.dst)
    deadline = time.monotonic() + 10
    while mig.guest_passes(mig.dst) == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mig.guest_passes(mig.dst) > first


def test_pause_and_recover_are_visible_in_the_samples(paused_and_recovered):
    w = paused_and_recovered["watcher"]
    states = [t.migration.state for t in w.dest_targets() if t.migration]
    assert "paused" in states
    assert states.index("postcopy") < states.index("paused") < len(states) - 1
    assert states[-1] == "completed"
    texts = " ".join(e.text for s in w.samples for e in s.events)
    assert "postcopy-paused" in texts and "postcopy-recover" in texts
    # pctop saw the vCPU wait through the pause: one stall at least as long as it.
    longest_us = max((v.max_us or 0.0) for t in w.dest_targets() for v in t.vcpus if v.vcpu is not None)
    assert longest_us >= paused_and_recovered["pause_s"] * 0.9e6
