"""The aggregator: merge rules, rates, target life cycle, identities.

Most tests feed Stats scripted Readings: a Source is only an interface
(start/collect/close), and scripted readings pin down the merge rules
exactly. The last tests run Stats over a real procfs source and a real
userfaultfd process.
"""

from __future__ import annotations

import os
import signal
import time

from pctop.hist import EMPTY
from pctop.sources.procfs import ProcfsSource
from pctop.sources.readings import (
    MigrationInfo,
    Reading,
    TargetInfo,
    ThreadFaults,
    UffdCounters,
    UffdDepth,
    VcpuIdentity,
)
from pctop.stats import Memory, Stats, build_sample, merge_readings
from tests.helpers.uffd_holder import holder


def tf(pid=10, tid=11, faults=0, stall_ns=0, max_ns=0, hist=EMPTY, **kw) -> ThreadFaults:
    return ThreadFaults(pid=pid, tid=tid, faults=faults, stall_ns=stall_ns, queued_ns=kw.pop("queued_ns", 0),
                        service_ns=kw.pop("service_ns", 0), runq_ns=kw.pop("runq_ns", 0),
                        faults_no_read=kw.pop("faults_no_read", 0), max_ns=max_ns, hist=hist, **kw)


class Scripted:
    """A source that hands out prepared Readings, one per collect()."""

    def __init__(self, name, readings):
        self.name = name
        self.readings = list(readings)
        self.added: list[int] = []
        self.closed = False

    def start(self):
        pass

    def collect(self):
        return self.readings.pop(0) if self.readings else Reading(self.name)

    def close(self):
        self.closed = True

    def add_pid(self, pid):
        self.added.append(pid)


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def build(readings, memory=None, interval=0.5):
    memory = memory or Memory()
    return build_sample(merge_readings(readings), memory, now=1.0, interval_s=interval, seq=1,
                        probe_tier="ebpf", sources=("ebpf", "procfs")), memory


def test_first_source_wins_for_a_thread_and_depth_with_more_samples_wins():
    a = Reading("ebpf", threads=(tf(faults=5),), depths=(UffdDepth(10, 3, 1.0, 1, 1.0, 1, 1),))
    b = Reading("engine", threads=(tf(faults=99),), depths=(UffdDepth(10, 3, 4.0, 9, 5.0, 9, 25),))
    s, _ = build([a, b])
    (t,) = s.targets
    assert t.vcpus[0].faults == 5  # not 104: two sources seeing the same faults must not add up
    assert t.uffds[0].pending_max == 9 and t.uffds[0].pending_mean == 4.0


def test_vcpu_rates_fraction_and_percentiles():
    hist = list(EMPTY)
    hist[6] = 40  # [64, 128) us
    hist[9] = 10  # [512, 1024) us
    r = Reading("ebpf", threads=(tf(faults=50, stall_ns=100_000_000, max_ns=900_000, hist=tuple(hist),
                                    queued_ns=7, exits={"mmio": 3, "io": 1}),),
                identities=(VcpuIdentity(10, 11, 2, "kvm_create_vcpu"),))
    s, _ = build([r], interval=0.5)
    v = s.targets[0].vcpus[0]
    assert (v.vcpu, v.identity) == (2, "kvm_create_vcpu")
    assert v.faults_per_s == 100.0
    assert v.stalled_frac == 0.2
    assert 64 <= v.p50_us < 128 and 512 <= v.p99_us <= 900
    assert v.max_us == 900.0
    assert v.parts.queued_ns == 7
    assert v.exits == {"mmio": 3, "io": 1} and v.exits_per_s == 8.0


def test_unknown_max_gives_none_and_uncapped_percentiles():
    hist = list(EMPTY)
    hist[4] = 1
    s, _ = build([Reading("engine", threads=(tf(faults=1, stall_ns=20_000, hist=tuple(hist)),))])
    v = s.targets[0].vcpus[0]
    assert v.max_us is None and v.p50_us == 24.0


