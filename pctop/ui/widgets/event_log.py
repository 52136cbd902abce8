"""Timestamped happenings: state changes, pauses, link down/up, targets gone, errors."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import RichLog

from pctop.model import Event
from pctop.ui.widgets.header import clock

KIND_STYLE = {
    "error": ("✖", "bold red"),
    "target-gone": ("✖", "red"),
    "target-new": ("+", "green"),
    "state": ("◆", "bold yellow"),
    "link": ("⇄", "magenta"),
    "control": ("›", "cyan"),
}


def event_text(e: Event) -> Text:
    symbol, style = KIND_STYLE.get(e.kind, ("•", ""))
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(clock(e.time), style="dim")
    t.append(f" {symbol} {e.kind:<11} ", style=style)
    t.append(e.text)
    return t


class EventLog(RichLog):
    def __init__(self, **kw) -> None:
        super().__init__(max_lines=1000, wrap=False, markup=False, auto_scroll=True, **kw)
        self.count = 0

    def add(self, e: Event) -> None:
        self.count += 1
        self.write(event_text(e))
