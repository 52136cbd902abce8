"""The engine's control socket: JSON Lines over a unix stream socket (mode 0600).

Contract (docs/engine-control.md): one JSON object per request line, exactly
one JSON object per reply line. {"cmd": "status"} returns the status object;
other commands reply {"type": "reply", "ok": ..., "cmd": ..., "error": ...}.
A thread per client keeps a slow client from blocking others or the engine.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from pctop.controls import Command
from pctop.hostpaths import RUN_DIR

MAX_LINE = 1 << 16


def default_path(pid: int | None = None, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, f"engine-{os.getpid() if pid is None else pid}.sock")


class ControlServer:
    def __init__(self, path: str, status: Callable[[], dict],
                 commands: dict[Command, Callable[[Any], None]]):
        self.path = path
        self._status = status
        self._commands = commands
        self._sock: socket.socket | None = None
        self._closing = False
        self._clients: list[socket.socket] = []

    def start(self, make_dir: bool = False) -> None:
        """make_dir: create the socket's folder (the default /run/pctop only: a path the
        user gave names a folder that must exist)."""
        d = os.path.dirname(self.path)
        if d and make_dir:
            os.makedirs(d, mode=0o755, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket of a dead run
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound and listening under a private name first, then renamed into place: a
        # client that sees the path (pctop finds /run/pctop/engine-*.sock by name) can
        # always connect; between bind() and listen() a connect is refused.
        staging = f"{self.path}.{os.getpid()}.tmp"
        old = os.umask(0o177)  # born 0600: no window where others can connect
        try:
            s.bind(staging)
        finally:
            os.umask(old)
        try:
            os.chmod(staging, 0o600)
            s.listen(8)
            os.rename(staging, self.path)
        except BaseException:
            s.close()
            try:
                os.unlink(staging)
            except OSError:
                pass
            raise
        self._sock = s
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="control-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rf:
            for line in rf:
                if len(line) > MAX_LINE:
                    reply = {"type": "reply", "ok": False, "cmd": None, "error": "request line too long"}
                elif not line.strip():
                    continue
                else:
                    reply = self.handle(line)
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    return

    def handle(self, line: bytes | str) -> dict:
        try:
            req = json.loads(line)
        except ValueError as e:
            return {"type": "reply", "ok": False, "cmd": None, "error": f"not JSON: {e}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"type": "reply", "ok": False, "cmd": None, "error": 'expected {"cmd": "..."}'}
        cmd = req["cmd"]
        if cmd == Command.STATUS:
            return self._status()
        fn = self._commands.get(Command(cmd)) if cmd in Command._value2member_map_ else None
        if fn is None:
            return {"type": "reply", "ok": False, "cmd": cmd, "error": f"unknown command {cmd!r}"}
        try:
            fn(req.get("arg"))
        except (ValueError, TypeError) as e:
            return {"type": "reply", "ok": False, "cmd": cmd, "error": str(e)}
        return {"type": "reply", "ok": True, "cmd": cmd}

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        for c in self._clients:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except OSError:
            pass
