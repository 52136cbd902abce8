"""The aggregator: sources -> one immutable Sample per interval.

`Stats.collect()` asks every source for its Reading, merges them per
(pid, tid) and (pid, fd), turns counts into rates and histograms into
percentiles (pctop.rates), and remembers what must outlive one interval:
which targets exist (new ones and gone ones become Events) and which thread
is which vCPU (an identity is often learned once, e.g. at KVM_CREATE_VCPU).

No global state: a Stats instance can live in a worker thread (the TUI's)
while the UI thread only ever sees the frozen Samples it hands out.
The merge itself is the pure function `build_sample`.

Merging rule: sources are listed in order of trust (ebpf, engine, procfs).
For a thread's fault counts, a uffd's handler counters or a migration, the
first source that reports it wins: summing two sources that saw the same
faults would double them. Queue depth comes from whichever source sampled
the fdinfo gauges most often. vCPU identities are ranked by how they were
learned (see IDENTITY_TRUST).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from pctop import rates
from pctop.hist import EMPTY
from pctop.model import Event, Migration, ProbeTier, Sample, StallParts, Target, UffdSample, VcpuSample
from pctop.sources.readings import (
    MigrationInfo,
    Reading,
    TargetInfo,
    ThreadFaults,
    UffdCounters,
    UffdDepth,
    VcpuIdentity,
)

# Higher wins. KVM_CREATE_VCPU + KVM_RUN seen by the probes is exact; a vCPU
# fd's index (from /proc) plus KVM_RUN on it, the engine's own word, QEMU's
# query-cpus-fast (qmp) and debugfs are exact too; thread names are a convention.
IDENTITY_TRUST = {"kvm_create_vcpu": 5, "kvm_vcpu_fd": 4, "kvm_exit": 4, "engine": 4, "qmp": 4,
                  "debugfs": 3, "thread_name": 1}


@dataclass
class Memory:
    """What the aggregator remembers between intervals (per Stats instance)."""

    comms: dict[int, str] = field(default_factory=dict)  # live targets
    identities: dict[tuple[int, int], VcpuIdentity] = field(default_factory=dict)
    thread_names: dict[tuple[int, int], str] = field(default_factory=dict)
    pages_received: dict[int, int] = field(default_factory=dict)  # for migration ETA
    vm_names: dict[int, str] = field(default_factory=dict)  # pid -> guest name, once a source knew it


@dataclass
class Merged:
    """All readings of one interval, merged by key (first source wins)."""

    threads: dict[tuple[int, int], ThreadFaults] = field(default_factory=dict)
    counters: dict[tuple[int, int], UffdCounters] = field(default_factory=dict)
    depths: dict[tuple[int, int], UffdDepth] = field(default_factory=dict)
    identities: list[VcpuIdentity] = field(default_factory=list)
    targets: dict[int, TargetInfo] = field(default_factory=dict)
    migrations: dict[int, MigrationInfo] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (source, text)


def merge_readings(readings: Iterable[Reading]) -> Merged:
    """Merge the readings of one interval, in source-trust order."""
    m = Merged()
    for r in readings:
        for t in r.threads:
            m.threads.setdefault((t.pid, t.tid), t)
        for c in r.uffds:
            m.counters.setdefault((c.pid, c.fd), c)
        for d in r.depths:
            seen_depth = m.depths.get((d.pid, d.fd))
            if seen_depth is None or d.samples > seen_depth.samples:
                m.depths[(d.pid, d.fd)] = d
        m.identities.extend(r.identities)
        for ti in r.targets:
            old = m.targets.get(ti.pid)
            if old is None:
                m.targets[ti.pid] = ti
            else:  # fill what the more trusted source left open
                m.targets[ti.pid] = old._replace(
                    comm=old.comm or ti.comm,
                    handler_cpu_pct=old.handler_cpu_pct if old.handler_cpu_pct is not None
                    else ti.handler_cpu_pct,
                    thread_names={**ti.thread_names, **old.thread_names},
                    registered_ranges=old.registered_ranges if old.registered_ranges is not None
                    else ti.registered_ranges,
                    serves=old.serves or ti.serves,
                    vm_name=old.vm_name or ti.vm_name)
        for mi in r.migrations:
            m.migrations.setdefault(mi.pid, mi)
        m.gone.update(r.gone)
        m.notes.extend((r.source, text) for text in r.events)
    return m


def remember_identity(known: dict[tuple[int, int], VcpuIdentity], ident: VcpuIdentity) -> None:
    """Keep the most trusted identity per thread. A less trusted source never
    overrides a more trusted one, neither for the thread nor for a vCPU index
    the more trusted one placed on another thread (that claim is dropped)."""
    rank = IDENTITY_TRUST.get(ident.how, 0)
    old = known.get((ident.pid, ident.tid))
    if old is not None and IDENTITY_TRUST.get(old.how, 0) > rank:
        return
    rivals = [k for k, v in known.items() if k[0] == ident.pid and k[1] != ident.tid and v.vcpu == ident.vcpu]
    if any(IDENTITY_TRUST.get(known[k].how, 0) > rank for k in rivals):
        return
    for k in rivals:
        del known[k]
    known[(ident.pid, ident.tid)] = ident


def vcpu_sample(tf: ThreadFaults | None, ident: VcpuIdentity | None, tid: int, name: str,
                interval_s: float) -> VcpuSample:
    """One thread's row: counts of the interval turned into rates and percentiles."""
    vcpu = ident.vcpu if ident else None
    how = ident.how if ident else "unknown"
    if tf is None:
        return VcpuSample(vcpu=vcpu, tid=tid, name=name, identity=how)
    max_us = rates.max_stall_us(tf.max_ns, tf.faults)
    p50, p90, p99 = rates.stall_percentiles(tf.hist, max_us)
    exits = dict(tf.exits)
    return VcpuSample(
        vcpu=vcpu, tid=tid, name=name, identity=how,
        faults=tf.faults, faults_per_s=rates.per_second(tf.faults, interval_s),
        stall_ns=tf.stall_ns, stalled_frac=rates.stalled_fraction(tf.stall_ns, interval_s),
        p50_us=p50, p90_us=p90, p99_us=p99, max_us=max_us,
        hist=tuple(tf.hist) if len(tf.hist) == len(EMPTY) else EMPTY,
        parts=StallParts(queued_ns=tf.queued_ns, service_ns=tf.service_ns, runq_ns=tf.runq_ns),
        faults_no_read=tf.faults_no_read,
        exits=exits, exits_per_s=rates.per_second(sum(exits.values()), interval_s),
        memory_fault_exits=tf.memory_fault_exits)


