"""What sources hand to the Stats aggregator, once per interval.

Every count is a delta since the previous `collect()` of the same source
(sources read-and-clear their in-kernel maps, or diff cumulative counters
themselves), so the aggregator never has to remember a source's history.
Times are nanoseconds. Histograms are log2 buckets of microseconds with
QEMU's convention: bucket N holds [2^N, 2^(N+1)) us, 24 buckets, bucket 0
also takes everything below 1 us and the last bucket everything above.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from pctop.model import (
    HIST_BUCKETS,  # re-exported: one value for every layer  # noqa: F401
    MigrationState,
)


class ThreadFaults(NamedTuple):
    """One faulting thread (a vCPU or any other thread) in one interval."""

    pid: int
    tid: int
    faults: int  # faults that stalled the thread (slept in handle_userfault, or vCPU-exit faults)
    stall_ns: int  # sum of stalls: fault start to running again
    queued_ns: int  # sum: fault start to a handler read() of its message (faults that were read)
    service_ns: int  # sum: handler read to page installed / thread woken
    runq_ns: int  # sum: woken to running again
    faults_no_read: int  # faults resolved without any handler read (background stream won)
    max_ns: int  # the longest single stall in the interval
    hist: tuple[int, ...]  # HIST_BUCKETS counts of stall durations
    exits: dict[str, int] = {}  # KVM_RUN returns to user space by reason name ("mmio", "io", "efault", ...)
    memory_fault_exits: int = 0  # KVM_RUN returns that were memory faults (vCPU-exit mode)


class UffdCounters(NamedTuple):
    """Handler-side activity on one userfaultfd of one process, in one interval."""

    pid: int
    fd: int
    msgs_read: int = 0
    read_calls: int = 0
    copies: int = 0  # UFFDIO_COPY calls
    zeropages: int = 0
    continues: int = 0
    wakes: int = 0
    pages_installed: int = 0
    bytes_installed: int = 0
    eexist: int = 0
    # Which pages were installed, with the page map on (EbpfSource(page_map=True)): sorted,
    # coalesced (start address, 4 KiB pages) runs in the target's address space; None when off.
    installed_ranges: tuple[tuple[int, int], ...] | None = None
    page_map_lost: int = 0  # installed pages the page map could not record (its map was full)
    serves_pid: int | None = None  # the other process whose faults this uffd resolves (a separate handler)


class UffdDepth(NamedTuple):
    """Queue depth of one uffd sampled from /proc/<pid>/fdinfo/<fd> during the interval."""

    pid: int
    fd: int
    pending_mean: float
    pending_max: int
    total_mean: float
    total_max: int
    samples: int
    in_service_max: int | None = None  # most faults read but not yet resolved at one sample (total - pending)


class VcpuIdentity(NamedTuple):
    pid: int
    tid: int
    vcpu: int
    how: str  # "kvm_create_vcpu" | "debugfs" | "thread_name" | "engine"


class TargetInfo(NamedTuple):
    pid: int
    comm: str
    handler_cpu_pct: float | None = None  # CPU% of the threads that read/serve the uffds
    thread_names: dict[int, str] = {}
    # uffd-registered ranges (start address, 4 KiB pages) as registered, with the page map on
    registered_ranges: tuple[tuple[int, int], ...] | None = None
    serves: tuple[int, ...] = ()  # other processes whose faults this one's uffds resolve
    vm_name: str | None = None  # the guest's name on the VMM's command line (QEMU's -name), if any


class MigrationInfo(NamedTuple):
    """What a migration-aware source (the reference engine, QEMU over QMP) knows."""

    pid: int
    source: str  # "engine" | "qmp"
    state: MigrationState
    pages_total: int | None = None
    pages_received: int | None = None
    pages_demand: int | None = None
    pages_background: int | None = None
    bandwidth_bps: float | None = None  # bytes/s the stream is moving now
    extra: dict = {}  # source-specific fields, passed through to the Sample


class Reading(NamedTuple):
    """Everything one source saw in one interval. Empty tuples when it saw nothing."""

    source: str
    threads: tuple[ThreadFaults, ...] = ()
    uffds: tuple[UffdCounters, ...] = ()
    depths: tuple[UffdDepth, ...] = ()
    identities: tuple[VcpuIdentity, ...] = ()
    targets: tuple[TargetInfo, ...] = ()
    migrations: tuple[MigrationInfo, ...] = ()
    gone: tuple[int, ...] = ()  # pids that exited since the last reading
    events: tuple[str, ...] = ()  # human-readable happenings for the event log


class Source(Protocol):
    """A collector. `collect()` is called once per interval from the collection thread."""

    name: str

    def start(self) -> None: ...

    def collect(self) -> Reading: ...

    def close(self) -> None: ...
