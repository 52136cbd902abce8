"""The engine's own counters: the ground truth pctop's probes are checked against.

Everything is cumulative since the run started (clients diff). Updated from
the receiver, reader and vCPU threads under one lock (a few hundred ns per
fault, small against a ~50 us round trip to the source).
"""

from __future__ import annotations

import array
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pctop.engine.uffd import read_fdinfo
from pctop.hist import bucket_index
from pctop.model import HIST_BUCKETS


@dataclass
class VcpuStats:
    vcpu: int
    tid: int = 0
    faults: int = 0
    stall_ns: int = 0
    max_ns: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)
    # The handler's clock of the same stalls: uffd read returned (or KVM_RUN returned,
    # vcpu-exit) -> the UFFDIO_COPY that installed the page was called. It lies inside
    # every stall the kernel sees, so tests compare it with pctop's histogram stall for
    # stall. Only faults whose page this engine's own install put in (no EEXIST).
    handler_stalls: int = 0
    handler_hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)


@dataclass
class ReaderStats:
    name: str
    tid: int = 0
    busy_ns: int = 0
    msgs: int = 0
    reads: int = 0


@dataclass
class UffdGauge:
    fd: int
    pending: int = 0
    total: int = 0
    pending_max: int = 0
    total_max: int = 0
    samples: int = 0


MAX_SAMPLES = 1 << 20


