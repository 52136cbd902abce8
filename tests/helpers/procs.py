"""Helpers for tests that run pctop or a workload as a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time


def read_wchan(tid: int) -> str:
    """Where a thread of this process sleeps in the kernel ("handle_userfault": in a
    uffd fault); "" once it is gone."""
    try:
        with open(f"/proc/self/task/{tid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll condition() until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def killpg(p: subprocess.Popen) -> None:
    """End a process started with start_new_session and everything it forked (the engine's source)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=10)


class LineReader:
    """Collects a process's stdout lines in a thread, so the test can wait for one."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    def wait_for(self, pred, timeout: float = 30) -> list[str]:
        with self._cv:
            if not self._cv.wait_for(lambda: pred(self.lines), timeout):
                raise AssertionError(f"timed out; lines so far: {self.lines[-3:]}")
            return list(self.lines)


def engine_request(control: str, cmd: str, arg=None, timeout: float = 3.0) -> dict:
    """One request on an engine's control socket, straight from this process (no
    interpreter start-up): its reply."""
    from pctop.sources.engine import EngineConnection

    c = EngineConnection(control, timeout=timeout)
    try:
        return c.request({"cmd": cmd} if arg is None else {"cmd": cmd, "arg": arg})
    finally:
        c.close()
