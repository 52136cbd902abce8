"""The QMP source: what QEMU itself says about a post-copy migration.

Given the destination's QMP socket (and, optionally, the source's), every
interval it asks each end for `query-migrate` and `query-cpus-fast` and turns
the answers into a Reading:

- a MigrationInfo per QEMU process. The destination's carries the whole
  migration: its own status and blocktime, plus the source's RAM counters when
  the source socket is known. Raw QEMU numbers go into `extra` (docs/schema.md,
  docs/qemu.md): cumulative since the migration started, as QEMU reports them;
  `vcpu_blocktime_ms` is this interval's growth of postcopy-vcpu-blocktime per
  vCPU index, which Stats puts on the vCPU rows as `vmm_blocktime_ms`, beside
  pctop's own `stall_ns` for the same vCPU.
- vCPU identities from query-cpus-fast (cpu-index -> thread-id): exact for KVM
  and TCG, whether or not QEMU names its threads (`-name ...,debug-threads=on`).
- QMP events (MIGRATION, MIGRATION_PASS, STOP, RESUME, ...) and status changes
  as events.

Which socket is which end is the caller's word (`--qmp DEST [--qmp SOURCE]`).
`send()` carries the controls of pctop.qemu.control for the TUI.
"""

from __future__ import annotations

from typing import Any

from pctop.controls import Command
from pctop.qemu import control
from pctop.qemu.qmp import QmpConnection, QmpError
from pctop.sources.readings import MigrationInfo, Reading, TargetInfo, VcpuIdentity

# query-migrate "ram" members copied into extra (QEMU name -> extra key). All cumulative.
RAM_KEYS = {
    "postcopy-requests": "postcopy_requests", "transferred": "ram_transferred_bytes",
    "remaining": "ram_remaining_bytes", "total": "ram_total_bytes", "mbps": "ram_mbps",
    "postcopy-bytes": "ram_postcopy_bytes", "precopy-bytes": "ram_precopy_bytes",
    "normal": "ram_normal_pages", "duplicate": "ram_zero_pages", "dirty-sync-count": "dirty_sync_count",
    "pages-per-second": "ram_pages_per_second", "dirty-pages-rate": "dirty_pages_rate",
}
# Destination-side measurements (QEMU >= 10.1 adds the latency ones; absent on 7.2).
DEST_KEYS = {
    "postcopy-blocktime": "postcopy_blocktime_ms", "postcopy-vcpu-blocktime": "postcopy_vcpu_blocktime_ms",
    "postcopy-latency": "postcopy_latency_ns", "postcopy-vcpu-latency": "postcopy_vcpu_latency_ns",
    "postcopy-non-vcpu-latency": "postcopy_non_vcpu_latency_ns",
    "postcopy-latency-dist": "postcopy_latency_dist",
}
TOP_KEYS = {"total-time": "total_time_ms", "downtime": "downtime_ms", "setup-time": "setup_time_ms",
            "expected-downtime": "expected_downtime_ms", "error-desc": "error"}


def migration_extra(role: str, dest_info: dict | None, src_info: dict | None) -> dict[str, Any]:
    """The raw QEMU numbers of one migration, under pctop's names (cumulative)."""
    extra: dict[str, Any] = {"role": role}
    own = dest_info if role == "destination" else src_info
    if own is not None:
        extra["qemu_status"] = own.get("status", "none")
    if src_info is not None:
        ram = src_info.get("ram", {})
        extra.update({new: ram[old] for old, new in RAM_KEYS.items() if old in ram})
        extra.update({new: src_info[old] for old, new in TOP_KEYS.items() if old in src_info})
        if role == "destination":
            extra["source_status"] = src_info.get("status", "none")
    if dest_info is not None:
        extra.update({new: dest_info[old] for old, new in DEST_KEYS.items() if old in dest_info})
    return extra


def migration_info(pid: int, role: str, dest_info: dict | None, src_info: dict | None) -> MigrationInfo:
    own = (dest_info if role == "destination" else src_info) or {}
    ram = (src_info or {}).get("ram")
    total = received = demand = bandwidth = None
    if ram and ram.get("page-size"):
        page = int(ram["page-size"])
        total = int(ram.get("total", 0)) // page
        received = total - int(ram.get("remaining", 0)) // page
        demand = int(ram.get("postcopy-requests", 0))
        bandwidth = float(ram.get("mbps", 0.0)) * 1e6 / 8
    return MigrationInfo(pid=pid, source="qmp", state=control.state_word(own.get("status")),
                         pages_total=total, pages_received=received, pages_demand=demand,
                         bandwidth_bps=bandwidth, extra=migration_extra(role, dest_info, src_info))


