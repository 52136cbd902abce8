"""userfaultfd queue depth: pending (queued, unread) and in service (read, not
yet woken) as gauges and as history, plus reads/s, installs/s, handler CPU%."""

from __future__ import annotations

from rich.text import Text

from pctop.model import Sample
from pctop.ui.history import History
from pctop.ui.widgets.base import TextPanel
from pctop.ui.widgets.render import bar, fmt_rate, sparkline


def depth_style(depth: float) -> str:
    # A queue that holds several faults means vCPUs wait for a handler.
    return "bold red" if depth >= 4 else "yellow" if depth >= 1 else "green"


def uffd_text(sample: Sample | None, history: History, width: int) -> Text:
    out = Text(no_wrap=True, overflow="ellipsis")
    if sample is None:
        return out
    width = max(40, width)
    gauge_w = max(6, min(20, (width - 24) // 2))
    spark_w = max(0, width - 26 - gauge_w)  # label 12, value 13, a space
    first = True
    for t in sample.targets:
        if not t.uffds:
            continue
        for u in t.uffds:
            if not first:
                out.append("\n")
            first = False
            out.append(f"{t.comm} {t.pid} fd {u.fd}", style="bold")
            if u.serves_pid is not None:  # a separate handler: whose faults it resolves
                out.append(f" → pid {u.serves_pid}")
            if t.handler_cpu_pct is not None:
                out.append(f"  handler CPU {t.handler_cpu_pct:.0f}%")
            out.append(f"\n reads {fmt_rate(u.reads_per_s)}/s  installs {fmt_rate(u.installs_per_s)}/s")
            if u.eexist:
                out.append(f"  EEXIST {u.eexist}", style="dim")
            ser = history.uffds.get((t.pid, u.fd))
            scale = max(1.0, ser.peak if ser else 0.0, float(len(t.vcpus)))
            in_service = max(0.0, u.total_mean - u.pending_mean)
            # fdinfo gives peaks of pending and of total; in service has no peak of its own.
            rows = (
                ("pending", u.pending_mean, f"max {u.pending_max:<3d}", ser.pending if ser else ()),
                ("in service", in_service, f"tot≤{u.total_max:<3d}", ser.in_service if ser else ()),
            )
            for label, now, peak, hist in rows:
                out.append(f"\n {label:<10} ")
                out.append(bar(now / scale, gauge_w), style=depth_style(now))
                out.append(f" {now:4.1f} {peak}", style="bold" if now >= 1 else "")
                if spark_w > 2:
                    out.append(" " + sparkline(hist, spark_w - 1, top=scale), style="cyan")
    if first:
        out.append("no userfaultfd seen in the targets", style="dim")
    return out


class UffdPanel(TextPanel):
    """show(sample, history)"""

    def draw(self, width: int, height: int, sample: Sample | None, history: History) -> Text:
        return uffd_text(sample, history, width)