def test_uffd_rates_from_counters():
    c = UffdCounters(10, 3, msgs_read=20, pages_installed=30, bytes_installed=30 * 4096)
    s, _ = build([Reading("ebpf", uffds=(c,))], interval=2.0)
    u = s.targets[0].uffds[0]
    assert (u.reads_per_s, u.installs_per_s, u.bytes_per_s) == (10.0, 15.0, 15 * 4096.0)
    assert u.msgs_read == 20 and u.pages_installed == 30


def test_page_ranges_pass_through_only_when_the_source_measured_them():
    runs = ((0x7f0000000000, 3), (0x7f0000008000, 1))
    on = UffdCounters(10, 3, pages_installed=4, installed_ranges=runs, page_map_lost=2)
    off = UffdCounters(10, 4, pages_installed=4)
    ti = TargetInfo(10, "q", registered_ranges=((0x7f0000000000, 512),))
    s, _ = build([Reading("ebpf", uffds=(on, off), targets=(ti,)), Reading("procfs", targets=(TargetInfo(10, "q"),))])
    (t,) = s.targets
    u3, u4 = t.uffds
    assert (u3.installed_ranges, u3.page_map_lost) == (runs, 2)
    assert (u4.installed_ranges, u4.page_map_lost) == (None, None)
    assert t.registered_ranges == ((0x7f0000000000, 512),)  # the procfs reading did not blank it


def test_identity_is_remembered_and_a_better_one_replaces_a_worse_one():
    m = Memory()
    build([Reading("procfs", identities=(VcpuIdentity(10, 11, 5, "thread_name"),),
                   targets=(TargetInfo(10, "qemu"),))], m)
    s, _ = build([Reading("procfs", targets=(TargetInfo(10, "qemu"),))], m)
    assert s.targets[0].vcpus[0].vcpu == 5  # learned once, shown afterwards
    s, _ = build([Reading("engine", identities=(VcpuIdentity(10, 11, 1, "engine"),)),
                  Reading("procfs", identities=(VcpuIdentity(10, 11, 5, "thread_name"),))], m)
    assert (s.targets[0].vcpus[0].vcpu, s.targets[0].vcpus[0].identity) == (1, "engine")


def test_vcpus_sorted_by_index_then_unidentified_threads():
    r = Reading("ebpf", threads=(tf(tid=30, faults=1), tf(tid=20, faults=1), tf(tid=21, faults=1)),
                identities=(VcpuIdentity(10, 21, 0, "debugfs"), VcpuIdentity(10, 20, 1, "debugfs")))
    s, _ = build([r])
    assert [(v.vcpu, v.tid) for v in s.targets[0].vcpus] == [(0, 21), (1, 20), (None, 30)]


def test_new_and_gone_targets_become_events_and_gone_ones_are_dropped():
    m = Memory()
    s, _ = build([Reading("procfs", targets=(TargetInfo(10, "qemu"), TargetInfo(12, "fc")))], m)
    assert sorted(e.kind for e in s.events) == ["target-new", "target-new"]
    last = ThreadFaults(10, 11, 7, 7000, 0, 0, 0, 7, 1000, (7,) + (0,) * 23)
    s, _ = build([Reading("procfs", targets=(TargetInfo(12, "fc"),), gone=(10,), threads=(last,),
                          identities=(VcpuIdentity(12, 13, 0, "debugfs"),))], m)
    # The exiting target's last interval is still reported, once, with the event.
    assert [t.pid for t in s.targets] == [10, 12]
    assert [v.faults for v in s.targets[0].vcpus] == [7]
    assert [(e.kind, "10" in e.text, "qemu" in e.text) for e in s.events] == [("target-gone", True, True)]
    assert all(k[0] != 10 for k in m.identities)
    s, _ = build([Reading("procfs", targets=(TargetInfo(12, "fc"),))], m)
    assert [t.pid for t in s.targets] == [12] and s.events == ()


