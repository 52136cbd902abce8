"""Samples in, Prometheus series out.

A Sample carries what happened in one interval; Prometheus wants counters that only
grow. `Exporter.observe()` adds each interval's counts to running totals per series
(vm, pid, vCPU index / uffd fd) and keeps the last interval's gauges; `render()`
writes them at scrape time (pctop/export/text.py). Names, help and labels come from
pctop/export/metrics.py.

Thread-safety: observe() runs in the thread that collects Samples, render() in the
HTTP server's threads; one lock guards the totals.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pctop.export.metrics import STATES, bucket_edges_s
from pctop.export.text import Exposition, label_string, number
from pctop.model import HIST_BUCKETS, SCHEMA_VERSION, Header, Migration, Sample, Target

OTHER = "other"  # the vcpu label of faulting threads that are not vCPUs, summed
_LE = [repr(e) for e in bucket_edges_s()] + ["+Inf"]
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
    in_service_max: int | None = None


@dataclass
class TargetTotals:
    vm: str
    labels: str = ""  # vm="...",pid="...": built once, when the series appears or the vm changes
    vm_in_labels: str = ""
    vcpus: dict[str, VcpuTotals] = field(default_factory=dict)
    uffds: dict[int, UffdTotals] = field(default_factory=dict)
    handler_cpu_s: float = 0.0
    migration: Migration | None = None


def vcpu_label(vcpu: int | None) -> str:
    return OTHER if vcpu is None else str(vcpu)


class Exporter:
    """Running totals over a Sample stream, rendered as /metrics."""

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
        vm = t.vm_name or t.comm  # the guest's name when the VMM was started with one
        tt = self._targets.get(t.pid)
        if tt is None:
            tt = self._targets[t.pid] = TargetTotals(vm=vm)
        if vm:
            tt.vm = vm
        if not tt.labels or tt.vm != tt.vm_in_labels:
            tt.labels, tt.vm_in_labels = label_string(("vm", "pid"), (tt.vm, t.pid)), tt.vm
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
            ut.in_service_max = u.in_service_max
        for fd, ut in tt.uffds.items():
            if fd not in reported:
                ut.pending_mean = ut.in_service_mean = 0.0
                ut.pending_max = 0
                ut.in_service_max = None if ut.in_service_max is None else 0
        if t.handler_cpu_pct is not None:
            tt.handler_cpu_s += max(0.0, t.handler_cpu_pct) / 100 * interval_s
        if t.migration is not None:
            tt.migration = t.migration

    # ---- scrapes ---------------------------------------------------------------

    def render(self, openmetrics: bool = False) -> bytes:
        """The body of one scrape of /metrics. A target that left the Samples is in it
        one last time, then forgotten."""
        with self._lock:
            out = Exposition(openmetrics)
            for render in (self._vcpu_series, self._uffd_series, self._target_series, self._migration_series):
                mark = len(out.parts)
                try:
                    render(out)
                except Exception:  # a bug in one part must not cost the whole scrape
                    del out.parts[mark:]
                    self._scrape_errors += 1
            self._self_series(out)
            for pid in self._gone:
                self._targets.pop(pid, None)
            self._gone.clear()
            return out.body()

    def _vcpus(self):
        for pid, tt in sorted(self._targets.items()):
            for vcpu, vt in sorted(tt.vcpus.items(), key=lambda kv: _vcpu_order(kv[0])):
                yield tt.labels + f',vcpu="{vcpu}"', vt

    def _vcpu_series(self, out: Exposition) -> None:
        vcpus = list(self._vcpus())
        w = out.parts.append
        name = out.family("vcpu_faults")
        for lv, vt in vcpus:
            w(f"{name}{{{lv}}} {vt.faults}\n")
        name = out.family("vcpu_stall")
        bucket, count, total = name + "_bucket", name + "_count", name + "_sum"
        for lv, vt in vcpus:
            cum = 0
            for le, n in zip(_LE, vt.hist):
                cum += n
                w(f'{bucket}{{{lv},le="{le}"}} {cum}\n')
            w(f"{count}{{{lv}}} {cum}\n{total}{{{lv}}} {number(vt.stall_ns / 1e9)}\n")
        name = out.family("vcpu_stall_part")
        for lv, vt in vcpus:
            for (part, _), ns in zip(_PARTS, vt.parts_ns):
                w(f'{name}{{{lv},part="{part}"}} {number(ns / 1e9)}\n')
        name = out.family("vcpu_no_read")
        for lv, vt in vcpus:
            w(f"{name}{{{lv}}} {vt.no_read}\n")
        name = out.family("vcpu_exits")
        for lv, vt in vcpus:
            for reason, n in sorted(vt.exits.items()):
                out.sample(name, lv + "," + label_string(("reason",), (reason,)), n)
        name = out.family("vcpu_mf_exits")
        for lv, vt in vcpus:
            w(f"{name}{{{lv}}} {vt.memory_fault_exits}\n")
        name = out.family("qemu_vcpu_blocktime")
        for lv, vt in vcpus:
            if vt.vmm_blocktime_ms is not None:
                out.sample(name, lv, vt.vmm_blocktime_ms / 1e3)

    def _uffd_series(self, out: Exposition) -> None:
        uffds = [(tt.labels + f',fd="{fd}"', ut) for _, tt in sorted(self._targets.items())
                 for fd, ut in sorted(tt.uffds.items())]
        for key, attr in (("uffd_pending_mean", "pending_mean"), ("uffd_pending_max", "pending_max"),
                          ("uffd_in_service_mean", "in_service_mean"), ("uffd_in_service_max", "in_service_max"),
                          ("uffd_msgs", "msgs_read"), ("uffd_pages", "pages"), ("uffd_bytes", "bytes")):
            name = out.family(key)
            for lv, ut in uffds:
                v = getattr(ut, attr)
                if v is not None:  # in_service_max: only where the queue was sampled
                    out.sample(name, lv, v)
        name = out.family("uffd_ioctls")
        for lv, ut in uffds:
            for (op, _), n in zip(_OPS, ut.ops):
                out.sample(name, lv + f',op="{op}"', n)
        name = out.family("uffd_eexist")
        for lv, ut in uffds:
            out.sample(name, lv, ut.eexist)

    def _target_series(self, out: Exposition) -> None:
        name = out.family("handler_cpu")
        for _, tt in sorted(self._targets.items()):
            out.sample(name, tt.labels, tt.handler_cpu_s)

    def _migration_series(self, out: Exposition) -> None:
        migs = [(tt, tt.migration) for _, tt in sorted(self._targets.items()) if tt.migration is not None]
        name = out.family("mig_state")
        for tt, m in migs:
            lv = tt.labels + "," + label_string(("source",), (m.source,))
            for s in (STATES if m.state in STATES else STATES + (m.state,)):
                out.sample(name, lv + "," + label_string(("state",), (s,)), 1 if s == m.state else 0)
        for key, value in (("mig_progress", _progress), ("mig_bandwidth", lambda m: m.bandwidth_bps),
                           ("mig_limit", lambda m: _number_or_none(m.extra.get("bandwidth_limit_bps"))),
                           ("mig_eta", lambda m: m.eta_s)):
            name = out.family(key)
            for tt, m in migs:
                v = value(m)
                if v is not None:
                    out.sample(name, tt.labels + "," + label_string(("source",), (m.source,)), v)
        qemu = [(tt.labels + "," + label_string(("role",), (m.extra.get("role", "destination"),)), m.extra)
                for tt, m in migs if m.source == "qmp"]
        for key, field_, scale in _QEMU_GAUGES:
            name = out.family(key)
            for lv, extra in qemu:
                v = _number_or_none(extra.get(field_))
                if v is not None:
                    out.sample(name, lv, v * scale)
        name = out.family("qemu_status")
        for lv, extra in qemu:
            if extra.get("qemu_status"):
                out.sample(name, lv + "," + label_string(("status",), (extra["qemu_status"],)), 1)

    def _self_series(self, out: Exposition) -> None:
        out.sample(out.family("build"), label_string(("version", "schema"), (self._version, SCHEMA_VERSION)), 1)
        name = out.family("probe")
        if self._tier:
            out.sample(name, label_string(("tier", "missing"), (self._tier, self._missing)), 1)
        out.sample(out.family("samples"), "", self._samples)
        name = out.family("last_sample")
        if self._last_time is not None:
            out.sample(name, "", self._last_time)
        out.sample(out.family("targets"), "", len(set(self._targets) - self._gone))
        out.sample(out.family("collect_errors"), "", self._collect_errors)
        out.sample(out.family("scrape_errors"), "", self._scrape_errors)


def _progress(m: Migration) -> float | None:
    if m.pages_total and m.pages_received is not None:
        return min(1.0, m.pages_received / m.pages_total)
    return None


def _number_or_none(v) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _vcpu_order(label: str) -> tuple[int, int]:
    return (1, 0) if label == OTHER else (0, int(label))
