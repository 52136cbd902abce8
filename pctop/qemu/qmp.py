"""A blocking face on qemu.qmp's asyncio QMP client, for pctop's worker threads.

pctop's collectors and CLI are synchronous (Stats.collect() runs in one worker
thread), while qemu.qmp is asyncio. Each QmpConnection owns a private event loop
in a daemon thread; `execute()` hands a coroutine to it and waits for the reply
with a timeout, so any thread (the collector, the TUI's control action, the
CLI) can call it. QMP events (MIGRATION, STOP, RESUME, ...) are gathered by a
listener task into a list that `drain_events()` empties.

The QEMU process id comes from SO_PEERCRED on the unix socket: it is the
process at the other end, whatever its command line says.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from typing import Any, NamedTuple

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError


class QmpError(RuntimeError):
    """A QMP socket could not be used or a command failed (one-line message)."""


class QmpEvent(NamedTuple):
    time: float  # unix seconds, QEMU's own timestamp
    name: str
    data: dict


def peer_pid(sock: socket.socket) -> int:
    """The pid at the other end of a connected unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


class QmpConnection:
    """One QMP monitor socket, usable from any thread."""

    def __init__(self, path: str, timeout: float = 5.0, name: str = "pctop") -> None:
        self.path = path
        self.timeout = timeout
        self.name = name
        self.pid: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp {path}", daemon=True)
        self._client: QMPClient | None = None
        self._events: list[QmpEvent] = []
        self._events_lock = threading.Lock()
        self._listener_task = None
        self._closed = False

    # ---- life cycle ---------------------------------------------------------------------------

    def connect(self) -> "QmpConnection":
        if not os.path.exists(self.path):
            raise QmpError(f"QMP socket {self.path} does not exist")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
            self.pid = peer_pid(sock)
        except OSError as e:
            sock.close()
            raise QmpError(f"cannot connect to QMP socket {self.path}: {e.strerror or e}") from None
        sock.setblocking(False)
        self._thread.start()
        try:
            self._run(self._connect(sock))
        except BaseException:
            self.close()
            raise
        return self

    async def _connect(self, sock: socket.socket) -> None:
        self._client = QMPClient(self.name)
        listener = EventListener()
        self._client.register_listener(listener)
        await self._client.connect(sock)
        self._listener_task = asyncio.ensure_future(self._gather(listener))

    async def _gather(self, listener: EventListener) -> None:
        async for ev in listener:
            ts = ev.get("timestamp", {})
            when = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
            with self._events_lock:
                self._events.append(QmpEvent(when, str(ev.get("event")), dict(ev.get("data", {}))))
                del self._events[:-1000]  # nobody drained: keep the newest

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            try:
                self._run(self._disconnect(), timeout=2.0)
            except QmpError:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=2.0)
        if not self._loop.is_running():
            self._loop.close()

    async def _disconnect(self) -> None:
        if self._listener_task is not None:
            self._listener_task.cancel()
            try:
                await self._listener_task
            except BaseException:  # cancelled, or QEMU went away first
                pass
        if self._client is not None:
            try:
                await self._client.disconnect()
            except Exception:  # QEMU exited: the connection's error is no news here
                pass

    def __enter__(self) -> "QmpConnection":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- commands -----------------------------------------------------------------------------

    def _run(self, coro, timeout: float | None = None):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout if timeout is not None else self.timeout)
        except TimeoutError:
            fut.cancel()
            raise QmpError(f"QEMU at {self.path} did not answer within {self.timeout:.0f} s") from None
        except ExecuteError as e:
            raise QmpError(f"QEMU refused: {e.error.error.desc}") from None
        except (QMPError, OSError, EOFError) as e:
            raise QmpError(f"QMP {self.path}: {type(e).__name__}: {e}") from None

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run one QMP command and return its `return` value."""
        if self._client is None or self._closed:
            raise QmpError(f"QMP {self.path} is not connected")

        async def call():
            return await self._client.execute(cmd, args)
        return self._run(call())

    def hmp(self, command_line: str) -> str:
        """A human monitor command (used to read guest memory with `xp`)."""
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def drain_events(self) -> list[QmpEvent]:
        with self._events_lock:
            out, self._events = self._events, []
        return out
