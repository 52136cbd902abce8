"""Samples in, Prometheus series out.

A Sample carries what happened in one interval; Prometheus wants counters that only
grow. `Exporter.observe()` adds each interval's counts to running totals per series
(vm, pid, vCPU index / uffd fd) and keeps the last interval's gauges; `collect()`
(prometheus_client's custom-collector protocol) renders them at scrape time. Names,
help and labels come from pctop/export/metrics.py.

Thread-safety: observe() runs in the thread that collects Samples, collect() in the
HTTP server's threads; one lock guards the totals.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric as Family,
)
from prometheus_client.utils import floatToGoString

from pctop.export.metrics import METRICS, STATES, bucket_edges_s
from pctop.model import HIST_BUCKETS, SCHEMA_VERSION, Header, Migration, Sample, Target

OTHER = "other"  # the vcpu label of faulting threads that are not vCPUs, summed
_LE = [floatToGoString(e) for e in bucket_edges_s()] + ["+Inf"]
_PARTS = (("queued", "queued_ns"), ("service", "service_ns"), ("runqueue", "runq_ns"))
_OPS = (("copy", "copies"), ("zeropage", "zeropages"), ("continue", "continues"), ("wake", "wakes"))
_QEMU_GAUGES = (("qemu_blocktime", "postcopy_blocktime_ms", 1e-3), ("qemu_requests", "postcopy_requests", 1),
                ("qemu_transferred", "ram_transferred_bytes", 1), ("qemu_remaining", "ram_remaining_bytes", 1),
                ("qemu_dirty", "dirty_pages_rate", 1))


@dataclass
class VcpuTotals:
    faults: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)
    stall_ns: int = 0
    parts_ns: list[int] = field(default_factory=lambda: [0] * len(_PARTS))
    no_read: int = 0
    exits: dict[str, int] = field(default_factory=dict)
    memory_fault_exits: int = 0
    vmm_blocktime_ms: float | None = None  # None until the VMM reports it


@dataclass
class UffdTotals:
    msgs_read: int = 0
    pages: int = 0
    bytes: int = 0
    ops: list[int] = field(default_factory=lambda: [0] * len(_OPS))
    eexist: int = 0
    # gauges of the last interval the uffd was reported in; 0 in an interval it was not
    pending_mean: float = 0.0
    pending_max: int = 0
    in_service_mean: float = 0.0
    unresolved_max: int = 0


@dataclass
class TargetTotals:
    vm: str
    vcpus: dict[str, VcpuTotals] = field(default_factory=dict)
    uffds: dict[int, UffdTotals] = field(default_factory=dict)
    handler_cpu_s: float = 0.0
    migration: Migration | None = None


def vcpu_label(vcpu: int | None) -> str:
    return OTHER if vcpu is None else str(vcpu)


class Exporter:
    """Running totals over a Sample stream; a prometheus_client collector."""

    def __init__(self, header: Header | None = None) -> None:
        self._lock = threading.Lock()
        self._targets: dict[int, TargetTotals] = {}
        self._gone: set[int] = set()  # left the Samples; removed after the next scrape
        self._samples = 0
        self._last_time: float | None = None
        self._collect_errors = 0
        self._scrape_errors = 0
        self._version = ""
        self._tier = ""
        self._missing = ""
        if header is not None:
            self.set_header(header)

    def set_header(self, header: Header) -> None:
        with self._lock:
            self._version = header.pctop_version
            self._tier = header.probe_tier
            self._missing = ",".join(m.split(":", 1)[0].strip() for m in header.missing)

    # ---- the Sample stream ---------------------------------------------------

    def observe(self, sample: Sample) -> None:
        with self._lock:
            self._samples += 1
            self._last_time = sample.time
            self._collect_errors += sum(1 for e in sample.events if e.kind == "error")
            present = set()
            for t in sample.targets:
                present.add(t.pid)
                self._gone.discard(t.pid)
                self._add_target(t, sample.interval_s)
            self._gone |= set(self._targets) - present

    def _add_target(self, t: Target, interval_s: float) -> None:
        tt = self._targets.get(t.pid)
        if tt is None:
            tt = self._targets[t.pid] = TargetTotals(vm=t.comm)
        if t.comm:
            tt.vm = t.comm
        for v in t.vcpus:
            vt = tt.vcpus.setdefault(vcpu_label(v.vcpu), VcpuTotals())
            vt.faults += v.faults
            vt.hist = [a + b for a, b in zip(vt.hist, v.hist)] if len(v.hist) == HIST_BUCKETS else vt.hist
            vt.stall_ns += v.stall_ns
            for i, (_, attr) in enumerate(_PARTS):
                vt.parts_ns[i] += getattr(v.parts, attr)
            vt.no_read += v.faults_no_read
            for reason, n in v.exits.items():
                vt.exits[reason] = vt.exits.get(reason, 0) + n
            vt.memory_fault_exits += v.memory_fault_exits
            if v.vmm_blocktime_ms is not None:
                vt.vmm_blocktime_ms = (vt.vmm_blocktime_ms or 0.0) + max(0.0, v.vmm_blocktime_ms)
        reported = set()
        for u in t.uffds:
            reported.add(u.fd)
            ut = tt.uffds.setdefault(u.fd, UffdTotals())
            ut.msgs_read += u.msgs_read
            ut.pages += u.pages_installed
            ut.bytes += u.bytes_installed
            for i, (_, attr) in enumerate(_OPS):
                ut.ops[i] += getattr(u, attr)
            ut.eexist += u.eexist
            ut.pending_mean, ut.pending_max = u.pending_mean, u.pending_max
            ut.in_service_mean = max(0.0, u.total_mean - u.pending_mean)
            ut.unresolved_max = u.total_max
        for fd, ut in tt.uffds.items():
            if fd not in reported:
                ut.pending_mean = ut.in_service_mean = 0.0
                ut.pending_max = ut.unresolved_max = 0
        if t.handler_cpu_pct is not None:
            tt.handler_cpu_s += max(0.0, t.handler_cpu_pct) / 100 * interval_s
        if t.migration is not None:
            tt.migration = t.migration

    # ---- scrapes ---------------------------------------------------------------

    def collect(self) -> Iterator[Family]:
        with self._lock:
            families = self._families()
            for pid in self._gone:  # scraped once more since they left: now they go
                self._targets.pop(pid, None)
            self._gone.clear()
        return iter(families)

    def _families(self) -> list[Family]:
        out: list[Family] = []
        for render in (self._vcpu_families, self._uffd_families, self._target_families,
                       self._migration_families):
            try:
                out += render()
            except Exception:  # a bug in one renderer must not cost the whole scrape
                self._scrape_errors += 1
        out += self._self_families()
        return out

    def _vcpu_families(self) -> list[Family]:
        fam = {k: _family(k) for k in ("vcpu_faults", "vcpu_stall", "vcpu_stall_part", "vcpu_no_read",
                                       "vcpu_exits", "vcpu_mf_exits", "qemu_vcpu_blocktime")}
        for pid, tt in sorted(self._targets.items()):
            for vcpu, vt in sorted(tt.vcpus.items(), key=lambda kv: _vcpu_order(kv[0])):
                lv = [tt.vm, str(pid), vcpu]
                fam["vcpu_faults"].add_metric(lv, vt.faults)
                cum, buckets = 0, []
                for le, n in zip(_LE, vt.hist):
                    cum += n
                    buckets.append((le, cum))
                fam["vcpu_stall"].add_metric(lv, buckets, sum_value=vt.stall_ns / 1e9)
                for (part, _), ns in zip(_PARTS, vt.parts_ns):
                    fam["vcpu_stall_part"].add_metric(lv + [part], ns / 1e9)
                fam["vcpu_no_read"].add_metric(lv, vt.no_read)
                for reason, n in sorted(vt.exits.items()):
                    fam["vcpu_exits"].add_metric(lv + [reason], n)
                fam["vcpu_mf_exits"].add_metric(lv, vt.memory_fault_exits)
                if vt.vmm_blocktime_ms is not None:
                    fam["qemu_vcpu_blocktime"].add_metric(lv, vt.vmm_blocktime_ms / 1e3)
        return list(fam.values())

    def _uffd_families(self) -> list[Family]:
        keys = ("uffd_pending_mean", "uffd_pending_max", "uffd_in_service_mean", "uffd_unresolved_max",
                "uffd_msgs", "uffd_pages", "uffd_bytes", "uffd_ioctls", "uffd_eexist")
        fam = {k: _family(k) for k in keys}
        for pid, tt in sorted(self._targets.items()):
            for fd, ut in sorted(tt.uffds.items()):
                lv = [tt.vm, str(pid), str(fd)]
                for k, value in zip(keys, (ut.pending_mean, ut.pending_max, ut.in_service_mean,
                                           ut.unresolved_max, ut.msgs_read, ut.pages, ut.bytes)):
                    fam[k].add_metric(lv, value)
                for (op, _), n in zip(_OPS, ut.ops):
                    fam["uffd_ioctls"].add_metric(lv + [op], n)
                fam["uffd_eexist"].add_metric(lv, ut.eexist)
        return list(fam.values())

    def _target_families(self) -> list[Family]:
        fam = _family("handler_cpu")
        for pid, tt in sorted(self._targets.items()):
            fam.add_metric([tt.vm, str(pid)], tt.handler_cpu_s)
        return [fam]

    def _migration_families(self) -> list[Family]:
        keys = ("mig_state", "mig_progress", "mig_bandwidth", "mig_limit", "mig_eta", "qemu_status")
        fam = {k: _family(k) for k in keys + tuple(k for k, _, _ in _QEMU_GAUGES)}
        for pid, tt in sorted(self._targets.items()):
            m = tt.migration
            if m is None:
                continue
            lv = [tt.vm, str(pid), m.source]
            states = STATES if m.state in STATES else STATES + (m.state,)
            for s in states:
                fam["mig_state"].add_metric(lv + [s], 1.0 if s == m.state else 0.0)
            if m.pages_total and m.pages_received is not None:
                fam["mig_progress"].add_metric(lv, min(1.0, m.pages_received / m.pages_total))
            if m.bandwidth_bps is not None:
                fam["mig_bandwidth"].add_metric(lv, m.bandwidth_bps)
            limit = m.extra.get("bandwidth_limit_bps")
            if isinstance(limit, (int, float)):
                fam["mig_limit"].add_metric(lv, limit)
            if m.eta_s is not None:
                fam["mig_eta"].add_metric(lv, m.eta_s)
            if m.source == "qmp":
                qlv = [tt.vm, str(pid), str(m.extra.get("role", "destination"))]
                for key, field_, scale in _QEMU_GAUGES:
                    v = m.extra.get(field_)
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        fam[key].add_metric(qlv, v * scale)
                if m.extra.get("qemu_status"):
                    fam["qemu_status"].add_metric(qlv + [str(m.extra["qemu_status"])], 1.0)
        return list(fam.values())

    def _self_families(self) -> list[Family]:
        build = _family("build")
        build.add_metric([self._version, str(SCHEMA_VERSION)], {})
        probe = _family("probe")
        if self._tier:
            probe.add_metric([self._tier, self._missing], {})
        samples = _family("samples")
        samples.add_metric([], self._samples)
        out = [build, probe, samples]
        if self._last_time is not None:
            last = _family("last_sample")
            last.add_metric([], self._last_time)
            out.append(last)
        targets = _family("targets")
        targets.add_metric([], len(set(self._targets) - self._gone))
        errors = _family("collect_errors")
        errors.add_metric([], self._collect_errors)
        scrape = _family("scrape_errors")
        scrape.add_metric([], self._scrape_errors)
        return out + [targets, errors, scrape]


def _family(key: str) -> Family:
    m = METRICS[key]
    labels = list(m.labels)
    if m.kind == "counter":
        return CounterMetricFamily(m.full, m.help, labels=labels)
    if m.kind == "gauge":
        return GaugeMetricFamily(m.full, m.help, labels=labels)
    if m.kind == "histogram":
        return HistogramMetricFamily(m.full, m.help, labels=labels)
    if m.kind == "info":
        return InfoMetricFamily(m.full.removesuffix("_info"), m.help, labels=labels)
    raise ValueError(f"unknown metric kind {m.kind!r} for {key}")


def _vcpu_order(label: str) -> tuple[int, int]:
    return (1, 0) if label == OTHER else (0, int(label))
