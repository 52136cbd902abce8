"""Recent history the views draw (sparklines, detail screen, cumulative histograms).

Kept by the App from the Samples it has shown; pure data, no Textual. A gap
in `seq` (a seek in a replay, a restart of the feed) clears it, so a
sparkline never joins two unrelated stretches of time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pctop.model import HIST_BUCKETS, Event, Sample, StallParts, VcpuSample

HISTORY_LEN = 120  # samples kept per series (2 minutes at 1 Hz)

VcpuKey = tuple[int, int]  # (pid, tid)
UffdKey = tuple[int, int]  # (pid, fd)


def vcpu_key(pid: int, v: VcpuSample) -> VcpuKey:
    return (pid, v.tid)


@dataclass
class VcpuSeries:
    faults_per_s: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    stalled_frac: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    p99_us: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    vmm_blocktime_ms: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))  # None: not reported
    times: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    hist_total: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)
    parts_total: list[int] = field(default_factory=lambda: [0, 0, 0])
    faults_total: int = 0
    stall_ns_total: int = 0
    max_us: float | None = None  # longest stall since watching (bounds the histogram's percentiles)
    vmm_blocktime_ms_total: float | None = None  # None until the VMM reports one


@dataclass
class UffdSeries:
    pending: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    in_service: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    peak: float = 0.0  # largest total seen, the gauges' scale


def add_parts(acc: list[int], p: StallParts) -> None:
    acc[0] += p.queued_ns
    acc[1] += p.service_ns
    acc[2] += p.runq_ns


class History:
    def __init__(self) -> None:
        self.vcpus: dict[VcpuKey, VcpuSeries] = {}
        self.uffds: dict[UffdKey, UffdSeries] = {}
        self.hist_total = [0] * HIST_BUCKETS  # all vCPUs, since watching
        self.parts_total = [0, 0, 0]
        self.max_us: float | None = None  # all vCPUs, since watching
        self.last_seq: int | None = None
        self.samples = 0
        # Whole-run series for the timeline: one point per Sample.
        self.total_faults: deque = deque(maxlen=HISTORY_LEN)
        self.mean_stalled: deque = deque(maxlen=HISTORY_LEN)
        self.queue_depth: deque = deque(maxlen=HISTORY_LEN)

    def clear(self) -> None:
        self.__init__()

    def add(self, s: Sample) -> None:
        if self.last_seq is not None and s.seq != self.last_seq + 1:
            self.clear()
        self.last_seq = s.seq
        self.samples += 1
        vcpus = [v for t in s.targets for v in t.vcpus if v.vcpu is not None]
        self.total_faults.append(sum(v.faults_per_s for t in s.targets for v in t.vcpus))
        self.mean_stalled.append(sum(v.stalled_frac for v in vcpus) / len(vcpus) if vcpus else 0.0)
        self.queue_depth.append(sum(u.total_mean for t in s.targets for u in t.uffds))
        for t in s.targets:
            for v in t.vcpus:
                ser = self.vcpus.get((t.pid, v.tid))
                if ser is None:
                    ser = self.vcpus[(t.pid, v.tid)] = VcpuSeries()
                ser.faults_per_s.append(v.faults_per_s)
                ser.stalled_frac.append(v.stalled_frac)
                ser.p99_us.append(v.p99_us or 0.0)
                ser.vmm_blocktime_ms.append(v.vmm_blocktime_ms)
                ser.times.append(s.time)
                ser.faults_total += v.faults
                ser.stall_ns_total += v.stall_ns
                if v.max_us is not None:
                    ser.max_us = max(ser.max_us or 0.0, v.max_us)
                    self.max_us = max(self.max_us or 0.0, v.max_us)
                if v.vmm_blocktime_ms is not None:
                    ser.vmm_blocktime_ms_total = (ser.vmm_blocktime_ms_total or 0.0) + v.vmm_blocktime_ms
                for i, c in enumerate(v.hist[:HIST_BUCKETS]):
                    ser.hist_total[i] += c
                    self.hist_total[i] += c
                add_parts(ser.parts_total, v.parts)
                add_parts(self.parts_total, v.parts)
            for u in t.uffds:
                us = self.uffds.get((t.pid, u.fd))
                if us is None:
                    us = self.uffds[(t.pid, u.fd)] = UffdSeries()
                us.pending.append(u.pending_mean)
                us.in_service.append(max(0.0, u.total_mean - u.pending_mean))
                us.peak = max(us.peak, float(u.total_max), float(u.pending_max), u.total_mean)


def state_events(prev: Sample | None, s: Sample) -> list[Event]:
    """Migration state and background-stream changes between two Samples, as
    events for the log (sources report levels; the log wants the edges). A
    source that reports its own "state" event for a pid is trusted instead."""
    if prev is None:
        return []
    own = {e.text.split(":", 1)[0] for e in s.events if e.kind == "state"}
    before = {t.pid: t.migration for t in prev.targets if t.migration is not None}
    out = []
    for t in s.targets:
        m, old = t.migration, before.get(t.pid)
        if m is None or old is None or str(t.pid) in own:
            continue
        if m.state != old.state:
            out.append(Event(s.time, "state", f"{t.pid}: migration {old.state} → {m.state}"))
        bg, old_bg = m.background, old.background
        if bg and old_bg and bg != old_bg:
            out.append(Event(s.time, "state", f"{t.pid}: background stream {old_bg} → {bg}"))
        lim, old_lim = m.bandwidth_limit_bps, old.bandwidth_limit_bps
        if lim is not None and old_lim is not None and lim != old_lim:
            fmt = lambda b: f"{b / (1 << 20):g} MiB/s" if b else "unlimited"  # noqa: E731
            out.append(Event(s.time, "state", f"{t.pid}: bandwidth limit {fmt(old_lim)} → {fmt(lim)}"))
    return out
