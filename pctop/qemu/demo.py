"""`pctop demo --vmm qemu`: a real QEMU post-copy migration under pctop.

Starts a source and a destination QEMU on 127.0.0.1 with pctop's boot-sector
guest (pctop.qemu.migration), watches both exactly as `pctop monitor --qmp DEST
--qmp SOURCE` does, runs pre-copy for a few seconds, switches to post-copy and
shows it all: in the TUI (QEMU's controls on its keys), or headless as a
progress line and a closing table of pctop's numbers next to QEMU's, or as
JSON Lines (the monitor's stream, then one `"type": "qemu-summary"` line).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pctop.exits import INTERRUPTED
from pctop.model import Sample
from pctop.qemu.migration import QemuMigration

PRECOPY_S = 3.0  # let pre-copy run visibly before switching


@dataclass
class Tally:
    """pctop's measurements of the destination QEMU, added up over a run, and QEMU's
    own numbers as of the last sample."""

    dest_pid: int
    stall_ns: dict[int, int] = field(default_factory=dict)      # by vCPU index
    faults: dict[int, int] = field(default_factory=dict)
    vmm_ms: dict[int, float] = field(default_factory=dict)      # QEMU blocktime, summed per interval
    max_us: dict[int, float] = field(default_factory=dict)
    parts_ns: dict[int, list[int]] = field(default_factory=dict)  # queued, in service, run-queue
    no_read: dict[int, int] = field(default_factory=dict)
    installed: int = 0
    msgs_read: int = 0
    extra: dict[str, Any] = field(default_factory=dict)         # the destination's migration extra
    states: list[str] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        for t in sample.targets:
            if t.pid != self.dest_pid:
                continue
            for u in t.uffds:
                self.installed += u.pages_installed
                self.msgs_read += u.msgs_read
            for v in t.vcpus:
                if v.vcpu is None:
                    continue
                self.stall_ns[v.vcpu] = self.stall_ns.get(v.vcpu, 0) + v.stall_ns
                self.faults[v.vcpu] = self.faults.get(v.vcpu, 0) + v.faults
                self.no_read[v.vcpu] = self.no_read.get(v.vcpu, 0) + v.faults_no_read
                parts = self.parts_ns.setdefault(v.vcpu, [0, 0, 0])
                for i, ns in enumerate((v.parts.queued_ns, v.parts.service_ns, v.parts.runq_ns)):
                    parts[i] += ns
                self.vmm_ms[v.vcpu] = self.vmm_ms.get(v.vcpu, 0.0) + (v.vmm_blocktime_ms or 0.0)
                if v.max_us is not None:
                    self.max_us[v.vcpu] = max(self.max_us.get(v.vcpu, 0.0), v.max_us)
            if t.migration is not None:
                self.extra = dict(t.migration.extra)
                if not self.states or self.states[-1] != t.migration.state:
                    self.states.append(t.migration.state)

    def rows(self) -> list[tuple[str, str, str]]:
        """(what, pctop measured, QEMU reported) for the closing table and docs/qemu.md."""
        e = self.extra
        qemu_vcpu = e.get("postcopy_vcpu_blocktime_ms") or []
        rows = []
        for idx in sorted(self.stall_ns):
            q = qemu_vcpu[idx] if idx < len(qemu_vcpu) else None
            rows.append((f"vCPU {idx} time stalled (ms)", f"{self.stall_ns[idx] / 1e6:.0f}",
                         "-" if q is None else str(q)))
            rows.append((f"vCPU {idx} stalls / longest (ms)",
                         f"{self.faults.get(idx, 0)} / {self.max_us.get(idx, 0.0) / 1e3:.1f}", "-"))
            q_ns, s_ns, r_ns = self.parts_ns.get(idx, (0, 0, 0))
            rows.append((f"vCPU {idx} stall parts: queued / in service / run-queue (ms)",
                         f"{q_ns / 1e6:.0f} / {s_ns / 1e6:.0f} / {r_ns / 1e6:.0f}", "-"))
            rows.append((f"vCPU {idx} stalls no handler read (page came first)",
                         str(self.no_read.get(idx, 0)), "-"))
        rows.append(("all vCPUs blocked at once (ms)", "-", str(e.get("postcopy_blocktime_ms", "-"))))
        rows.append(("pages requested from the source", f"{self.msgs_read} uffd messages read",
                     f"{e.get('postcopy_requests', '-')} postcopy-requests"))
        rows.append(("pages installed on the destination", str(self.installed), "-"))
        if e.get("ram_postcopy_bytes") is not None:
            rows.append(("bytes sent in post-copy", "-", str(e["ram_postcopy_bytes"])))
        return rows


def format_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| what | pctop (measured from outside) | QEMU (query-migrate) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def progress_line(t: Tally) -> str:
    e = t.extra
    stall = sum(t.stall_ns.values()) / 1e6
    return (f"{e.get('qemu_status', 'none'):16} stalled {stall:7.0f} ms (QEMU blocktime "
            f"{e.get('postcopy_blocktime_ms', 0):>5} ms)  installed {t.installed:6}  "
            f"requests {e.get('postcopy_requests', 0):5}  remaining {e.get('ram_remaining_bytes', 0) >> 10:6} KiB")


def tell(line: str) -> None:
    # On a terminal, first clear the progress line that may be drawn there (\r, no newline).
    start = "\r\x1b[K" if sys.stderr.isatty() else ""
    try:
        print(f"{start}pctop demo: {line}", file=sys.stderr, flush=True)
    except OSError:  # the terminal is gone
        pass


def headless_loop(mode: str, header, rec, tally: Tally, driver: threading.Thread, interval: float) -> None:
    """JSON Lines or a progress line until the migration driver ends; `rec` feeds `tally`."""
    from pctop.sinks.ndjson import NdjsonWriter

    writer = NdjsonWriter(sys.stdout) if mode == "json" else None
    if writer:
        writer.write(header)
    tty = sys.stderr.isatty()
    try:
        while driver.is_alive():
            time.sleep(interval)
            s = rec.collect()
            if writer:
                writer.write(s)
            elif tty:
                sys.stderr.write("\r" + progress_line(tally) + "\x1b[K")
                sys.stderr.flush()
        time.sleep(interval)
        s = rec.collect()  # stalls that ended after the last interval
        if writer:
            writer.write(s)
    finally:
        rec.close()
        if tty and not writer:
            sys.stderr.write("\n")


def finish(mode: str, tally: Tally, outcome: dict, guest_runs: bool, mig: QemuMigration) -> int:
    if outcome.get("stopped"):  # said in run()
        return INTERRUPTED
    ok = "source" in outcome and guest_runs
    if mode == "json":
        print(json.dumps({"type": "qemu-summary", "ok": ok, "error": outcome.get("error"),
                          "guest_runs_on_destination": guest_runs, "states": tally.states,
                          "precopy_s": mig.times.precopy_s, "postcopy_s": mig.times.postcopy_s,
                          "rows": tally.rows()}))
        return 0 if ok else 1
    if "error" in outcome:
        print(f"pctop demo: error: {outcome['error']}", file=sys.stderr)
    elif "source" not in outcome:
        print("pctop demo: stopped before the migration completed", file=sys.stderr)
    else:
        print(f"migrated: pre-copy {mig.times.precopy_s:.1f} s, post-copy {mig.times.postcopy_s:.1f} s; "
              f"states {' -> '.join(tally.states)}; guest {'runs' if guest_runs else 'does NOT run'} "
              f"on the destination")
        print(format_table(tally.rows()))
    return 0 if ok else 1