class Telemetry:
    def __init__(self, vcpus: int, pages_total: int, page_size: int):
        self.lock = threading.Lock()
        self.page_size = page_size
        self.pages_total = pages_total
        self.vcpus = [VcpuStats(i) for i in range(vcpus)]
        self.other_faults = 0  # faults from threads that are not vCPUs
        self.other_stall_ns = 0
        self.pages_demand = 0
        self.pages_background = 0  # includes prefetch
        self.pages_prefetch = 0
        self.eexist = 0
        self.requests = 0
        self.readers: list[ReaderStats] = []
        self.uffds: list[UffdGauge] = []
        self.started = time.monotonic()
        self.vcpu_started: float | None = None
        self.vcpu_stopped: float | None = None
        self.stream_first: float | None = None  # first and last background install
        self.stream_last: float | None = None
        self._bw_window: list[tuple[float, int]] = []  # (time, background bytes) samples
        # Exact stalls of vCPU faults (the first MAX_SAMPLES): percentiles finer than the
        # log2 histogram, for the summary and bench/latency.py.
        self.stall_samples = array.array("Q")
        # The workload's own stall clocks (KvmWorkload.stall_clocks: the guest's TSC and
        # KVM_RUN timed natively), merged into per_vcpu; None for the thread workload.
        self.stall_clocks: Callable[[], list] | None = None
        self.stall_clock: str | None = None  # how the workload timed KVM_RUN: native | python

    # --- updates (hot path) ---
    def stall(self, vcpu: int, ns: int, handler_ns: int | None = None) -> None:
        """One fault of `vcpu` (-1: not a vCPU) that stalled `ns` from seen to installed;
        handler_ns: seen -> the installing COPY called, when this engine installed it."""
        with self.lock:
            self.stall_locked(vcpu, ns, handler_ns)

    def stall_locked(self, vcpu: int, ns: int, handler_ns: int | None = None) -> None:
        """stall() for a caller already holding self.lock."""
        if 0 <= vcpu < len(self.vcpus):
            v = self.vcpus[vcpu]
            if handler_ns is not None:
                v.handler_stalls += 1
                v.handler_hist[bucket_index(handler_ns / 1000)] += 1
            v.faults += 1
            v.stall_ns += ns
            if ns > v.max_ns:
                v.max_ns = ns
            v.hist[bucket_index(ns / 1000)] += 1
            if len(self.stall_samples) < MAX_SAMPLES:
                self.stall_samples.append(ns)
        else:
            self.other_faults += 1
            self.other_stall_ns += ns

    def installed(self, demand: int, background: int, prefetch: int, eexist: int) -> None:
        with self.lock:
            if background or prefetch:
                self.stream_last = time.monotonic()
                if self.stream_first is None:
                    self.stream_first = self.stream_last
            self.pages_demand += demand
            self.pages_background += background + prefetch
            self.pages_prefetch += prefetch
            self.eexist += eexist

    def add_reader(self, name: str) -> ReaderStats:
        r = ReaderStats(name)
        with self.lock:
            self.readers.append(r)
        return r

    # --- derived ---
    @property
    def pages_received(self) -> int:
        return self.pages_demand + self.pages_background

    def vcpu_seconds(self) -> float:
        if self.vcpu_started is None:
            return 0.0
        end = self.vcpu_stopped if self.vcpu_stopped is not None else time.monotonic()
        return max(0.0, end - self.vcpu_started)

    def faults_total(self) -> int:
        return sum(v.faults for v in self.vcpus)

    def fault_rate(self) -> float:
        secs = self.vcpu_seconds()
        return self.faults_total() / secs if secs > 0 else 0.0

    def stall_percentile_us(self, q: float) -> float:
        """The q-quantile (0..1) of the recorded vCPU fault stalls, microseconds."""
        with self.lock:
            s = sorted(self.stall_samples)
        if not s:
            return 0.0
        return round(s[min(len(s) - 1, int(q * len(s)))] / 1000, 1)

    def sample_uffds(self, pid: int | None = None) -> None:
        """Read each uffd's queue depth from fdinfo (a gauge: exact at the instant read)."""
        pid = os.getpid() if pid is None else pid
        for g in self.uffds:
            try:
                info = read_fdinfo(pid, g.fd)
            except (OSError, ValueError):
                continue
            g.pending, g.total, g.samples = info.pending, info.total, g.samples + 1
            g.pending_max = max(g.pending_max, info.pending)
            g.total_max = max(g.total_max, info.total)

    def bandwidth_bps(self) -> float:
        """Background bytes/s over about the last second."""
        with self.lock:  # status() runs on control-client threads too
            now = time.monotonic()
            b = self.pages_background * self.page_size
            w = self._bw_window
            w.append((now, b))
            while len(w) > 2 and now - w[1][0] >= 1.0:
                w.pop(0)
            dt = now - w[0][0]
            return (b - w[0][1]) / dt if dt > 0 else 0.0

    def counters(self) -> dict:
        """The cumulative counters shared by status replies, progress lines and the summary."""
        with self.lock:
            per_vcpu = [{"vcpu": v.vcpu, "tid": v.tid, "faults": v.faults, "stall_ns": v.stall_ns,
                         "max_ns": v.max_ns, "hist": list(v.hist), "handler_stalls": v.handler_stalls,
                         "handler_hist": list(v.handler_hist)} for v in self.vcpus]
            readers = [{"name": r.name, "tid": r.tid, "busy_ns": r.busy_ns, "msgs": r.msgs,
                        "reads": r.reads} for r in self.readers]
            d = {
                "elapsed_s": round(time.monotonic() - self.started, 3),
                "pages_total": self.pages_total,
                "pages_received": self.pages_received,
                "pages_demand": self.pages_demand,
                "pages_background": self.pages_background,
                "pages_prefetch": self.pages_prefetch,
                "bytes_received": self.pages_received * self.page_size,
                "eexist": self.eexist,
                "requests": self.requests,
                "other_faults": self.other_faults,
            }
        if self.stall_clocks is not None:
            for v, clocks in zip(per_vcpu, self.stall_clocks()):
                v.update(clocks._asdict())
        d["stall_clock"] = self.stall_clock
        d["faults_total"] = sum(v["faults"] for v in per_vcpu)
        d["fault_rate"] = round(self.fault_rate(), 1)
        d["per_vcpu"] = per_vcpu
        d["reader_threads"] = readers
        d["uffds"] = [{"fd": g.fd, "pending": g.pending, "total": g.total,
                       "pending_max": g.pending_max, "total_max": g.total_max} for g in self.uffds]
        return d