def uffd_sample(fd: int, c: UffdCounters | None, d: UffdDepth | None, interval_s: float) -> UffdSample:
    c = c or UffdCounters(pid=0, fd=fd)
    return UffdSample(
        fd=fd,
        pending_mean=d.pending_mean if d else 0.0, pending_max=d.pending_max if d else 0,
        total_mean=d.total_mean if d else 0.0, total_max=d.total_max if d else 0,
        in_service_max=d.in_service_max if d else None,
        msgs_read=c.msgs_read, read_calls=c.read_calls,
        pages_installed=c.pages_installed, bytes_installed=c.bytes_installed,
        copies=c.copies, zeropages=c.zeropages, continues=c.continues, wakes=c.wakes,
        eexist=c.eexist,
        reads_per_s=rates.per_second(c.msgs_read, interval_s),
        installs_per_s=rates.per_second(c.pages_installed, interval_s),
        bytes_per_s=rates.per_second(c.bytes_installed, interval_s),
        installed_ranges=c.installed_ranges,
        page_map_lost=c.page_map_lost if c.installed_ranges is not None else None,
        serves_pid=c.serves_pid)


def migration_sample(mi: MigrationInfo, prev_received: int | None, interval_s: float) -> Migration:
    """Migration progress; the ETA comes from pages received this interval."""
    eta = None
    if mi.pages_received is not None and mi.pages_total is not None and prev_received is not None:
        per_s = rates.per_second(rates.counter_delta(mi.pages_received, prev_received), interval_s)
        eta = rates.eta_s(mi.pages_total - mi.pages_received, per_s)
    return Migration(source=mi.source, state=mi.state, pages_total=mi.pages_total,
                     pages_received=mi.pages_received, pages_demand=mi.pages_demand,
                     pages_background=mi.pages_background, bandwidth_bps=mi.bandwidth_bps,
                     eta_s=eta, extra=dict(mi.extra))


