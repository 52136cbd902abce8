"""One row per vCPU (or other faulting thread) per target; sortable, like htop.

A Line API widget rather than a DataTable: a DataTable re-measures every cell
through Rich on each rebuild, which cost ~200 ms per frame at 256 vCPUs.
Here a frame only sorts the rows and draws the visible ones as Segments
(measured in bench/tui.py). The header line stays fixed while rows scroll.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from pctop.model import Sample, Target, VcpuSample
from pctop.ui.history import History, VcpuKey
from pctop.ui.widgets.latency import parts_of
from pctop.ui.widgets.render import fmt_rate, fmt_us, latency_severity, sparkline, stacked_runs, stall_severity

TREND_MIN, TREND_MAX = 10, 60
PARTS_W = 12  # the per-row stall-parts bar, shown when the width allows


class Column(NamedTuple):
    key: str
    label: str
    width: int
    sort: Callable[[Target, VcpuSample], float] | None
    drop: int = 0  # when the width is short, higher numbers go first; 0 = always shown


def _vcpu_order(t: Target, v: VcpuSample) -> float:
    # vCPUs by index first, then other faulting threads by tid.
    return t.pid * 1e7 + (v.vcpu if v.vcpu is not None else 1e6 + v.tid)


COLUMNS = (
    Column("target", "PID", 7, None),
    Column("vcpu", "vCPU", 8, _vcpu_order),
    Column("faults", "faults/s", 8, lambda t, v: v.faults_per_s),
    Column("stall", "stalled", 8, lambda t, v: v.stalled_frac),
    # QEMU's own blocktime for the vCPU (total since watching) beside pctop's measured
    # stall; from the first sample where some vCPU has it (a QMP source).
    Column("vmm", "qemu blk", 8, lambda t, v: v.vmm_blocktime_ms or 0.0),
    Column("p50", "p50", 6, lambda t, v: v.p50_us or 0.0, drop=2),
    Column("p99", "p99", 6, lambda t, v: v.p99_us or 0.0),
    Column("max", "max", 6, lambda t, v: v.max_us or 0.0, drop=1),
    # KVM_RUN returns to user space (kvm_userspace_exit), not every VM exit.
    Column("exits", "uexit/s", 7, lambda t, v: v.exits_per_s, drop=3),
    Column("parts", "stall parts", PARTS_W, None),  # only when wide enough
    Column("trend", "faults/s trend", 0, None),  # takes the rest of the width
)
SORTABLE = tuple(c.key for c in COLUMNS if c.sort is not None)
GAP = 1

_STYLES: dict[str, Style] = {}


def style(name: str) -> Style:
    s = _STYLES.get(name)
    if s is None:
        s = _STYLES[name] = Style.parse(name) if name else Style()
    return s


def vcpu_label(v: VcpuSample) -> str:
    if v.vcpu is not None:
        return str(v.vcpu)
    return (v.name or f"t{v.tid}")[:8]


def visible_columns(width: int, vmm: bool) -> list[Column]:
    """The columns that fit `width`: the QEMU blocktime one only when `vmm`; the
    stall-parts bar only with room to spare; then, while the fixed columns leave
    the trend less than its minimum, the lower-priority ones are dropped."""
    cols = [c for c in COLUMNS if c.key != "vmm" or vmm]
    used = sum(c.width + GAP for c in cols if c.width and c.key != "parts")
    if width < used + PARTS_W + GAP + 2 * TREND_MIN:
        cols = [c for c in cols if c.key != "parts"]
    for c in sorted((c for c in cols if c.drop), key=lambda c: -c.drop):
        if used + TREND_MIN + 1 <= width:
            break
        cols.remove(c)
        used -= c.width + GAP
    return cols


def fixed_width(cols: list[Column]) -> int:
    return sum(c.width + GAP for c in cols if c.width)


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return "0" if ms == 0 else fmt_us(ms * 1000)


def cell(key: str, t: Target, v: VcpuSample) -> tuple[str, str]:
    """(text, style) of one fixed-width column of a row."""
    if key == "target":
        return str(t.pid), "dim"
    if key == "vcpu":
        return vcpu_label(v), "bold" if v.vcpu is not None else "italic"
    if key == "faults":
        return fmt_rate(v.faults_per_s), ""
    if key == "stall":
        sev = stall_severity(v.faults, v.stalled_frac)
        return f"{sev.symbol}{v.stalled_frac * 100:5.1f}%", sev.style
    if key == "vmm":
        return fmt_ms(v.vmm_blocktime_ms), "" if v.vmm_blocktime_ms else "dim"
    if key == "exits":
        return fmt_rate(v.exits_per_s), ""
    us = {"p50": v.p50_us, "p99": v.p99_us, "max": v.max_us}[key]
    return fmt_us(us), latency_severity(us).style


def sort_label(label: str, width: int, reverse: bool) -> str:
    """The sorted column's label with its direction, within `width` (the label gives way)."""
    arrow = "▼" if reverse else "▲"
    if not width or len(label) + 2 <= width:
        return f"{label} {arrow}"
    return label[:width - 1] + arrow


