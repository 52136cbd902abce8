"""The one data model every view reads: an immutable, versioned Sample.

Sources produce Readings (pctop.sources.readings); pctop.stats turns them
into a Sample once per interval; the TUI, the NDJSON writer (--json, record)
and the Prometheus exporter (pctop.export) render Samples; replay reads them back.
Field names here are the NDJSON/record names, documented in docs/schema.md.
Bump SCHEMA_VERSION on any incompatible change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, Self

from pctop.controls import Command

SCHEMA_VERSION = 1
HIST_BUCKETS = 24  # log2 us buckets, [2^N, 2^(N+1)), as QEMU's postcopy-latency-dist


class _Word(StrEnum):
    """A word of the schema: the member is the JSON string itself, so a line written
    from a member is the line written from the plain string."""

    @classmethod
    def parse(cls, word: object) -> Self:
        """The member for `word`; UNKNOWN for a word this pctop does not know (a
        recording, an engine or a QEMU newer than it), so reading goes on."""
        if isinstance(word, str) and word in cls._value2member_map_:
            return cls(word)
        return cls("unknown")


class MigrationState(_Word):
    """Migration.state (docs/schema.md, Migration)."""

    NONE = "none"  # QMP: no migration yet
    SETUP = "setup"  # QMP: before pre-copy moves
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    PAUSED = "paused"  # the link is down (QEMU's postcopy-paused)
    RECOVERING = "recovering"
    STOPPING = "stopping"  # the engine: every page is in, the run winds down to verify
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"  # QMP: QEMU's COLO fault tolerance
    UNKNOWN = "unknown"  # a state this pctop does not know, or none given


class ProbeTier(_Word):
    """Header.probe_tier and Sample.probe_tier: what measured the stream (docs/schema.md)."""

    EBPF = "ebpf"  # tracepoint probes measure every fault
    PROCFS = "procfs"  # /proc only: per-fault fields are not measured
    NONE = "none"  # `demo --json`, `engine dest --json`: the engine's own lines follow
    REPLAY = "replay"  # a view's label for replayed data
    UNKNOWN = "unknown"  # a tier this pctop does not know


@dataclass(frozen=True)
class StallParts:
    """Where the stall time of one interval went (sums, ns)."""

    queued_ns: int = 0  # fault -> a handler read its message
    service_ns: int = 0  # handler read -> page installed, thread woken
    runq_ns: int = 0  # woken -> running again


@dataclass(frozen=True)
class VcpuSample:
    """One vCPU (or other faulting thread, vcpu=None) of one target, one interval."""

    vcpu: int | None
    tid: int
    name: str = ""
    identity: str = "unknown"  # how the vCPU index was learned
    faults: int = 0  # stalled faults in the interval
    faults_per_s: float = 0.0
    stall_ns: int = 0
    stalled_frac: float = 0.0  # share of the interval spent stalled, 0..1
    p50_us: float | None = None
    p90_us: float | None = None
    p99_us: float | None = None
    max_us: float | None = None
    hist: tuple[int, ...] = (0,) * HIST_BUCKETS
    parts: StallParts = StallParts()
    faults_no_read: int = 0
    exits: dict[str, int] = field(default_factory=dict)
    exits_per_s: float = 0.0
    memory_fault_exits: int = 0
    vmm_blocktime_ms: float | None = None  # the VMM's own count of this vCPU's blocked time (QEMU)


@dataclass(frozen=True)
class UffdSample:
    """One userfaultfd of one target, one interval."""

    fd: int
    pending_mean: float = 0.0
    pending_max: int = 0
    total_mean: float = 0.0
    total_max: int = 0
    # most faults read but not yet resolved at one sampling instant (fdinfo total - pending);
    # None (left out of the JSON) when no source sampled the queue
    in_service_max: int | None = None
    msgs_read: int = 0
    read_calls: int = 0
    pages_installed: int = 0
    bytes_installed: int = 0
    copies: int = 0
    zeropages: int = 0
    continues: int = 0
    wakes: int = 0
    eexist: int = 0
    reads_per_s: float = 0.0
    installs_per_s: float = 0.0
    bytes_per_s: float = 0.0
    # With --page-ranges only (else None, and left out of the JSON): which pages were
    # installed, as sorted (start address, 4 KiB pages) runs, and pages the map missed.
    installed_ranges: tuple[tuple[int, int], ...] | None = None
    page_map_lost: int | None = None
    # A separate handler's uffd (Firecracker's, CRIU's lazy-pages daemon): the pid of the
    # process whose faults it resolves; None when it serves its own process.
    serves_pid: int | None = None


@dataclass(frozen=True)
class Migration:
    """Migration state and progress, when a source knows it (engine, QMP)."""

    source: str
    state: MigrationState
    pages_total: int | None = None
    pages_received: int | None = None
    pages_demand: int | None = None
    pages_background: int | None = None
    bandwidth_bps: float | None = None
    eta_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Typed views of the source-specific fields the views read from `extra` (docs/schema.md,
    # Migration.extra); the JSON keeps them in `extra`.
    def _text(self, key: str) -> str | None:
        v = self.extra.get(key) if isinstance(self.extra, dict) else None
        return v if isinstance(v, str) and v else None

    @property
    def commands(self) -> tuple[Command, ...]:
        """The control commands the engine lists as taken (those this pctop knows)."""
        v = self.extra.get("commands") if isinstance(self.extra, dict) else None
        known = Command._value2member_map_
        return tuple(Command(c) for c in v if isinstance(c, str) and c in known) if isinstance(v, (list, tuple)) else ()

    @property
    def background(self) -> str | None:
        """The engine's background stream: "running", "paused", "off", ..."""
        return self._text("background")

    @property
    def bandwidth_limit_bps(self) -> float | None:
        v = self.extra.get("bandwidth_limit_bps") if isinstance(self.extra, dict) else None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def strategy(self) -> str | None:
        return self._text("strategy")

    @property
    def role(self) -> str | None:
        """QEMU: "source" or "destination"."""
        return self._text("role")

    @property
    def link(self) -> str | None:
        """The engine's link: "up" or "down"."""
        return self._text("link")

    @property
    def address_source(self) -> str | None:
        return self._text("address_source")


