"""The pctop TUI. Entry points for the CLI commands.

Importing this package does not import Textual (the app module is loaded
inside the functions), so CLI modules can import these names at the top
without slowing or breaking their --json paths.

- run_feed(feed): the dashboard over any feed (see pctop.ui.feeds).
- run_live(header, stats, interval, controls): over a live aggregator
  (`pctop.root.open_live(...)` returns the (header, stats) pair).
The demos that start child processes and replays of recordings are composed in
pctop.root (run_engine_demo, run_qemu_demo, run_replay).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pctop.ui.feeds import Controls, LiveFeed


def run_feed(feed: Any, interval: float | None = None) -> None:
    """Raises pctop.exits.Interrupted when Ctrl+C, SIGTERM or SIGHUP ended the app."""
    from pctop import exits
    from pctop.ui.app import PctopApp

    app = PctopApp(feed, interval=interval)
    try:
        app.run()
    finally:
        feed.close()
        exits.raise_on_termination()  # the app's handlers are gone with its loop
    if app.ended_by is not None:
        raise exits.Interrupted(app.ended_by)


def run_live(header: Any, stats: Any, interval: float = 1.0, controls: Controls | None = None,
             ended: Callable[[], str | None] | None = None) -> None:
    """`stats` is anything with `collect() -> Sample` and `close()` (a Stats, a
    pctop.root.Tap); `controls`: what the keys drive, chosen by the caller
    (pctop.root.engine_controls, or a QMP source), none without. `ended`: how the
    watched run ended, once it has (the header says so; pctop.root.DemoEnd)."""
    feed = LiveFeed(header, stats.collect, interval=interval, controls=controls,
                    on_close=stats.close, ended=ended)
    run_feed(feed, interval)
