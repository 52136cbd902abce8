"""The top lines: host, kernel, probe tier (and what is missing), targets,
migration state and progress, and the feed's status (live/frozen/replay)."""

from __future__ import annotations

import time

from rich.text import Text

from pctop.model import Header, Migration, MigrationState, ProbeTier, Sample, Target
from pctop.ui.widgets.base import TextPanel
from pctop.ui.widgets.render import bar, fmt_bytes, fmt_duration, fmt_rate

STATE_STYLE = {
    MigrationState.PRECOPY: "cyan",
    MigrationState.POSTCOPY: "bold yellow",
    MigrationState.PAUSED: "bold magenta",
    MigrationState.RECOVERING: "bold magenta",
    MigrationState.COMPLETED: "bold green",
    MigrationState.FAILED: "bold red",
}


def clock(t: float) -> str:
    """Local wall-clock time of a sample (from the data, never from 'now')."""
    return time.strftime("%H:%M:%S", time.localtime(t))


def migration_line(t: Target, m: Migration, width: int) -> Text:
    line = Text()
    line.append(f"{t.comm} {t.pid} ", style="dim")
    if m.role:  # QEMU: both ends run the same binary; say which is which
        line.append(f"{m.role} ", style="bold")
    line.append(f"{m.state.upper()}", style=STATE_STYLE.get(m.state, "bold"))
    if m.link == "down" or (m.state == MigrationState.PAUSED and m.source == "qmp"):
        # Said in words: a paused stream (p) and a failed link (x, postcopy-paused) differ.
        line.append(" link down", style=STATE_STYLE[MigrationState.PAUSED])
    if m.strategy:
        line.append(f" {m.strategy}", style="dim")
    if m.address_source not in (None, "uffd"):
        # vCPU-exit runs without memory_fault data learn addresses another way: say so.
        line.append(f" (addresses: {m.address_source})", style="yellow")
    bg = m.background
    if bg and bg != "running" and bg != m.state:  # "PAUSED stream PAUSED" says it twice
        line.append(f" stream {bg.upper()}", style="bold magenta")
    if m.pages_total:
        got = m.pages_received or 0
        frac = got / m.pages_total
        line.append(" ")
        line.append(bar(frac, max(4, min(30, width - 105))), style="green on grey23")
        line.append(f" {frac * 100:.1f}%")
    # Most useful first: a narrow terminal cuts the tail (header_text may wrap it here).
    line.append("\0")
    if m.eta_s is not None and m.state not in (MigrationState.COMPLETED, MigrationState.FAILED):
        line.append(f"  ETA {fmt_duration(m.eta_s)}", style="bold")
    if m.bandwidth_bps is not None:
        line.append(f"  {fmt_bytes(m.bandwidth_bps, per_s=True)}")
    limit = m.bandwidth_limit_bps
    if limit:
        # QMP reports QEMU's max-postcopy-bandwidth, which does not cap pre-copy.
        what = "post-copy limit" if m.source == "qmp" else "limit"
        line.append(f" ({what} {fmt_bytes(limit, per_s=True)})", style="dim")
    if m.pages_total:
        line.append(f"  {fmt_rate(m.pages_received or 0)}/{fmt_rate(m.pages_total)} pages")
    if m.pages_demand is not None:
        line.append(f"  demand {fmt_rate(m.pages_demand)}")
    return line


def header_text(header: Header, sample: Sample | None, status: str, width: int = 120) -> Text:
    """Line 1: what changes (status, data time, tier), then what does not (host,
    kernel); degraded tier gets its own line; then one line per migration."""
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append(" pctop ", style="bold reverse")
    out.append(f" {status}", style="bold")
    if sample is not None:
        out.append(f"  {clock(sample.time)}")
        if header.started:
            out.append(f" +{fmt_duration(sample.time - header.started)}", style="dim")
    tier = sample.probe_tier if sample else header.probe_tier
    degraded = tier == ProbeTier.PROCFS
    out.append("  probes ")
    out.append(tier, style="bold yellow" if degraded else "bold green")
    out.append("  host ")
    out.append(header.host, style="bold")
    out.append(f"  kernel {header.kernel}", style="dim")
    if degraded:
        missing = "; ".join(header.missing) if header.missing else "eBPF probes unavailable"
        out.append("\n")
        out.append(" ⚠ DEGRADED: procfs only ", style="bold black on yellow")
        out.append(f" {missing}", style="yellow")
    if sample is None:
        out.append("\n waiting for the first sample…", style="dim")
        return out
    plain = [t for t in sample.targets if t.migration is None]
    migrating = [t for t in sample.targets if t.migration is not None]
    # A line too long for the width wraps its figures onto a second line, unless
    # that would take the table's rows on a small screen (two QEMUs at 80 columns).
    wrap = len(migrating) == 1 or width >= 100
    for t in migrating:
        if t.migration is not None:
            line = migration_line(t, t.migration, width)
            head, tail = line.split("\0", allow_blank=True) if "\0" in line.plain else (line, Text())
            out.append("\n ")
            out.append_text(head)
            if wrap and 1 + head.cell_len + tail.cell_len > width and tail.plain.strip():
                out.append("\n   ")  # too long for one line: the figures go on the next
                tail = tail[2:] if tail.plain.startswith("  ") else tail
            out.append_text(tail)
    if plain or not sample.targets:
        out.append("\n ")
        out.append(f"targets {len(sample.targets)}" if sample.targets else "no targets found yet",
                   style="" if sample.targets else "yellow")
        if plain:
            out.append(": " + ", ".join(f"{t.comm} {t.pid}" for t in plain), style="dim")
    return out


class HeaderBar(TextPanel):
    """show(header, sample, status)"""

    def draw(self, width: int, height: int, header: Header, sample: Sample | None, status: str) -> Text:
        return header_text(header, sample, status, width)