def blocktime_growth(now: list[int] | None, before: list[int] | None) -> list[float]:
    """By vCPU index, how much QEMU's cumulative blocktime (ms) grew since the last interval
    (a list, not a dict, so it survives a JSON round trip unchanged)."""
    if not now:
        return []
    before = before or []
    return [float(max(0, ms - (before[i] if i < len(before) else 0))) for i, ms in enumerate(now)]


class QmpEnd:
    """One QEMU (one end of the migration) as the source sees it."""

    def __init__(self, role: str, path: str, timeout: float) -> None:
        self.role = role
        self.path = path
        self.conn = QmpConnection(path, timeout=timeout)
        self.status: str | None = None
        self.lost = False
        self.said_gone = False

    @property
    def pid(self) -> int:
        return self.conn.pid or 0


class QmpSource:
    """Source protocol over one or two QMP sockets (destination first)."""

    name = "qmp"

    def __init__(self, dest_socket: str | None, source_socket: str | None = None, timeout: float = 3.0) -> None:
        # Either end may be missing: a host that runs only the source has only the source's socket.
        self.dest = QmpEnd("destination", dest_socket, timeout) if dest_socket else None
        self.src = QmpEnd("source", source_socket, timeout) if source_socket else None
        self._blocktime_before: list[int] | None = None

    @property
    def ends(self) -> list[QmpEnd]:
        return [e for e in (self.dest, self.src) if e is not None]

    def start(self) -> None:
        """Connect to every socket now: a socket the user named must work (QmpError if not)."""
        try:
            for end in self.ends:
                end.conn.connect()
                # MIGRATION events are sent only with the `events` capability; it changes nothing else.
                try:
                    control.set_capabilities(end.conn, events=True)
                except QmpError:
                    pass  # e.g. a migration is already running; status polling still sees changes
        except BaseException:
            self.close()
            raise
        if self.src is not None and self.dest is not None and self.src.pid == self.dest.pid:
            self.close()
            raise QmpError(f"{self.dest.path} and {self.src.path} are the same QEMU (pid {self.dest.pid})")

    def _query(self, end: QmpEnd | None, notes: list[str]) -> dict | None:
        if end is None or end.lost:
            return None
        try:
            return control.query(end.conn)
        except QmpError as e:
            end.lost = True
            notes.append(f"lost QEMU {end.role} (pid {end.pid}) at {end.path}: {e}")
            return None

    def collect(self) -> Reading:
        notes: list[str] = []
        infos = {e.role: self._query(e, notes) for e in self.ends}
        dest_info, src_info = infos.get("destination"), infos.get("source")
        migs, targets, idents, gone = [], [], [], []
        limit = self._postcopy_limit() if src_info is not None else None
        for end in self.ends:
            info = infos.get(end.role)
            if info is None:
                if end.lost and end.pid and not end.said_gone:
                    gone.append(end.pid)
                    end.said_gone = True
                continue
            status = info.get("status", "none")
            if status != end.status:
                notes.append(f"QEMU {end.role} (pid {end.pid}): migration {end.status or 'none'} -> {status}")
                end.status = status
            for ev in end.conn.drain_events():
                notes.append(f"QEMU {end.role} event {ev.name} {ev.data or ''}".rstrip())
            mi = migration_info(end.pid, end.role, dest_info, src_info)
            if limit is not None:  # the TUI's b/B keys step from the limit in force
                mi = mi._replace(extra={**mi.extra, "bandwidth_limit_bps": limit})
            if end.role == "destination":
                now = dest_info.get("postcopy-vcpu-blocktime")
                growth = blocktime_growth(now, self._blocktime_before)
                if now:
                    self._blocktime_before = list(now)
                    mi = mi._replace(extra={**mi.extra, "vcpu_blocktime_ms": growth})
            migs.append(mi)
            targets.append(TargetInfo(pid=end.pid, comm=""))
            try:
                threads = control.vcpu_threads(end.conn)
            except QmpError:
                threads = {}
            idents += [VcpuIdentity(end.pid, tid, idx, "qmp") for idx, tid in threads.items()]
        return Reading(source=self.name, identities=tuple(idents), targets=tuple(targets),
                       migrations=tuple(migs), gone=tuple(gone), events=tuple(notes))

    def _postcopy_limit(self) -> int | None:
        try:
            return int(self.src.conn.execute("query-migrate-parameters").get("max-postcopy-bandwidth", 0))
        except (QmpError, TypeError, ValueError):
            return None

    # ---- controls (the TUI's control protocol, as pctop.sources.engine speaks it) ----------------

    # TUI command -> what it does to QEMU. QEMU cannot pause only the background stream
    # ("pause"/"resume") nor inject latency: those are refused as unknown.
    COMMANDS = (Command.BANDWIDTH, Command.DROP_LINK, Command.RECOVER, Command.ENABLE_POSTCOPY,
                Command.START_POSTCOPY)

    def supports(self, cmd: Command) -> bool:
        return cmd in self.COMMANDS

    def send(self, cmd: Command, arg: Any = None, pid: int | None = None) -> dict[str, Any]:
        """Run one control; {"ok": True, "cmd", "text"} or {"ok": False, "cmd", "error"}.
        `pid` is ignored: the QMP sockets name the one migration they steer."""
        try:
            text = self._control(cmd, arg)
        except (QmpError, ValueError, TypeError) as e:
            return {"ok": False, "cmd": cmd, "error": str(e)}
        return {"ok": True, "cmd": cmd, "text": text}

    def _control(self, cmd: Command, arg: Any) -> str:
        src = self.src.conn if self.src else None
        dst = self.dest.conn if self.dest else None

        def need_source() -> QmpConnection:
            if src is None:
                raise QmpError(f"{cmd} goes to the source QEMU: give its socket as a second --qmp")
            return src

        def need_dest() -> QmpConnection:
            if dst is None:
                raise QmpError(f"{cmd} goes to the destination QEMU: give its socket with --qmp")
            return dst
        if cmd == Command.ENABLE_POSTCOPY:
            done = [f"destination: {', '.join(control.enable_postcopy(need_dest(), True))}"]
            if src is not None:
                done.append(f"source: {', '.join(control.enable_postcopy(src, False))}")
            return "enabled " + "; ".join(done)
        if cmd == Command.START_POSTCOPY:
            control.start_postcopy(need_source())
            return "asked the source to switch to post-copy"
        if cmd == Command.BANDWIDTH:
            control.set_bandwidth(need_source(), int(arg or 0))
            return f"max-postcopy-bandwidth = {int(arg or 0)} B/s"
        if cmd == Command.DROP_LINK:
            control.pause(src or need_dest())
            return "paused the migration (migrate-pause)"
        if cmd == Command.RECOVER:
            uri = arg or control.local_uri()
            control.recover(need_dest(), need_source(), uri)
            return f"recovering over {uri}"
        raise QmpError(f"unknown command for QEMU: {cmd}")

    def close(self) -> None:
        for end in self.ends:
            end.conn.close()