def _vcpu_sort_key(v: VcpuSample) -> tuple[int, int, int]:
    return (0, v.vcpu, v.tid) if v.vcpu is not None else (1, 0, v.tid)


def build_sample(merged: Merged, memory: Memory, *, now: float, interval_s: float, seq: int,
                 probe_tier: ProbeTier, sources: tuple[str, ...]) -> Sample:
    """Pure apart from updating `memory`: one interval's merged readings -> Sample."""
    events: list[Event] = []
    for ident in merged.identities:
        remember_identity(memory.identities, ident)
    exited_with_faults: set[tuple[int, int]] = set()
    for pid, info in merged.targets.items():
        if info.thread_names:  # the source lists every thread: forget those that exited,
            for d in (memory.identities, memory.thread_names):
                for key in [k for k in d if k[0] == pid and k[1] not in info.thread_names]:
                    if key in merged.threads:  # but only after the row of their last faults
                        exited_with_faults.add(key)
                    else:
                        del d[key]
        for tid, name in info.thread_names.items():
            memory.thread_names[(pid, tid)] = name

    seen = (set(merged.targets) | {p for p, _ in merged.threads} | {p for p, _ in merged.counters}
            | {p for p, _ in merged.depths} | set(merged.migrations))
    for pid in sorted(seen - set(memory.comms)):
        new = merged.targets.get(pid)
        memory.comms[pid] = new.comm if new else ""
        events.append(Event(now, "target-new", f"watching pid {pid} ({memory.comms[pid] or '?'})"))
    # A target that exited still reports its last interval (a source sends the
    # final counts in the same reading that marks it gone); it is forgotten after.
    gone_now = sorted(merged.gone & set(memory.comms))
    for pid in gone_now:
        events.append(Event(now, "target-gone", f"pid {pid} ({memory.comms[pid] or '?'}) exited"))
    for src, text in merged.notes:
        events.append(Event(now, "source", f"{src}: {text}"))

    served_by: dict[int, list[int]] = {}
    for pid, info in merged.targets.items():
        for to in info.serves:
            served_by.setdefault(to, []).append(pid)
    targets = []
    # a separate handler process right after the process it serves: one migration, side by side
    serves_of = {pid: info.serves for pid, info in merged.targets.items() if info.serves}
    for pid in sorted(memory.comms, key=lambda p: (min(serves_of[p]) if p in serves_of else p, p)):
        ti = merged.targets.get(pid)
        if ti and ti.comm:
            memory.comms[pid] = ti.comm
        tids = {t for p, t in merged.threads if p == pid} | {t for p, t in memory.identities if p == pid}
        vcpus = sorted((vcpu_sample(merged.threads.get((pid, tid)), memory.identities.get((pid, tid)),
                                    # a process's main thread is named like the process: the
                                    # name of one that exited before /proc was read
                                    tid, memory.thread_names.get((pid, tid))
                                    or (memory.comms[pid] if tid == pid else ""), interval_s)
                        for tid in tids), key=_vcpu_sort_key)
        fds = {f for p, f in merged.counters if p == pid} | {f for p, f in merged.depths if p == pid}
        uffds = tuple(uffd_sample(fd, merged.counters.get((pid, fd)), merged.depths.get((pid, fd)),
                                  interval_s) for fd in sorted(fds))
        mig = None
        if pid in merged.migrations:
            mi = merged.migrations[pid]
            vmm = mi.extra.get("vcpu_blocktime_ms") or ()  # QMP: QEMU's blocktime, by vCPU index
            vcpus = [replace(v, vmm_blocktime_ms=vmm[v.vcpu]) if v.vcpu is not None and v.vcpu < len(vmm)
                     else v for v in vcpus]
            mig = migration_sample(mi, memory.pages_received.get(pid), interval_s)
            if mi.pages_received is not None:
                memory.pages_received[pid] = mi.pages_received
        if ti and ti.vm_name:
            memory.vm_names[pid] = ti.vm_name
        targets.append(Target(pid=pid, comm=memory.comms[pid], vcpus=tuple(vcpus), uffds=uffds,
                              handler_cpu_pct=ti.handler_cpu_pct if ti else None, migration=mig,
                              registered_ranges=ti.registered_ranges if ti else None,
                              serves=ti.serves if ti else (), served_by=tuple(sorted(served_by.get(pid, ()))),
                              vm_name=memory.vm_names.get(pid)))
    for pid in gone_now:
        _forget(memory, pid)
    for key in exited_with_faults:
        memory.identities.pop(key, None)
        memory.thread_names.pop(key, None)
    return Sample(time=now, interval_s=interval_s, seq=seq, probe_tier=probe_tier,
                  sources=sources, targets=tuple(targets), events=tuple(events))