@dataclass(frozen=True)
class Target:
    pid: int
    comm: str
    vcpus: tuple[VcpuSample, ...] = ()
    uffds: tuple[UffdSample, ...] = ()
    handler_cpu_pct: float | None = None
    migration: Migration | None = None
    # With --page-ranges only: the uffd-registered ranges, (start address, 4 KiB pages)
    registered_ranges: tuple[tuple[int, int], ...] | None = None
    # One migration in two processes: the faulting process (the VMM, a restored task) is
    # `served_by` the handler processes whose uffds resolve its faults; they list it in
    # `serves`. Learned from the handler's wake-ups and from a uffd sent over SCM_RIGHTS.
    serves: tuple[int, ...] = ()
    served_by: tuple[int, ...] = ()
    # The guest's name on the VMM's command line (QEMU's -name); None (left out of the JSON) if none
    vm_name: str | None = None


@dataclass(frozen=True)
class Event:
    time: float
    kind: str  # "state", "target-gone", "target-new", "link", "error", "control", ...
    text: str


@dataclass(frozen=True)
class Sample:
    time: float  # unix seconds at the end of the interval
    interval_s: float
    seq: int
    probe_tier: ProbeTier
    sources: tuple[str, ...]
    targets: tuple[Target, ...] = ()
    events: tuple[Event, ...] = ()
    type: str = "sample"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for t in d["targets"]:
            _drop_unmeasured(t)
            for u in t["uffds"]:
                _drop_unmeasured(u)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        return _build(cls, d)


@dataclass(frozen=True)
class Header:
    """First line of every NDJSON stream and recording."""

    host: str
    kernel: str
    probe_tier: ProbeTier
    sources: tuple[str, ...]
    missing: tuple[str, ...] = ()  # what is unavailable, in words, when degraded
    started: float = 0.0
    pctop_version: str = ""
    schema: int = SCHEMA_VERSION
    type: str = "header"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Header":
        return _build(cls, d)


# Nested dataclass fields, for rebuilding from JSON.
_NESTED: dict[tuple[type, str], type] = {
    (Sample, "targets"): Target,
    (Sample, "events"): Event,
    (Target, "vcpus"): VcpuSample,
    (Target, "uffds"): UffdSample,
    (Target, "migration"): Migration,
    (VcpuSample, "parts"): StallParts,
}


# Fields whose values are words of the schema: read with parse(), so an unknown one is UNKNOWN.
_WORDS: dict[tuple[type, str], type[_Word]] = {
    (Migration, "state"): MigrationState,
    (Sample, "probe_tier"): ProbeTier,
    (Header, "probe_tier"): ProbeTier,
}


# Opt-in fields (--page-ranges; vm_name, in_service_max when known): left out of the JSON
# when not known (None), so lines without them do not grow; a reader takes a missing one as None.
_OPT_IN = ("installed_ranges", "page_map_lost", "registered_ranges", "vm_name", "in_service_max")
_RANGES = frozenset({"installed_ranges", "registered_ranges"})  # lists of [start, pages]


def _drop_unmeasured(d: dict[str, Any]) -> None:
    for name in _OPT_IN:
        if name in d and d[name] is None:
            del d[name]


def _build(cls: type, d: dict[str, Any]) -> Any:
    """Rebuild a dataclass from its dict, ignoring unknown keys and reading unknown
    words as UNKNOWN (newer writers)."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        sub = _NESTED.get((cls, f.name))
        word = _WORDS.get((cls, f.name))
        if word is not None:
            v = word.parse(v)
        elif sub is not None and v is not None:
            v = tuple(_build(sub, x) for x in v) if isinstance(v, list) else _build(sub, v)
        elif f.name in _RANGES and isinstance(v, list):
            v = tuple(tuple(x) for x in v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)
