"""Feeds: what the TUI's worker thread pulls Samples from.

A feed is anything with `header` (a model.Header), `next_sample()` that
blocks for at most about one interval and returns a Sample or None (nothing
new yet), and `close()`. Optional: `controls` (an object with
`send(cmd, arg) -> dict`, the engine's control client), `set_interval(s)`
for live feeds, and the playback methods of ReplayFeed.

This module must not import Textual: the --json paths may import it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Protocol

from pctop.controls import Command
from pctop.model import Header, Sample
from pctop.rates import next_due

# Steps offered by +/- (seconds between samples for live, factor for replay).
INTERVAL_STEPS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
SPEED_STEPS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)


class Feed(Protocol):
    header: Header

    def next_sample(self) -> Sample | None: ...

    def close(self) -> None: ...


class Controls(Protocol):
    """What the dashboard's keys steer: the reference engine (pctop.sources.engine.EngineSource)
    or QEMU over QMP (pctop.sources.qmp.QmpSource). `pid` picks the engine when one client
    serves several; a client of one migration ignores it."""

    def send(self, cmd: Command, arg: Any = None, pid: int | None = None) -> dict[str, Any]: ...

    def supports(self, cmd: Command) -> bool: ...


def step_in(steps: tuple[float, ...], current: float, up: bool) -> float:
    """The next value of a ladder above/below `current` (clamped at the ends)."""
    if up:
        bigger = [s for s in steps if s > current + 1e-9]
        return bigger[0] if bigger else steps[-1]
    smaller = [s for s in steps if s < current - 1e-9]
    return smaller[-1] if smaller else steps[0]


class LiveFeed:
    """Paces a live collector: one `collect()` per interval.

    `collect` is whatever returns the next Sample (pctop.stats.Stats.collect);
    it runs in the caller's thread, which for the TUI is the worker thread.
    The wait is on an Event so that `set_interval` and `close` take effect at
    once instead of after the old interval.
    """

    def __init__(self, header: Header, collect: Callable[[], Sample], interval: float = 1.0,
                 controls: Controls | None = None, on_close: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 ended: Callable[[], str | None] | None = None) -> None:
        self.header = header
        self._ended = ended or (lambda: None)
        self.controls = controls
        self.interval = interval
        self._collect = collect
        self._on_close = on_close
        self._clock = clock
        self._wake = threading.Event()
        self._closed = False
        self._due = clock() + interval

    @property
    def ended(self) -> str | None:
        """How the watched run ended (e.g. "demo finished: verified"), or None while it runs."""
        return self._ended()

    def set_interval(self, seconds: float) -> None:
        self.interval = seconds
        self._due = self._clock() + seconds
        self._wake.set()

    def next_sample(self) -> Sample | None:
        wait = self._due - self._clock()
        if wait > 0:
            self._wake.wait(min(wait, self.interval))
            self._wake.clear()
        if self._closed or self._clock() < self._due:
            return None
        self._due = next_due(self._due, self.interval, self._clock())
        return self._collect()

    def close(self) -> None:
        """Idempotent: the App closes its feed on exit and run_feed again after."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._on_close is not None:
            self._on_close()


class ReplayFeed:
    """Plays a recording back at `speed` x real time, with pause, step and seek.

    All playback state is guarded by one Condition: the UI thread calls the
    control methods, the worker thread blocks in `next_sample`.
    """

    def __init__(self, header: Header, samples: list[Sample], speed: float = 1.0,
                 paused: bool = False, position: int = 0) -> None:
        if not samples:
            raise ValueError("the recording holds no samples")
        self.header = header
        self.samples = samples
        self.speed = speed
        self.paused = paused
        self._pos = max(0, min(position, len(samples) - 1))  # index of the next sample to hand out
        self._pending_jump = True  # the first call returns at once, even when paused
        self._steps = 0
        self._closed = False
        self._due = 0.0  # monotonic time the next sample is due
        self._cv = threading.Condition()
        self.error: Exception | None = None  # what stopped loading (shown at the end; pctop.root.open_replay)

    # -- queries ---------------------------------------------------------
    @property
    def position(self) -> int:
        """Index of the sample most recently handed out (or about to be)."""
        return max(0, self._pos - 1) if not self._pending_jump else self._pos

    @property
    def finished(self) -> bool:
        return self._pos >= len(self.samples) and not self._pending_jump

    def window(self, n: int) -> list[Sample]:
        """The n samples up to and including the current one (to rebuild history after a seek)."""
        end = self.position + 1
        return self.samples[max(0, end - n):end]

    # -- controls (UI thread) -------------------------------------------
    def toggle_pause(self) -> bool:
        with self._cv:
            self.paused = not self.paused
            self._cv.notify_all()
            return self.paused

    def step(self) -> None:
        """Hand out exactly one more sample (pauses playback)."""
        with self._cv:
            self.paused = True
            self._steps += 1
            self._cv.notify_all()

    def set_speed(self, speed: float) -> None:
        with self._cv:
            # Rescale the wait already under way so the change shows at once.
            now = time.monotonic()
            if self._due > now:
                self._due = now + (self._due - now) * self.speed / max(speed, 1e-6)
            self.speed = speed
            self._cv.notify_all()

    def seek_seconds(self, delta: float) -> int:
        """Move by `delta` seconds of recording time; returns the new index."""
        with self._cv:
            cur = self.samples[self.position]
            target = cur.time + delta
            idx = self.position
            if delta >= 0:
                while idx + 1 < len(self.samples) and self.samples[idx + 1].time <= target:
                    idx += 1
                if idx == self.position and idx + 1 < len(self.samples):
                    idx += 1  # always move at least one sample
            else:
                while idx > 0 and self.samples[idx - 1].time >= target:
                    idx -= 1
                if idx == self.position and idx > 0:
                    idx -= 1
            return self._jump(idx)

    def seek_index(self, idx: int) -> int:
        with self._cv:
            return self._jump(max(0, min(idx, len(self.samples) - 1)))

    def _jump(self, idx: int) -> int:
        self._pos = idx
        self._pending_jump = True
        self._cv.notify_all()
        return idx

    # -- worker thread ---------------------------------------------------
    def next_sample(self, max_wait: float = 1.0) -> Sample | None:
        """The next sample when it is due, or None after at most `max_wait` s."""
        with self._cv:
            deadline = time.monotonic() + max_wait
            while not self._closed:
                now = time.monotonic()
                if self._pending_jump:
                    return self._hand_out(now)
                more = self._pos < len(self.samples)
                if more and self.paused and self._steps > 0:
                    self._steps -= 1
                    return self._hand_out(now)
                wake = deadline
                if more and not self.paused:
                    if now >= self._due:
                        return self._hand_out(now)
                    wake = min(self._due, deadline)
                if now >= deadline:
                    return None
                self._cv.wait(wake - now)
            return None

    def _hand_out(self, now: float) -> Sample:
        self._pending_jump = False
        s = self.samples[self._pos]
        self._pos += 1
        if self._pos < len(self.samples):
            gap = max(0.0, self.samples[self._pos].time - s.time)
            self._due = now + gap / max(self.speed, 1e-6)
        return s

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
