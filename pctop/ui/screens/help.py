"""Every key, grouped, with what it does; plus how to read the colours and symbols."""

from __future__ import annotations

from typing import NamedTuple

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from pctop.ui.widgets.render import CRIT, IDLE, LAT_CRIT_US, LAT_WARN_US, OK, STALL_CRIT, STALL_WARN, WARN, fmt_us


class KeyHelp(NamedTuple):
    section: str
    keys: str
    description: str
    available: bool = True
    why_not: str = ""


def legend() -> Text:
    t = Text()
    t.append("Reading the screen\n", style="bold underline")
    t.append(" stalled = share of the interval the vCPU spent waiting for pages\n")
    for sev, rng in ((IDLE, "no faults"), (OK, f"under {STALL_WARN:.0%}"),
                     (WARN, f"{STALL_WARN:.0%} to {STALL_CRIT:.0%}"), (CRIT, f"{STALL_CRIT:.0%} or more")):
        t.append(f"   {sev.symbol or ' '} {sev.word:<5}", style=sev.style)
        t.append(f" {rng}\n")
    t.append(f" latency colours: green under {fmt_us(LAT_WARN_US)}, yellow to {fmt_us(LAT_CRIT_US)}, red above\n")
    t.append(" stall parts: ")
    t.append("█ queued", style="red")
    t.append(" (fault → handler read)  ")
    t.append("▓ in service", style="yellow")
    t.append(" (read → page installed)  ")
    t.append("░ run-queue", style="cyan")
    t.append(" (woken → running)\n")
    t.append(" uffd pending = faults queued, unread; in service = read, page not yet installed\n")
    t.append(" uexit/s = KVM_RUN returns to user space per second (not every VM exit)\n")
    t.append(" (interval means; max = peak pending, tot≤ = peak of both together)\n")
    return t


def keys_text(rows: list[KeyHelp]) -> Text:
    t = Text()
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            t.append(f"\n{section}\n", style="bold underline")
        style = "bold" if r.available else "dim"
        t.append(f" {r.keys:>7}  ", style=style)
        t.append(r.description, style="" if r.available else "dim")
        if not r.available and r.why_not:
            t.append(f"  ({r.why_not})", style="dim italic")
        t.append("\n")
    return t


class HelpBox(VerticalScroll):
    """The help's scrolling box; its bottom border says when more is below (a small
    terminal cuts the legend off)."""

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        self.update_hint()

    def on_resize(self) -> None:
        self.call_after_refresh(self.update_hint)

    def update_hint(self) -> None:
        more = self.max_scroll_y > 0 and self.scroll_y < self.max_scroll_y
        self.border_subtitle = "↓ more below (↓ PgDn)" if more else ""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def __init__(self, rows: list[KeyHelp]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        with HelpBox(id="help-box"):
            yield Static(Text("pctop help  (Esc closes; ↑ ↓ PgUp PgDn scroll; Ctrl+P: the command palette)",
                              style="bold"))
            yield Static(keys_text(self.rows), id="help-keys")
            yield Static(legend(), id="help-legend")

    def on_mount(self) -> None:
        self.query_one(HelpBox).focus()  # so the arrow keys scroll it

    def action_close(self) -> None:
        self.dismiss(None)
