"""Every metric the exporter serves, in one table: name, type, labels, meaning, and the
JSON fields (docs/schema.md, pctop/model.py) it is computed from.

The collector takes names, help and labels from here; docs/metrics.md is rendered from
here (`python -m pctop.export.metrics > docs/metrics.md`, checked by tests/unit/test_export.py,
which also checks that every JSON field named exists in the model and in docs/schema.md).

Naming follows Prometheus's conventions: one prefix (`pctop_`), base units in the name
(seconds, bytes, ratio 0-1), `_total` on counters, `_info` for metadata, and labels with
bounded values (never a thread id). Counters are sums of the per-interval counts of the
JSON samples since the exporter first saw the series.
"""

from __future__ import annotations

from dataclasses import dataclass

from pctop.model import HIST_BUCKETS, MigrationState

PREFIX = "pctop_"
VCPU = ("vm", "pid", "vcpu")
UFFD = ("vm", "pid", "fd")
TARGET = ("vm", "pid")
MIGRATION = ("vm", "pid", "source")
# Migration.state values (docs/schema.md); every one gets a series so alerts can match on it.
# (Another state, e.g. the engine's `stopping`, gets a series while it is the current one.)
_S = MigrationState
STATES = (_S.PRECOPY, _S.POSTCOPY, _S.PAUSED, _S.RECOVERING, _S.COMPLETED, _S.FAILED, _S.NONE, _S.SETUP)

# Label meanings, shared by every metric that has the label.
LABELS = {
    "vm": "the VM: the guest's name on the VMM's command line (`vm_name` in the JSON: QEMU's `-name "
          "guest=NAME` or `-name NAME`), else the process's command name (`comm`)",
    "pid": "the target's process id",
    "vcpu": "vCPU index; `other` sums the faulting threads that are not vCPUs (thread ids are never labels)",
    "fd": "the userfaultfd's file descriptor number in the target",
    "reason": "KVM_RUN exit reason (`mmio`, `io`, `efault`, ...): the keys of `exits`",
    "part": "`queued` (fault -> read by a handler), `service` (read -> installed and woken), "
            "`runqueue` (woken -> running)",
    "op": "`copy`, `zeropage`, `continue`, `wake`: the uffd ioctl",
    "source": "who reports the migration: `engine` or `qmp`",
    "state": "the migration's state, one of " + ", ".join(f"`{s}`" for s in STATES) + "; the current one is 1, the others 0",
    "role": "`destination` or `source`: which QEMU's QMP socket reported it",
    "status": "QEMU's own migration status string (`postcopy-active`, ...)",
    "version": "pctop's version",
    "schema": "the JSON schema version",
    "tier": "`ebpf` or `procfs` (docs/schema.md, header)",
    "missing": "what is unavailable, comma-separated first words of the header's `missing` (`ebpf`, `debugfs`)",
    "le": "histogram bucket upper edge, seconds",
}


@dataclass(frozen=True)
class Metric:
    name: str  # without the prefix; counters with _total
    kind: str  # counter | gauge | histogram | info
    labels: tuple[str, ...]
    help: str
    json: tuple[str, ...]  # JSON fields it comes from: "vcpus[].faults", "header.probe_tier", ...

    @property
    def full(self) -> str:
        return PREFIX + self.name


def _m(key: str, name: str, kind: str, labels, help_: str, *json: str) -> tuple[str, Metric]:
    return key, Metric(name, kind, tuple(labels), help_, tuple(json))


