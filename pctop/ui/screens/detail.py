"""One vCPU in depth: its latency histogram, its stall parts, its recent history."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen

from pctop.model import Sample, Target, VcpuSample
from pctop.ui.history import History, VcpuKey, VcpuSeries
from pctop.ui.widgets.base import TextPanel
from pctop.ui.widgets.header import clock
from pctop.ui.widgets.keybar import KeyBar
from pctop.ui.widgets.latency import LatencyHistogram, StallBreakdown
from pctop.ui.widgets.render import fmt_rate, fmt_us, latency_severity, sparkline, stall_severity
from pctop.ui.widgets.vcpu_table import fmt_ms, vcpu_label


def find_vcpu(sample: Sample | None, key: VcpuKey) -> tuple[Target, VcpuSample] | None:
    if sample is None:
        return None
    for t in sample.targets:
        if t.pid == key[0]:
            for v in t.vcpus:
                if v.tid == key[1]:
                    return t, v
    return None


def blocktime_text(v: VcpuSample, interval_s: float, ser: VcpuSeries | None) -> Text:
    """QEMU's own blocktime for this vCPU beside pctop's measured stall, in the same
    units, for the interval and in total since watching (QEMU 7.2 reports its blocktime only
    once the migration completes, so the totals are the fair comparison)."""
    out = Text()
    if v.vmm_blocktime_ms is None:
        return out
    out.append("\nQEMU blocktime ", style="bold")
    out.append(fmt_ms(v.vmm_blocktime_ms), style="bold")
    if ser is not None and ser.vmm_blocktime_ms_total is not None:
        out.append(f" (total {fmt_ms(ser.vmm_blocktime_ms_total)})")
    out.append("  pctop stalled ", style="bold")
    out.append(f"{fmt_ms(v.stall_ns / 1e6)} = {v.stalled_frac * 100:.1f}%")
    if ser is not None:
        out.append(f" (total {fmt_ms(ser.stall_ns_total / 1e6)})")
    return out


def summary_text(t: Target, v: VcpuSample, history: History, interval_s: float = 1.0) -> Text:
    sev = stall_severity(v.faults, v.stalled_frac)
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append(f"vCPU {vcpu_label(v)}", style="bold")
    out.append(f" of {t.comm} {t.pid}  tid {v.tid} {v.name}  id via {v.identity}\n", style="dim")
    out.append(f"faults/s {fmt_rate(v.faults_per_s)}  stalled ")
    out.append(f"{sev.symbol}{v.stalled_frac * 100:.1f}% {sev.word}", style=sev.style)
    for name, us in (("p50", v.p50_us), ("p90", v.p90_us), ("p99", v.p99_us), ("max", v.max_us)):
        us = us if v.faults else None  # no stall this interval: "-", as in the table
        out.append(f"  {name} ")
        out.append(fmt_us(us), style=latency_severity(us).style)
    out.append_text(blocktime_text(v, interval_s, history.vcpus.get((t.pid, v.tid))))
    out.append(f"\nexits to user space/s {fmt_rate(v.exits_per_s)}  no-read faults {v.faults_no_read}"
               f"  memory-fault exits {v.memory_fault_exits}")
    ser = history.vcpus.get((t.pid, v.tid))
    if ser is not None:
        out.append(f"  faults seen {ser.faults_total}")
    if v.exits:
        out.append("  exits: " + ", ".join(f"{k} {n}" for k, n in sorted(v.exits.items())), style="dim")
    return out


def history_text(key: VcpuKey, history: History, width: int) -> Text:
    out = Text(no_wrap=True, overflow="ellipsis")
    ser = history.vcpus.get(key)
    if ser is None or not ser.times:
        out.append("no history yet", style="dim")
        return out
    spark_w = max(10, width - 33)  # label 10, " now XXXXXX max XXXXXX" 23
    n = min(len(ser.times), spark_w)
    out.append(f"recent history, last {n} samples (from {clock(ser.times[-n])} to {clock(ser.times[-1])})",
               style="bold")
    rows = (
        ("faults/s", list(ser.faults_per_s), fmt_rate),
        ("stalled %", [x * 100 for x in ser.stalled_frac], lambda x: f"{x:.1f}%"),
        ("p99", list(ser.p99_us), fmt_us),
    )
    if any(x is not None for x in ser.vmm_blocktime_ms):
        rows += (("qemu blk", [x or 0.0 for x in ser.vmm_blocktime_ms], fmt_ms),)
    for label, vals, fmt in rows:
        # Numbers first, then the graph: a short history leaves room on its right.
        out.append(f"\n{label:>9} now {fmt(vals[-1]):>6} max {fmt(max(vals[-spark_w:])):>6} ")
        out.append(sparkline(vals, spark_w), style="cyan")
    return out


def recent_text(key: VcpuKey, history: History, height: int, width: int = 80) -> Text:
    """The newest samples of this vCPU as numbers, newest first (QEMU's blocktime
    beside the stall when it is reported; p99 gives way to it when narrow)."""
    out = Text(no_wrap=True, overflow="ellipsis")
    ser = history.vcpus.get(key)
    vmm = ser is not None and any(x is not None for x in ser.vmm_blocktime_ms)
    p99 = not vmm or width >= 44
    out.append(f"{'time':>8} {'faults/s':>8} {'stalled':>8}" + (f" {'qemu blk':>8}" if vmm else "")
               + (f" {'p99':>7}" if p99 else ""), style="bold")
    if ser is None:
        return out
    rows = list(zip(ser.times, ser.faults_per_s, ser.stalled_frac, ser.vmm_blocktime_ms,
                    ser.p99_us))[::-1][: max(1, height - 1)]
    for t, f, st, blk, p99_us in rows:
        sev = stall_severity(int(f > 0), st)
        out.append(f"\n{clock(t):>8} {fmt_rate(f):>8} ")
        out.append(f"{sev.symbol}{st * 100:6.1f}%", style=sev.style)
        if vmm:
            out.append(f" {fmt_ms(blk):>8}", style="" if blk else "dim")
        if p99:
            out.append(f" {fmt_us(p99_us or None):>7}", style=latency_severity(p99_us or None).style)
    return out


class RecentPanel(TextPanel):
    """show(key, history)"""

    def draw(self, width: int, height: int, key: VcpuKey, history: History) -> Text:
        return recent_text(key, history, height, width)


class SummaryPanel(TextPanel):
    def draw(self, width: int, height: int, text: Text) -> Text:
        return text


class HistoryPanel(TextPanel):
    """show(key, history)"""

    def draw(self, width: int, height: int, key: VcpuKey, history: History) -> Text:
        return history_text(key, history, width)


class VcpuDetailScreen(Screen[None]):
    BINDINGS = [
        Binding("escape,backspace", "app.pop_screen", "Back"),
        Binding("c", "toggle_cumulative", "Interval/total"),
        Binding("question_mark", "app.help", "Help"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, key: VcpuKey) -> None:
        super().__init__()
        self.key = key
        self.cumulative = True
        self._last: tuple[Sample | None, History] | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="detail"):
            yield SummaryPanel(id="detail-summary")
            with Horizontal(id="detail-latency"):
                yield LatencyHistogram(id="detail-hist", classes="panel")
                with Vertical(id="detail-right"):
                    yield StallBreakdown(id="detail-parts", classes="panel")
                    yield RecentPanel(id="detail-recent", classes="panel")
            yield HistoryPanel(id="detail-history", classes="panel")
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one(RecentPanel).border_title = "recent samples, newest first"

    def action_toggle_cumulative(self) -> None:
        self.cumulative = not self.cumulative
        if self._last:
            self.show_sample(*self._last)

    def show_sample(self, sample: Sample | None, history: History) -> None:
        self._last = (sample, history)
        found = find_vcpu(sample, self.key)
        summary = self.query_one(SummaryPanel)
        if found is None:
            summary.show(Text(f"vCPU thread {self.key[1]} of {self.key[0]} is not in the latest sample "
                                "(gone, or the feed restarted)", style="yellow"))
            return
        t, v = found
        summary.show(summary_text(t, v, history, sample.interval_s))
        ser = history.vcpus.get(self.key)
        if self.cumulative and ser is not None:
            self.query_one(LatencyHistogram).show(ser.hist_total, "stall latency since watching")
            self.query_one(StallBreakdown).show(ser.parts_total, ser.faults_total, "stall parts since watching",
                                                sample.probe_tier)
        else:
            self.query_one(LatencyHistogram).show(v.hist, "stall latency, last interval")
            self.query_one(StallBreakdown).show(v.parts, v.faults, "stall parts, last interval", sample.probe_tier)
        self.query_one(HistoryPanel).show(self.key, history)
        self.query_one(RecentPanel).show(self.key, history)
