"""One row per vCPU (or other faulting thread) per target; sortable, like htop."""

from __future__ import annotations

from typing import Callable, NamedTuple

from rich.text import Text
from textual.widgets import DataTable

from pctop.model import Sample, Target, VcpuSample
from pctop.ui.history import History, VcpuKey
from pctop.ui.widgets.render import (fmt_rate, fmt_us, latency_severity, sparkline,
                                     stall_severity)

TREND_MIN, TREND_MAX = 10, 60
FIXED_COLS_W = 72  # every column but the trend, with cell padding


class Column(NamedTuple):
    key: str
    label: str
    sort: Callable[[Target, VcpuSample], float] | None


def _vcpu_order(t: Target, v: VcpuSample) -> float:
    # vCPUs by index first, then other faulting threads by tid.
    return t.pid * 1e7 + (v.vcpu if v.vcpu is not None else 1e6 + v.tid)


COLUMNS = (
    Column("target", "PID", None),
    Column("vcpu", "vCPU", _vcpu_order),
    Column("faults", "faults/s", lambda t, v: v.faults_per_s),
    Column("stall", "stalled", lambda t, v: v.stalled_frac),
    Column("p50", "p50", lambda t, v: v.p50_us or 0.0),
    Column("p99", "p99", lambda t, v: v.p99_us or 0.0),
    Column("max", "max", lambda t, v: v.max_us or 0.0),
    Column("exits", "exits/s", lambda t, v: v.exits_per_s),
    Column("trend", "faults/s trend", None),
)
SORTABLE = tuple(c.key for c in COLUMNS if c.sort is not None)


def vcpu_label(v: VcpuSample) -> str:
    if v.vcpu is not None:
        return str(v.vcpu)
    return (v.name or f"t{v.tid}")[:8]


def row_cells(t: Target, v: VcpuSample, trend: str) -> list[Text]:
    sev = stall_severity(v.faults, v.stalled_frac)
    stall = Text(f"{sev.symbol}{v.stalled_frac * 100:5.1f}%", style=sev.style, justify="right")
    lat = [Text(fmt_us(x), style=latency_severity(x).style, justify="right")
           for x in (v.p50_us, v.p99_us, v.max_us)]
    return [
        Text(str(t.pid), style="dim", justify="right"),
        Text(vcpu_label(v), style="bold" if v.vcpu is not None else "italic", justify="right"),
        Text(fmt_rate(v.faults_per_s), justify="right"),
        stall,
        *lat,
        Text(fmt_rate(v.exits_per_s), justify="right"),
        Text(trend, style="cyan"),
    ]


class VcpuTable(DataTable):
    """Rebuilt from each Sample; keeps the cursor on the same vCPU across updates."""

    def __init__(self, **kw) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.sort_key = "vcpu"
        self.sort_reverse = False
        self._keys: list[VcpuKey] = []
        self._last: tuple[Sample, History] | None = None

    def on_mount(self) -> None:
        for c in COLUMNS:
            self.add_column(self._label(c), key=c.key)

    def _label(self, c: Column) -> Text:
        if c.key == self.sort_key:
            return Text(c.label + (" ▼" if self.sort_reverse else " ▲"), style="bold underline")
        return Text(c.label)

    @property
    def selected_key(self) -> VcpuKey | None:
        if not self._keys or self.cursor_row < 0 or self.cursor_row >= len(self._keys):
            return None
        return self._keys[self.cursor_row]

    def set_sort(self, key: str, reverse: bool | None = None) -> None:
        if key not in SORTABLE:
            return
        if reverse is None:
            # Numbers read best largest-first; the vCPU index smallest-first.
            reverse = key != "vcpu"
        self.sort_key, self.sort_reverse = key, reverse
        for c in COLUMNS:
            self.columns[c.key].label = self._label(c)
        if self._last is not None:
            self.show(*self._last)

    def cycle_sort(self) -> None:
        i = SORTABLE.index(self.sort_key) if self.sort_key in SORTABLE else -1
        self.set_sort(SORTABLE[(i + 1) % len(SORTABLE)])

    def reverse_sort(self) -> None:
        self.set_sort(self.sort_key, not self.sort_reverse)

    def on_resize(self) -> None:
        if self._last is not None:
            self.show(*self._last)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        if key == self.sort_key:
            self.reverse_sort()
        else:
            self.set_sort(key)

    def show(self, sample: Sample, history: History) -> None:
        self._last = (sample, history)
        col = next(c for c in COLUMNS if c.key == self.sort_key)
        rows = [(t, v) for t in sample.targets for v in t.vcpus]
        rows.sort(key=lambda tv: col.sort(*tv), reverse=self.sort_reverse)
        keep = self.selected_key
        self.clear(columns=False)
        self._keys = []
        # The trend column takes the room a wide terminal leaves.
        trend_w = max(TREND_MIN, min(TREND_MAX, self.size.width - FIXED_COLS_W))
        for t, v in rows:
            key = (t.pid, v.tid)
            ser = history.vcpus.get(key)
            trend = sparkline(ser.faults_per_s, trend_w) if ser else " " * trend_w
            self.add_row(*row_cells(t, v, trend), key=f"{t.pid}:{v.tid}")
            self._keys.append(key)
        if keep in self._keys:
            self.move_cursor(row=self._keys.index(keep), animate=False, scroll=False)