METRICS: dict[str, Metric] = dict([
    # per vCPU
    _m("vcpu_faults", "vcpu_stall_faults_total", "counter", VCPU,
       "Faults that stalled the vCPU (a wait in the uffd fault path, or a memory-fault exit).",
       "vcpus[].faults"),
    _m("vcpu_stall", "vcpu_stall_seconds", "histogram", VCPU,
       "Stall time per fault, fault to running again: the kernel's log2 buckets, bucket N = "
       "[2^N, 2^(N+1)) us exported as le = 2^(N+1) us, the last bucket as +Inf; _sum is the stall time.",
       "vcpus[].hist", "vcpus[].stall_ns"),
    _m("vcpu_stall_part", "vcpu_stall_part_seconds_total", "counter", VCPU + ("part",),
       "Where stall time went; the parts add up to the stall time when all are measured (0 when not).",
       "vcpus[].parts.queued_ns", "vcpus[].parts.service_ns", "vcpus[].parts.runq_ns"),
    _m("vcpu_no_read", "vcpu_faults_without_read_total", "counter", VCPU,
       "Faults resolved without any handler reading them (another install won the race).",
       "vcpus[].faults_no_read"),
    _m("vcpu_exits", "vcpu_exits_total", "counter", VCPU + ("reason",),
       "KVM_RUN returns to user space, by exit reason.", "vcpus[].exits"),
    _m("vcpu_mf_exits", "vcpu_memory_fault_exits_total", "counter", VCPU,
       "Memory-fault exits (the vCPU resolves its own fault).", "vcpus[].memory_fault_exits"),
    # per uffd
    _m("uffd_pending_mean", "uffd_pending_faults_mean", "gauge", UFFD,
       "Queue depth: faults queued and not yet read (fdinfo pending), mean over the last interval.",
       "uffds[].pending_mean"),
    _m("uffd_pending_max", "uffd_pending_faults_max", "gauge", UFFD,
       "Queue depth: most faults queued at once during the last interval.", "uffds[].pending_max"),
    _m("uffd_in_service_mean", "uffd_in_service_faults_mean", "gauge", UFFD,
       "Faults read by a handler and not yet resolved (fdinfo total - pending), mean over the last interval.",
       "uffds[].total_mean", "uffds[].pending_mean"),
    _m("uffd_in_service_max", "uffd_in_service_faults_max", "gauge", UFFD,
       "Most faults read by a handler and not yet resolved at once during the last interval.",
       "uffds[].in_service_max"),
    _m("uffd_msgs", "uffd_messages_read_total", "counter", UFFD,
       "Fault messages handlers read from the uffd.", "uffds[].msgs_read"),
    _m("uffd_pages", "uffd_pages_installed_total", "counter", UFFD,
       "Pages installed (UFFDIO_COPY/ZEROPAGE/CONTINUE), demand and background alike.",
       "uffds[].pages_installed"),
    _m("uffd_bytes", "uffd_installed_bytes_total", "counter", UFFD,
       "Bytes those installs covered.", "uffds[].bytes_installed"),
    _m("uffd_ioctls", "uffd_ioctls_total", "counter", UFFD + ("op",),
       "uffd ioctl calls, by operation.",
       "uffds[].copies", "uffds[].zeropages", "uffds[].continues", "uffds[].wakes"),
    _m("uffd_eexist", "uffd_eexist_total", "counter", UFFD,
       "Installs that found the page already present (demand vs. background race).", "uffds[].eexist"),
    # per target
    _m("handler_cpu", "handler_cpu_seconds_total", "counter", TARGET,
       "CPU time of the target's fault-handling threads (those that are not vCPUs); "
       "intervals where it is unknown add nothing.", "targets[].handler_cpu_pct", "interval_s"),
    # per migration
    _m("mig_state", "migration_state", "gauge", MIGRATION + ("state",),
       "Migration state: 1 for the current one, 0 for the others.", "migration.state"),
    _m("mig_progress", "migration_progress_ratio", "gauge", MIGRATION,
       "Guest pages arrived, 0-1.", "migration.pages_received", "migration.pages_total"),
    _m("mig_bandwidth", "migration_bandwidth_bytes_per_second", "gauge", MIGRATION,
       "Bytes/s the stream moves now, as the source measures it.", "migration.bandwidth_bps"),
    _m("mig_limit", "migration_bandwidth_limit_bytes_per_second", "gauge", MIGRATION,
       "The stream's bandwidth cap; 0 = unlimited.", "migration.extra.bandwidth_limit_bps"),
    _m("mig_eta", "migration_eta_seconds", "gauge", MIGRATION,
       "Seconds to go at the last interval's page rate (absent when not moving).", "migration.eta_s"),
    # QEMU's own numbers (with --qmp)
    _m("qemu_vcpu_blocktime", "qemu_vcpu_blocktime_seconds_total", "counter", VCPU,
       "QEMU's own count of the vCPU's blocked time (postcopy-vcpu-blocktime growth); compare with "
       "pctop_vcpu_stall_seconds_sum.", "vcpus[].vmm_blocktime_ms"),
    _m("qemu_blocktime", "qemu_postcopy_blocktime_seconds", "gauge", TARGET + ("role",),
       "QEMU's postcopy-blocktime as QEMU reports it (time all vCPUs were blocked together), "
       "since the migration began.", "migration.extra.postcopy_blocktime_ms"),
    _m("qemu_requests", "qemu_postcopy_requests", "gauge", TARGET + ("role",),
       "QEMU's postcopy-requests (pages the destination asked for), since the migration began.",
       "migration.extra.postcopy_requests"),
    _m("qemu_transferred", "qemu_ram_transferred_bytes", "gauge", TARGET + ("role",),
       "QEMU's RAM transferred, since the migration began.", "migration.extra.ram_transferred_bytes"),
    _m("qemu_remaining", "qemu_ram_remaining_bytes", "gauge", TARGET + ("role",),
       "QEMU's RAM remaining.", "migration.extra.ram_remaining_bytes"),
    _m("qemu_dirty", "qemu_dirty_pages_per_second", "gauge", TARGET + ("role",),
       "QEMU's dirty-pages-rate.", "migration.extra.dirty_pages_rate"),
    _m("qemu_status", "qemu_migration_status", "gauge", TARGET + ("role", "status"),
       "QEMU's migration status: 1 on the current status string.", "migration.extra.qemu_status"),
    # pctop itself
    _m("build", "build_info", "info", ("version", "schema"),
       "pctop's version and JSON schema version.", "header.pctop_version", "header.schema"),
    _m("probe", "probe_info", "info", ("tier", "missing"),
       "Probe tier and what is missing; tier=\"procfs\" means per-fault metrics are not measured.",
       "header.probe_tier", "header.missing"),
    _m("samples", "samples_total", "counter", (),
       "Samples (intervals) collected.", "seq"),
    _m("last_sample", "last_sample_timestamp_seconds", "gauge", (),
       "Unix time at the end of the last interval collected.", "time"),
    _m("targets", "targets", "gauge", (),
       "Processes watched in the last interval.", "targets"),
    _m("collect_errors", "collection_errors_total", "counter", (),
       "Sources that failed in an interval (an `error` event; the other sources went on).",
       "events[].kind"),
    _m("scrape_errors", "scrape_errors_total", "counter", (),
       "Scrapes on which a series could not be rendered (it was left out).", ),
])


