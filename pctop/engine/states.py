"""The engine run's state (the status' "state", docs/engine-control.md) and the moves
allowed between its values.

precopy: setting up, the vCPUs have not started. postcopy / paused / recovering: the
vCPUs run, and the link (pctop.engine.recovery.Link) is up / down / reconnecting.
stopping: every page is in and the run winds down to verify. completed / failed: the
end, never left again. Any state before the end can fail.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pctop.model import MigrationState as S

TRANSITIONS: dict[S, frozenset[S]] = {
    S.PRECOPY: frozenset({S.POSTCOPY, S.PAUSED, S.FAILED}),
    S.POSTCOPY: frozenset({S.PAUSED, S.RECOVERING, S.STOPPING, S.FAILED}),
    S.PAUSED: frozenset({S.POSTCOPY, S.RECOVERING, S.STOPPING, S.FAILED}),
    S.RECOVERING: frozenset({S.POSTCOPY, S.PAUSED, S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.COMPLETED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
}
# The link's state -> the run's, while the vCPUs run.
LINK_STATES = {"up": S.POSTCOPY, "down": S.PAUSED, "recovering": S.RECOVERING}


class EngineStateError(RuntimeError):
    """A move TRANSITIONS does not allow: a defect in the engine, not in its input."""


class RunState:
    """The run's state, moved by the run and by the link's threads, only along TRANSITIONS."""

    def __init__(self) -> None:
        self._now = S.PRECOPY
        self._lock = threading.Lock()

    @property
    def now(self) -> S:
        return self._now

    def _enter(self, new: S) -> None:
        old = self._now
        if new is not old and new not in TRANSITIONS[old]:
            raise EngineStateError(f"internal error: the run cannot go from {old} to {new}")
        self._now = new

    def go(self, new: S) -> None:
        """Move to `new` (staying is no move); EngineStateError if TRANSITIONS forbids it."""
        with self._lock:
            self._enter(new)

    def begin(self, link_state: Callable[[], str]) -> None:
        """The vCPUs start: postcopy if the link is up, else paused. The link's state is
        read under the lock, so news of it meanwhile waits, then applies (follow_link)."""
        with self._lock:
            self._enter(S.POSTCOPY if link_state() == "up" else S.PAUSED)

    def follow_link(self, link_state: str) -> None:
        """The link's news ("up", "down", "recovering") is the run's state while the vCPUs
        run; not while setting up (the first connection) or once the run winds down (it
        closes the link itself)."""
        with self._lock:
            if self._now in LINK_STATES.values():
                self._enter(LINK_STATES[link_state])

    def fail(self) -> None:
        """The run raised: failed, unless it had already completed (what raised came after)."""
        with self._lock:
            if self._now is not S.COMPLETED:
                self._enter(S.FAILED)
