"""Stall latency: the log2 histogram as bars, and where stall time went
(queued / in service / run-queue) as one stacked bar."""

from __future__ import annotations

from typing import Sequence

from rich.text import Text

from pctop.hist import bucket_index, percentile_us
from pctop.model import ProbeTier, StallParts
from pctop.ui.widgets.base import TextPanel
from pctop.ui.widgets.render import Part, bar, bucket_label, fmt_count, fmt_us, latency_severity, stacked_bar

PART_STYLES = (("queued", "█", "red"), ("in service", "▓", "yellow"), ("run-queue", "░", "cyan"))


def parts_of(p: StallParts) -> list[Part]:
    vals = (p.queued_ns, p.service_ns, p.runq_ns)
    return [Part(name, v, ch, st) for (name, ch, st), v in zip(PART_STYLES, vals)]
SHORT_NAMES = ("queue ", "serve ", "runq ")


def hist_text(hist: Sequence[int], width: int, max_rows: int, title: str, max_us: float | None = None) -> Text:
    """max_us: the longest stall in view, when known; a percentile estimated from the
    log2 buckets never exceeds it (a p99 of 128ms beside a max of 100ms would)."""
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append(title, style="bold")
    nz = [i for i, c in enumerate(hist) if c]
    if not nz:
        out.append("\n no stalls in this view", style="dim")
        return out
    lo, hi = nz[0], nz[-1]
    group = max(1, -(-(hi - lo + 1) // max(1, max_rows)))  # merge buckets to fit the height
    rows = []
    for start in range(lo, hi + 1, group):
        rows.append((start, sum(hist[start:start + group])))
    peak = max(c for _, c in rows)
    total = sum(hist)
    p50, p99 = percentile_us(hist, 50, max_us), percentile_us(hist, 99, max_us)
    stats = f"  n={fmt_count(total)}  p50 {fmt_us(p50)}  p99 {fmt_us(p99)}"
    if out.cell_len + len(stats) <= width:  # the ◄p50/◄p99 marks say it when there is no room
        out.append(stats, style="dim")
    bar_w = max(4, width - 20)
    for start, c in rows:
        marks = [name for name, p in (("p50", p50), ("p99", p99))
                 if p is not None and start <= bucket_index(p) < start + group]
        out.append(f"\n{bucket_label(start):>6} ")
        out.append(bar(c / peak, bar_w), style=latency_severity(float(1 << start)).style)
        out.append(f" {fmt_count(c):>5}")
        if marks:
            out.append(" ◄" + ",".join(marks), style="bold")
    return out


def parts_text(parts: StallParts | Sequence[int], faults: int, width: int, title: str,
               tier: ProbeTier | None = None) -> Text:
    """tier: the sample's probe tier; with eBPF, faults without parts are ones that did
    not wait on a uffd (vcpu-exit: the vCPU fetched its own page)."""
    vals = (parts.queued_ns, parts.service_ns, parts.runq_ns) if isinstance(parts, StallParts) else tuple(parts)
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append(title, style="bold")
    total = sum(vals)
    if total <= 0:
        if faults == 0:
            note = "no stall time in this view"
        elif tier == ProbeTier.EBPF:
            note = "these faults waited on no uffd (resolved on a KVM_RUN exit): no parts to split"
        else:
            note = "stall parts need the eBPF probes"
        out.append(f"\n {note}", style="dim")
        return out
    out.append("\n ")
    out.append_text(stacked_bar([Part(n, v, ch, st) for (n, ch, st), v in zip(PART_STYLES, vals)],
                                max(10, width - 2)))
    # Full legend, else short names, else shares only: all three parts stay visible.
    for names, means in ((None, True), (SHORT_NAMES, False), (("", "", ""), False)):
        legend = Text()
        for i, ((name, ch, st), v) in enumerate(zip(PART_STYLES, vals)):
            mean = f" {fmt_us(v / faults / 1000)}" if faults and means else ""
            label = name + " " if names is None else names[i]
            legend.append(f" {ch}", style=st)
            legend.append(f"{' ' if names is None else ''}{label}{v / total * 100:.0f}%{mean}")
        if legend.cell_len <= width:
            break
    out.append("\n")
    out.append_text(legend)
    return out


class LatencyHistogram(TextPanel):
    """show(hist, title, max_us)"""

    def draw(self, width: int, height: int, hist: Sequence[int], title: str, max_us: float | None = None) -> Text:
        return hist_text(hist, width, max(2, height - 1), title, max_us)


class StallBreakdown(TextPanel):
    """show(parts, faults, title, tier)"""

    def draw(self, width: int, height: int, parts: StallParts | Sequence[int], faults: int,
             title: str, tier: ProbeTier | None = None) -> Text:
        return parts_text(parts, faults, width, title, tier)