def bucket_edges_s() -> list[float]:
    """The `le` edges of the stall histogram, seconds: 2^(N+1) us for bucket N < 23; the
    last bucket (everything from 2^23 us) is +Inf."""
    return [2 ** (n + 1) / 1e6 for n in range(HIST_BUCKETS - 1)]


def render_markdown() -> str:
    out = [
        "# Prometheus metrics (generated)",
        "",
        "Generated from `pctop/export/metrics.py` by `python -m pctop.export.metrics`; "
        "tests/unit/test_export.py checks that this file matches it. `pctop export` serves these on",
        "`/metrics` (also `pctop monitor --export`); the JSON fields they come from are described",
        "in [schema.md](schema.md). Counters are the sums of those per-interval JSON counts since the",
        "exporter first saw the series; gauges are the last interval's value.",
        "",
        "| metric | type | labels | meaning | JSON fields |",
        "|---|---|---|---|---|",
    ]
    for m in METRICS.values():
        labels = ", ".join(f"`{x}`" for x in m.labels) or "-"
        if m.kind == "histogram":
            labels += ", `le`"
        json = ", ".join(f"`{x}`" for x in m.json) or "-"
        out.append(f"| `{m.full}` | {m.kind} | {labels} | {m.help} | {json} |")
    out += ["", "## Labels", "", "| label | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in LABELS.items()]
    out += ["", HISTOGRAM_NOTE, "", SERIES_NOTE, ""]
    return "\n".join(out)


HISTOGRAM_NOTE = """## The stall histogram's edges

The kernel-side maps, the reference engine and QEMU (>= 10.1, `postcopy-latency-dist`) count
stalls in 24 log2 buckets of microseconds: bucket N holds [2^N, 2^(N+1)) us (bucket 0 also
takes everything under 1 us, bucket 23 everything from 2^23 us). Prometheus buckets are
cumulative with an inclusive upper edge `le`. pctop exports bucket N under
`le` = 2^(N+1) us in seconds (2e-06, 4e-06, ... 8.388608), adding up the buckets below, and
bucket 23 under `le="+Inf"`. A stall of exactly 2^(N+1) us belongs to QEMU's bucket N+1, so it is
counted from `le` = 2^(N+2) us on: an edge value is reported one bucket high, never low (the
opposite of the one-bucket-low error an exporter makes when it uses 2^N as the edge of bucket N).
`histogram_quantile()` interpolates linearly inside a bucket as pctop's own percentiles do
(pctop/hist.py), so both agree to within one bucket."""

SERIES_NOTE = """## Series life

A target's series appear when pctop first reports it. Counters only grow: a vCPU that has no
faults in an interval keeps its series (and its value); one seen again later goes on from
there. A target that exits stays in `/metrics` for one more scrape after its last interval
(so the last faults are scraped) and is then removed; if its pid returns, its counters start
again from 0, which Prometheus's `rate()` and `increase()` treat as a counter reset. The `vm`
label is the name known at the scrape: a target first seen before its name (an interval or two
after pctop starts) goes on under a new series, its counters continuing from where they were."""


if __name__ == "__main__":
    print(render_markdown(), end="")
