"""Terminals for tests.

Term: pctop on a pty that is its controlling terminal, so Ctrl+C (the byte 0x03)
reaches its process group as SIGINT and closing the terminal sends SIGHUP, exactly as
in a terminal emulator or tmux. Also: every process it started, so a test can check
none is left behind, and a private TMPDIR to check for folders.

in_pty / run_in_pty: a command on a pty that is only where it reads keys and draws
(the dashboard's tests press keys, never Ctrl+C).
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ROOT


def open_pty(cols: int = 100, rows: int = 30) -> tuple[int, int]:
    """(master, slave) of a new pty of cols x rows."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return master, slave


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """What the pty shows until `needle` appears, the pty closes or `timeout` passes."""
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                buf += os.read(fd, 65536)
            except OSError:
                break
    return buf


@contextmanager
def in_pty(argv: list[str]) -> Iterator[tuple[subprocess.Popen, int]]:
    """argv on a 100x30 pty in its own session: (process, the pty's master fd). Whatever
    the test does, the process group is gone and the pty closed afterwards."""
    master, slave = open_pty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            env=dict(os.environ, TERM="xterm-256color"), start_new_session=True)
    os.close(slave)
    try:
        yield proc, master
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)


def run_in_pty(argv: list[str], wait_for: bytes, timeout: float = 60) -> tuple[int, bytes]:
    """Start argv in a 100x30 pty, wait for `wait_for` on screen, press q; (exit status, output)."""
    with in_pty(argv) as (proc, master):
        out = read_until(master, wait_for, timeout)
        os.write(master, b"q")
        out += read_until(master, b"\x00never", 1)
        return proc.wait(30), out


def children_of(pid: int) -> list[int]:
    """The children of pid's main thread."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # after setsid (start_new_session): our controlling tty
    # As a terminal's shell starts a command: Ctrl+C and Ctrl+\ at their defaults. A test
    # run started as a background job of a non-interactive shell (`make test &`) inherits
    # SIGINT ignored, and Python keeps an inherited SIG_IGN: Ctrl+C would do nothing.
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def descendants(pid: int) -> set[int]:
    """Every live process below pid (all threads' children, recursively)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Term:
    def __init__(self, args: list[str], tmpdir: Path, cols: int = 100, rows: int = 30) -> None:
        self.tmpdir = tmpdir
        tmpdir.mkdir(parents=True, exist_ok=True)
        self.master, slave = open_pty(cols, rows)
        env = dict(os.environ, TERM="xterm-256color", TMPDIR=str(tmpdir))
        self.proc = subprocess.Popen([sys.executable, "-m", "pctop", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=ROOT, env=env, start_new_session=True,
                                     preexec_fn=_take_terminal)
        os.close(slave)
        self.out = b""
        self.seen: set[int] = set()

    def read_until(self, needle: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.out and time.monotonic() < deadline:
            self.seen |= descendants(self.proc.pid)
            if self.master < 0:  # hung up: nothing to read, keep following the children
                time.sleep(0.1)
                continue
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:
                    return needle in self.out
        return needle in self.out

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def hang_up(self) -> None:
        """Close the terminal, as a terminal emulator or `tmux kill-session` does."""
        os.close(self.master)
        self.master = -1

    def wait(self, timeout: float) -> int:
        """The exit status, draining output meanwhile (a full pty would block the writer)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read_until(b"\x00never", 0.2)
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def text(self) -> str:
        return self.out.decode(errors="replace")

    def leftovers(self, grace: float = 5.0) -> tuple[list[int], list[str]]:
        """(processes still alive that it started, what is left in its TMPDIR), after
        giving children `grace` seconds to finish exiting."""
        deadline = time.monotonic() + grace
        while any(alive(p) for p in self.seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [p for p in self.seen if alive(p)], sorted(os.listdir(self.tmpdir))

    def close(self) -> None:
        """Whatever the test did: nothing of this run survives it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in self.seen:
            if alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
