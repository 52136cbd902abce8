"""The pctop TUI. Entry points for the CLI commands.

Importing this package does not import Textual (the app module is loaded
inside the functions), so CLI modules can import these names at the top
without slowing or breaking their --json paths.

- run_feed(feed): the dashboard over any feed (see pctop.ui.feeds).
- run_live(header, stats, interval, controls): over a live aggregator
  (`pctop.stats.open_live(...)` returns the (header, stats) pair).
- run_replay(path, speed, paused): over an NDJSON recording.
- run_demo(engine_argv, control_path): starts a reference-engine run as a
  child process and shows it, controls live (`pctop demo`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pctop.ui.feeds import LiveFeed, ReplayFeed


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


def engine_controls(stats: Any) -> Any:
    """The control client among a Stats' sources (the engine source), if any."""
    for src in getattr(stats, "sources", ()):
        if callable(getattr(src, "send", None)):
            return src
    return None


def run_live(header: Any, stats: Any, interval: float = 1.0, controls: Any = None) -> None:
    """`stats` is anything with `collect() -> Sample` (and optionally `close()`);
    controls default to the engine source inside it (keys appear once an
    engine's migration shows up in a Sample)."""
    if controls is None:
        controls = engine_controls(stats)
    feed = LiveFeed(header, stats.collect, interval=interval, controls=controls,
                    on_close=getattr(stats, "close", None), ended=lambda: getattr(stats, "ended", None))
    run_feed(feed, interval)


def run_replay(path: str | Path, speed: float = 1.0, paused: bool = False) -> None:
    """Raises pctop.sources.replay.RecordingError (one-line message) for a bad file,
    at once when nothing of it can be shown, else after showing it up to the bad line."""
    feed = ReplayFeed.open(path, speed=speed, paused=paused)
    run_feed(feed)
    if feed.error is not None:
        raise feed.error


def run_demo(engine_argv: list[str], control_path: str, interval: float = 1.0,
             use_ebpf: bool = True, env: dict[str, str] | None = None) -> int:
    """`pctop demo` without --headless: the engine runs as a child process
    (`engine_argv`, a headless demo command line serving `control_path`) so
    that it never shares a GIL with the dashboard; the dashboard watches it
    with its controls live. Quitting the dashboard stops the engine. Prints
    the engine's own output (its verification summary) afterwards and returns
    its exit status, or None (and prints nothing) when the dashboard quit first and
    stopped it. Raises pctop.sources.engine.EngineError if it never opens its socket
    (the message quotes the end of its stderr).
    """
    import subprocess
    import tempfile
    import time

    from pctop.sources.engine import EngineError
    from pctop.stats import open_live

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(engine_argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(control_path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    err.seek(0)
                    tail = err.read().strip().splitlines()[-1:] or ["no output"]
                    raise EngineError(f"the engine did not open {control_path}: {tail[0]}")
                time.sleep(0.05)
            try:
                header, stats = open_live([proc.pid], None, interval, use_ebpf=use_ebpf,
                                          engine_sockets=[control_path])
            except EngineError:
                try:  # a run short enough to end before we looked: its own output says it all
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                if proc.returncode is None:
                    raise
                return _relay(proc, out, err)
            run_live(header, _DemoStats(stats, proc, out), interval,
                     controls=engine_controls(stats))
        finally:
            stopped = proc.poll() is None
            if stopped:
                proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if stopped:  # its output only says it was stopped; the caller says so itself
            return None
        return _relay(proc, out, err)


def _relay(proc: Any, out: Any, err: Any) -> int:
    """Print a finished engine child's output; its exit status."""
    for fh, stream in ((out, sys.stdout), (err, sys.stderr)):
        fh.seek(0)
        stream.write(fh.read())
    return proc.returncode


class _DemoStats:
    """Stats over a demo run that ends on its last view, saying how the run ended.

    The engine closes its control socket and exits when it finishes, so without
    this the dashboard would clear to "no targets found yet". Once the child has
    exited, the last Sample that showed the run is handed out once more, its
    migration marked completed or failed, with the engine's last lines and the
    verdict as events; then nothing more (the view stays; `ended` is the verdict
    for the header). Polling also reaps the child, so the procfs source sees it
    gone instead of a lingering zombie.
    """

    def __init__(self, stats: Any, proc: Any, out: Any) -> None:
        self._stats, self._proc, self._out = stats, proc, out
        self._last: Any = None  # the last Sample that showed the run's migration
        self.ended: str | None = None
        self.sources = stats.sources

    def collect(self) -> Any:
        if self.ended is not None:
            return None
        sample = self._stats.collect()
        if any(t.migration is not None for t in sample.targets):
            self._last = sample
        if self._proc.poll() is None:
            return sample
        return self._final(sample)

    def _final(self, sample: Any) -> Any:
        from dataclasses import replace

        from pctop.model import Event

        rc = self._proc.returncode
        ok = rc == 0
        if ok:
            self.ended = "demo finished: verified"
        elif rc < 0:
            import signal
            self.ended = f"demo FAILED (the engine was ended by {signal.Signals(-rc).name})"
        else:
            self.ended = f"demo FAILED (exit {rc})"
        self._out.seek(0)
        lines = [line for line in self._out.read().splitlines() if line.strip()]
        last = self._last or sample

        def done(t: Any) -> Any:
            m = t.migration
            if m is None:
                return t
            got = m.pages_total if ok else m.pages_received
            return replace(t, migration=replace(m, state="completed" if ok else "failed", eta_s=None,
                                                pages_received=got))
        # The verdict last, as "<pid>: ..." so the log adds no state edge after it.
        events = [Event(sample.time, "state", line) for line in lines[-3:]]
        events.append(Event(sample.time, "state", f"{self._proc.pid}: {self.ended}; q quits"))
        return replace(last, seq=sample.seq, time=sample.time, targets=tuple(done(t) for t in last.targets),
                       events=sample.events + tuple(events))

    def close(self) -> None:
        self._stats.close()
