"""The key footer, wrapped onto as many rows as the keys need.

Textual's Footer is one row that scrolls sideways: at 80 columns the last
keys (the migration controls) ran off the right edge. This bar lays the same
keys (the screen's active, shown bindings; grouped keys share one label, as
"- + rate") out in rows of whole entries, so every key is on screen at any
width, and a click on an entry presses its key.
"""

from __future__ import annotations

from itertools import groupby
from typing import NamedTuple

from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.screen import Screen
from textual.widget import Widget

_DIM = Style(dim=True)
SEP = "  "  # between entries: the key colour alone does not separate them on a mono terminal


class Entry(NamedTuple):
    keys: tuple[tuple[str, str], ...]  # (key to press, as shown)
    label: str
    enabled: bool = True

    @property
    def width(self) -> int:
        return sum(len(d) for _, d in self.keys) + len(self.keys) - 1 + (len(self.label) + 1 if self.label else 0)


class Placed(NamedTuple):
    row: int
    x: int
    width: int
    key: str


def entries(bindings: list[tuple[Binding, bool]], key_display) -> list[Entry]:
    """One entry per binding, or per run of bindings of one group (one label for all)."""
    out: list[Entry] = []
    for group, run in groupby(bindings, lambda be: be[0].group):
        run = list(run)
        if group is not None and len(run) > 1:
            out.append(Entry(tuple((b.key, key_display(b)) for b, _ in run), group.description.strip(),
                             any(e for _, e in run)))
        else:
            out += [Entry(((b.key, key_display(b)),), b.description, e) for b, e in run]
    return out


def wrap(items: list[Entry], width: int) -> list[list[Entry]]:
    """Entries in rows of at most `width` cells, in order, never splitting one."""
    rows: list[list[Entry]] = [[]]
    used = 0
    for e in items:
        need = e.width + (len(SEP) if rows[-1] else 0)
        if rows[-1] and used + need > width:
            rows.append([])
            used, need = 0, e.width
        rows[-1].append(e)
        used += need
    return rows


def layout(rows: list[list[Entry]], key_style, label_style, dim_style) -> tuple[Text, list[Placed]]:
    text = Text(no_wrap=True, overflow="crop")
    placed: list[Placed] = []
    for r, row in enumerate(rows):
        if r:
            text.append("\n")
        x = 0
        for i, e in enumerate(row):
            if i:
                text.append(SEP)
                x += len(SEP)
            for j, (key, shown) in enumerate(e.keys):
                if j:
                    text.append(" ")
                    x += 1
                text.append(shown, key_style if e.enabled else dim_style)
                placed.append(Placed(r, x, len(shown), key))
                x += len(shown)
            if e.label:
                text.append(" " + e.label, label_style if e.enabled else dim_style)
                # A click on the label presses the entry's first key.
                placed.append(Placed(r, x, len(e.label) + 1, e.keys[0][0]))
                x += len(e.label) + 1
    return text, placed


class KeyBar(Widget, can_focus=False):
    COMPONENT_CLASSES = {"key-bar--key", "key-bar--label"}
    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: auto;
        max-height: 3;
        background: $footer-background;
        color: $footer-foreground;
    }
    KeyBar > .key-bar--key { color: $footer-key-foreground; text-style: bold; }
    KeyBar > .key-bar--label { color: $footer-description-foreground; }
    """

    def __init__(self, *, palette_key: bool = True, **kw) -> None:
        super().__init__(**kw)
        self.palette_key = palette_key
        self._placed: list[Placed] = []

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen: Screen) -> None:
        if self.is_attached and screen is self.screen:
            self.refresh(layout=True)

    def on_resize(self, _: events.Resize) -> None:
        self.refresh(layout=True)

    def current(self) -> list[Entry]:
        """The entries to show now (the tests read them)."""
        app = self.app
        shown, seen = [], set()
        palette = getattr(app, "COMMAND_PALETTE_BINDING", None)
        for _, b, enabled, _ in self.screen.active_bindings.values():
            if b.show and b.action not in seen and b.key != palette:
                seen.add(b.action)  # one entry per action ("escape,backspace" -> Back once)
                shown.append((b, enabled))
        items = entries(shown, app.get_key_display)
        if self.palette_key and app.ENABLE_COMMAND_PALETTE:
            items.append(Entry(((palette or "ctrl+p", "^p"),), "palette"))
        return items

    def _rows(self, width: int) -> list[list[Entry]]:
        return wrap(self.current(), max(1, width))

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self._rows(width))

    def render(self) -> Text:
        key = self.get_component_rich_style("key-bar--key")
        label = self.get_component_rich_style("key-bar--label")
        text, self._placed = layout(self._rows(self.content_region.width), key, label, label + _DIM)
        return text

    def on_click(self, event: events.Click) -> None:
        for p in self._placed:
            if p.row == event.y and p.x <= event.x < p.x + p.width:
                event.stop()
                self.app.simulate_key(p.key)
                return