def attach(header, stats, sockets) -> tuple[Any, QmpSource | None]:
    """Add a QmpSource over `sockets` (destination first, or None on a host that runs only
    the source, then optionally the source)
    to a live Stats from pctop.root.open_live -> (header naming it, the source).

    It goes after the per-thread measuring sources (ebpf, engine) and before procfs,
    and both QEMUs are handed at once to the sources that follow a pid list (the
    eBPF probes), so they see the destination register its memory with userfaultfd.
    Raises QmpError (one line) for a socket that does not answer."""
    from dataclasses import replace

    sockets = list(sockets or ())
    if not any(sockets):
        return header, None
    if len(sockets) > 2:
        raise QmpError("--qmp takes the destination's socket, then optionally the source's (at most two)")
    qmp = QmpSource(sockets[0], sockets[1] if len(sockets) > 1 else None)  # (None, SOURCE): source only
    qmp.start()
    names = [s.name for s in stats.sources]
    stats.sources.insert(names.index("procfs") if "procfs" in names else len(names), qmp)
    for end in qmp.ends:
        for s in stats.sources:
            add = getattr(s, "add_pid", None)
            if add is not None:
                try:
                    add(end.pid)
                except Exception:
                    pass  # the source reports its own trouble in its next reading
    return replace(header, sources=stats.source_names), qmp