def row_cells(t: Target, v: VcpuSample, trend: str, cols: list[Column],
              vmm_total_ms: float | None = None) -> list[tuple[str, str]]:
    """(text, style) runs for a row in `cols`; text is already padded to the column widths.
    vmm_total_ms: the VMM's blocktime of this vCPU since watching (the "qemu blk" column)."""
    out = []
    for c in cols:
        if c.key == "parts":
            out += stacked_runs(parts_of(v.parts), PARTS_W) if v.stall_ns else [("·" * PARTS_W, "dim")]
            out.append((" " * GAP, ""))
        elif c.key == "trend":
            out.append((trend, "cyan"))
        else:
            text, st = (fmt_ms(vmm_total_ms), "" if vmm_total_ms else "dim") if c.key == "vmm" else cell(c.key, t, v)
            out.append((text.rjust(c.width)[-c.width:] + " " * GAP, st))
    return out


class VcpuTable(ScrollView, can_focus=True):
    """Keeps the cursor on the same vCPU across updates and re-sorts."""

    BINDINGS = [
        Binding("up,k", "move(-1)", "Up", show=False),
        Binding("down,j", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
    ]
    COMPONENT_CLASSES = {"vcpu-table--header", "vcpu-table--cursor", "vcpu-table--stripe"}
    DEFAULT_CSS = """
    VcpuTable { height: 1fr; }
    VcpuTable > .vcpu-table--header { text-style: bold; background: $panel; }
    VcpuTable > .vcpu-table--cursor { background: $accent 15%; text-style: bold; }
    VcpuTable:focus > .vcpu-table--cursor { background: $accent 30%; }
    VcpuTable > .vcpu-table--stripe { background: $boost; }
    """

    cursor_row: reactive[int] = reactive(0, always_update=True)

    class Highlighted(Message):
        """The cursor moved to another vCPU."""

    class Selected(Message):
        """Enter (or a click on the cursor row): open the vCPU's detail."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.sort_key = "vcpu"
        self.sort_reverse = False
        self._rows: list[tuple[Target, VcpuSample]] = []
        self._keys: list[VcpuKey] = []
        self._history: History | None = None
        self._last: tuple[Sample, History] | None = None
        self.has_vmm = False  # some vCPU carries the VMM's own blocktime: show that column

    # -- data --------------------------------------------------------------
    @property
    def selected_key(self) -> VcpuKey | None:
        if 0 <= self.cursor_row < len(self._keys):
            return self._keys[self.cursor_row]
        return None

    def show(self, sample: Sample, history: History) -> None:
        self._last = (sample, history)
        col = next(c for c in COLUMNS if c.key == self.sort_key)
        rows = [(t, v) for t in sample.targets for v in t.vcpus]
        # Once QEMU has reported a blocktime the column stays: it shows totals since
        # watching (QEMU 7.2 reports only at completion; intervals after that are 0).
        self.has_vmm = self.has_vmm or any(v.vmm_blocktime_ms is not None for _, v in rows)
        if col.key == "vmm":
            def total(tv) -> float:
                ser = history.vcpus.get((tv[0].pid, tv[1].tid))
                return (ser.vmm_blocktime_ms_total or 0.0) if ser else 0.0
            rows.sort(key=total, reverse=self.sort_reverse)
        else:
            rows.sort(key=lambda tv: col.sort(*tv), reverse=self.sort_reverse)
        keep = self.selected_key
        self._rows, self._history = rows, history
        self._keys = [(t.pid, v.tid) for t, v in rows]
        self._set_virtual_height(len(rows) + 1)
        if keep in self._keys:
            self.set_reactive(VcpuTable.cursor_row, self._keys.index(keep))
        else:
            self.set_reactive(VcpuTable.cursor_row, min(self.cursor_row, max(0, len(rows) - 1)))
        self.refresh()

    def set_sort(self, key: str, reverse: bool | None = None) -> None:
        if key not in SORTABLE:
            return
        if reverse is None:
            # Numbers read best largest-first; the vCPU index smallest-first.
            reverse = key != "vcpu"
        self.sort_key, self.sort_reverse = key, reverse
        if self._last is not None:
            self.show(*self._last)
        self.refresh()

    def cycle_sort(self) -> None:
        # Through the columns on screen only: a sort by a hidden column would look random.
        keys = [c.key for c in self._columns() if c.sort is not None]
        i = keys.index(self.sort_key) if self.sort_key in keys else -1
        self.set_sort(keys[(i + 1) % len(keys)])

    def reverse_sort(self) -> None:
        self.set_sort(self.sort_key, not self.sort_reverse)

    # -- cursor ------------------------------------------------------------
    def watch_cursor_row(self, old: int, new: int) -> None:
        body = max(1, self.scrollable_content_region.height - 1)
        if new < self.scroll_offset.y:
            self.scroll_to(y=new, animate=False)
        elif new >= self.scroll_offset.y + body:
            self.scroll_to(y=new - body + 1, animate=False)
        self.refresh()
        if old != new:
            self.post_message(self.Highlighted())

    def _set_cursor(self, row: int) -> None:
        if self._rows:
            self.cursor_row = max(0, min(len(self._rows) - 1, row))

    def action_move(self, delta: int) -> None:
        self._set_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        self._set_cursor(self.cursor_row + direction * max(1, self.scrollable_content_region.height - 2))

    def action_jump(self, row: int) -> None:
        self._set_cursor(row if row >= 0 else len(self._rows) - 1)

    def _column_at(self, x: int) -> str | None:
        x += self.scroll_offset.x
        for c in self._columns():
            if c.width == 0 or x < c.width + GAP:
                return c.key
            x -= c.width + GAP
        return None

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            key = self._column_at(event.x)
            if key == self.sort_key:
                self.reverse_sort()
            elif key is not None:
                self.set_sort(key)
            return
        row = self.scroll_offset.y + event.y - 1
        if 0 <= row < len(self._rows):
            if row == self.cursor_row:
                self.post_message(self.Selected())
            self._set_cursor(row)

    # -- drawing -----------------------------------------------------------
    def _columns(self) -> list[Column]:
        return visible_columns(self.scrollable_content_region.width, self.has_vmm)

    def _trend_width(self, cols: list[Column] | None = None) -> int:
        used = fixed_width(cols or self._columns())
        return max(TREND_MIN, min(TREND_MAX, self.scrollable_content_region.width - used - 1))

    def _header_strip(self, width: int) -> Strip:
        base = self.get_component_rich_style("vcpu-table--header")
        segs = []
        cols = self._columns()
        for c in cols:
            w = c.width or self._trend_width(cols)
            label = sort_label(c.label, w, self.sort_reverse) if c.key == self.sort_key else c.label
            left = c.width == 0 or c.key == "parts"
            text = (label.ljust(w) if left else label.rjust(w))[:w] + (" " * GAP if c.width else "")
            segs.append(Segment(text, base + style("underline") if c.key == self.sort_key else base))
        return Strip(segs).crop_extend(self.scroll_offset.x, self.scroll_offset.x + width, base)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y == 0:
            return self._header_strip(width)
        row = self.scroll_offset.y + y - 1
        if row >= len(self._rows):
            return Strip.blank(width, self.rich_style)
        t, v = self._rows[row]
        ser = self._history.vcpus.get((t.pid, v.tid)) if self._history else None
        cols = self._columns()
        tw = self._trend_width(cols)
        trend = sparkline(ser.faults_per_s, tw) if ser else " " * tw
        if row == self.cursor_row:
            base = self.get_component_rich_style("vcpu-table--cursor")
        elif row % 2:
            base = self.get_component_rich_style("vcpu-table--stripe")
        else:
            base = self.rich_style
        vmm_total = ser.vmm_blocktime_ms_total if ser else None
        segs = [Segment(text, base + style(st)) for text, st in row_cells(t, v, trend, cols, vmm_total)]
        return Strip(segs).crop_extend(self.scroll_offset.x, self.scroll_offset.x + width, base)

    def _set_virtual_height(self, height: int) -> None:
        # Width 0: never a horizontal scrollbar, the trend column absorbs the width.
        size = Size(0, height)
        if size != self.virtual_size:
            self.virtual_size = size
            # The compositor only re-checks scrollbars when sizes it computes
            # change; a ScrollView's own virtual height is not one of them.
            self._refresh_scrollbars()

    def on_resize(self) -> None:
        self.refresh()
