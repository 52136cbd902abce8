"""Whole-run timelines (wide terminals): total faults/s, mean % stalled and
uffd queue depth over the kept history, as multi-row bar charts."""

from __future__ import annotations

from typing import Callable, Sequence

from rich.text import Text

from pctop.ui.history import History
from pctop.ui.widgets.base import TextPanel
from pctop.ui.widgets.render import SPARK, fmt_rate


def chart_rows(values: Sequence[float], width: int, rows: int, top: float) -> list[str]:
    """`rows` lines (top line first) of a bar chart of the last `width` values,
    each column filled to value/top of the height, in eighths."""
    vals = list(values)[-width:]
    levels = [0 if top <= 0 else round(min(1.0, max(0.0, v) / top) * rows * 8) for v in vals]
    out = []
    for r in range(rows - 1, -1, -1):  # from the top row down
        line = []
        for lv in levels:
            cell = lv - r * 8
            line.append(" " if cell <= 0 else SPARK[min(cell, 8) - 1])
        out.append("".join(line).ljust(width))
    return out


SERIES: tuple[tuple[str, str, Callable[[History], Sequence[float]], Callable[[float], str]], ...] = (
    ("faults/s, all vCPUs", "cyan", lambda h: h.total_faults, fmt_rate),
    ("% of time stalled, mean of vCPUs", "red", lambda h: [x * 100 for x in h.mean_stalled],
     lambda x: f"{x:.0f}%"),
    ("uffd pending + in service, all uffds", "yellow", lambda h: h.queue_depth, lambda x: f"{x:.1f}"),
)


def timeline_text(history: History, width: int, height: int) -> Text:
    out = Text(no_wrap=True, overflow="ellipsis")
    rows = max(1, (height - len(SERIES)) // len(SERIES))
    chart_w = max(10, width - 8)
    for i, (title, style, get, fmt) in enumerate(SERIES):
        vals = list(get(history))
        top = max(vals[-chart_w:], default=0.0)
        if i:
            out.append("\n")
        out.append(title, style="bold")
        out.append(f"  now {fmt(vals[-1]) if vals else '-'}  peak {fmt(top)}", style="dim")
        for j, line in enumerate(chart_rows(vals, chart_w, rows, top)):
            label = fmt(top) if j == 0 else (fmt(0) if j == rows - 1 else "")
            out.append(f"\n{label:>7} ", style="dim")
            out.append(line, style=style)
    return out


class Timeline(TextPanel):
    """show(history)"""

    def draw(self, width: int, height: int, history: History) -> Text:
        return timeline_text(history, width, height)
