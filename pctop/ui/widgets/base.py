"""A widget that draws rich Text for its current size.

Widgets keep the data they were last given and draw in `render()`, so a
resize (or a breakpoint switching the layout) redraws bars and sparklines
at the new width without waiting for the next Sample.
"""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget


class TextPanel(Widget):
    DEFAULT_CSS = "TextPanel { height: auto; }"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._args: tuple = ()
        self._lines = -1

    def show(self, *args) -> None:
        self._args = args
        # An auto-height panel must be laid out again when its line count changes.
        lines = self.draw(max(1, self.content_region.width), max(1, self.content_region.height),
                          *args).plain.count("\n") if self.styles.height is None or self.styles.height.is_auto else self._lines
        self.refresh(layout=lines != self._lines)
        self._lines = lines

    def draw(self, width: int, height: int, *args) -> Text:
        raise NotImplementedError

    def render(self) -> Text:
        r = self.content_region
        if not self._args:
            return Text("")
        return self.draw(max(1, r.width), max(1, r.height), *self._args)