def _forget(memory: Memory, pid: int) -> None:
    memory.comms.pop(pid, None)
    memory.vm_names.pop(pid, None)
    memory.pages_received.pop(pid, None)
    for d in (memory.identities, memory.thread_names):
        for key in [k for k in d if k[0] == pid]:
            del d[key]


class Stats:
    """Sources in, one Sample per `collect()` out. Not thread-safe by itself:
    call it from one (worker) thread; the Samples it returns are immutable."""

    def __init__(self, sources: Sequence, probe_tier: ProbeTier, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.sources = list(sources)
        self.probe_tier = probe_tier
        self._clock = clock
        self._mono = monotonic
        self._memory = Memory()
        self._seq = 0
        self._last = monotonic()
        self._announced: set[int] = set()  # pids already handed to add_pid()

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    def start(self) -> None:
        """Start every source; a source that fails to start is closed and the
        error propagates (the caller decides whether to degrade)."""
        for s in self.sources:
            s.start()
        self._last = self._mono()

    def collect(self) -> Sample:
        readings = []
        errors = []
        for s in self.sources:
            try:
                readings.append(s.collect())
            except Exception as e:  # a failing source must not stop the others
                errors.append(f"{s.name} failed: {type(e).__name__}: {e}")
        mono = self._mono()
        interval = max(mono - self._last, 1e-9)
        self._last = mono
        self._seq += 1
        merged = merge_readings(readings)
        sample = build_sample(merged, self._memory, now=self._clock(), interval_s=interval,
                              seq=self._seq, probe_tier=self.probe_tier, sources=self.source_names)
        if errors:
            sample = _with_events(sample, [Event(sample.time, "error", e) for e in errors])
        for pid in sorted(set(self._memory.comms) - self._announced):
            self._tell_sources(pid)
        self._announced &= set(self._memory.comms)
        return sample

    def _tell_sources(self, pid: int) -> None:
        """New targets found by one source (procfs discovery) are handed to the
        sources that watch a pid list (the eBPF source)."""
        self._announced.add(pid)
        for s in self.sources:
            add = getattr(s, "add_pid", None)
            if add is not None:
                try:
                    add(pid)
                except Exception:
                    pass  # the source reports its own trouble in its next reading

    def close(self) -> None:
        for s in self.sources:
            try:
                s.close()
            except Exception:
                pass


def _with_events(sample: Sample, extra: list[Event]) -> Sample:
    return replace(sample, events=sample.events + tuple(extra))