def test_migration_eta_from_pages_received_per_interval():
    m = Memory()
    mi = MigrationInfo(10, "engine", "postcopy", pages_total=1000, pages_received=100)
    s, _ = build([Reading("engine", migrations=(mi,))], m, interval=1.0)
    assert s.targets[0].migration.eta_s is None  # no rate yet
    s, _ = build([Reading("engine", migrations=(mi._replace(pages_received=300),))], m, interval=1.0)
    mig = s.targets[0].migration
    assert (mig.state, mig.pages_received, mig.eta_s) == ("postcopy", 300, 3.5)


def test_stats_measures_the_interval_reports_source_errors_and_hands_new_pids_on():
    class Broken(Scripted):
        def collect(self):
            raise OSError("map read failed")

    mono = Clock(10.0)
    scripted = Scripted("procfs", [Reading("procfs", targets=(TargetInfo(10, "qemu"),),
                                           events=("pid 10 opened userfaultfd fd 3",))])
    st = Stats([Broken("ebpf", []), scripted], "ebpf", clock=Clock(5.0), monotonic=mono)
    mono.t = 10.25
    s = st.collect()
    assert s.interval_s == 0.25 and s.seq == 1 and s.sources == ("ebpf", "procfs")
    kinds = {e.kind: e.text for e in s.events}
    assert "map read failed" in kinds["error"] and "opened userfaultfd" in kinds["source"]
    assert [t.pid for t in s.targets] == [10]
    assert scripted.added == [10]
    mono.t = 11.25
    assert st.collect().interval_s == 1.0
    assert scripted.added == [10]  # told once
    st.close()
    assert scripted.closed


def test_stats_over_real_procfs_drops_an_exiting_target_and_goes_on():
    with holder(2) as (proc, pid, fd):
        src = ProcfsSource([pid], sample_hz=50)
        st = Stats([src], "procfs")
        src.start()
        try:
            time.sleep(0.1)
            s = st.collect()
            (t,) = s.targets
            assert t.pid == pid and t.uffds[0].fd == fd and t.uffds[0].pending_max >= 2
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=10)
            s = st.collect()  # the exit interval: reported with its event, then dropped
            assert [t.pid for t in s.targets] == [pid]
            assert any(e.kind == "target-gone" and str(pid) in e.text for e in s.events)
            s = st.collect()  # and it goes on
            assert s.seq == 3 and s.targets == () and s.events == ()
        finally:
            st.close()


def test_a_vcpu_thread_that_exits_is_no_longer_listed():
    m = Memory()
    ti = TargetInfo(10, "qemu", thread_names={10: "qemu", 11: "CPU 0/KVM", 12: "CPU 1/KVM"})
    s, _ = build([Reading("procfs", targets=(ti,), identities=(VcpuIdentity(10, 11, 0, "thread_name"),
                                                               VcpuIdentity(10, 12, 1, "thread_name")))], m)
    assert [v.tid for v in s.targets[0].vcpus] == [11, 12]
    s, _ = build([Reading("procfs", targets=(ti._replace(thread_names={10: "qemu", 11: "CPU 0/KVM"}),))], m)
    assert [(v.tid, v.name) for v in s.targets[0].vcpus] == [(11, "CPU 0/KVM")]


def test_a_vcpu_index_is_owned_by_the_most_trusted_claim():
    m = Memory()
    # thread names say tid 11 is vCPU 0; the probes know tid 12 is vCPU 0.
    build([Reading("procfs", identities=(VcpuIdentity(10, 11, 0, "thread_name"),))], m)
    build([Reading("ebpf", identities=(VcpuIdentity(10, 12, 0, "kvm_create_vcpu"),))], m)
    assert {k: v.how for k, v in m.identities.items()} == {(10, 12): "kvm_create_vcpu"}
    build([Reading("procfs", identities=(VcpuIdentity(10, 11, 0, "thread_name"),))], m)
    assert {k: v.how for k, v in m.identities.items()} == {(10, 12): "kvm_create_vcpu"}
