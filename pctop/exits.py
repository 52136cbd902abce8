"""How every pctop command ends: exit statuses and the signals that end a run.

The table is also in the README ("Exit status"):

  0   done (demo: every page verified)
  1   failed, or what was asked for is unavailable here (no target, no privilege)
  2   bad input (an option, a file that is not a recording)
  130 interrupted: Ctrl+C, `q` before a demo finished
  129 / 143 ended by SIGHUP (terminal closed) / SIGTERM (128 + the signal, as shells report)

SIGTERM and SIGHUP raise `Interrupted` in the main thread, like Ctrl+C raises
KeyboardInterrupt, so `finally` blocks run: child processes are stopped and
temporary folders removed however a run ends.
"""

from __future__ import annotations

import os
import signal
import threading

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


class Interrupted(KeyboardInterrupt):
    """A run ended by a signal; `status` is the exit status to use."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.status = INTERRUPTED if signum == signal.SIGINT else 128 + signum


def status_of(e: KeyboardInterrupt) -> int:
    return e.status if isinstance(e, Interrupted) else INTERRUPTED


def what(e: KeyboardInterrupt) -> str:
    """'interrupted' (Ctrl+C), or which signal ended the run."""
    if isinstance(e, Interrupted) and e.signum != signal.SIGINT:
        return f"ended by {signal.Signals(e.signum).name}"
    return "interrupted"


def _raise(signum: int, _frame) -> None:
    if signum == signal.SIGHUP:
        detach_terminal()
    raise Interrupted(signum)


def detach_terminal() -> None:
    """The terminal is gone: writes to it would fail (EIO) in every cleanup path and at
    exit, so stdout/stderr that were the terminal now go to /dev/null (files and pipes stay)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in _tty_fds:
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


_tty_fds: list[int] = []  # stdout/stderr that were a terminal at start (a hung-up one fails isatty)


def raise_on_termination() -> None:
    """SIGTERM and SIGHUP raise Interrupted (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        _tty_fds[:] = [fd for fd in (1, 2) if os.isatty(fd)]
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise)
