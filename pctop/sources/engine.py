"""Client of the reference engine's control socket (docs: helpers' ENGINE_STATUS
contract; JSON Lines over a unix stream socket, one reply line per request).

Each interval it asks every engine for `status` and diffs the cumulative
counters into a Reading: per-vCPU faults/stall/histogram (threads), the vCPU
identities the engine knows (how="engine"), handler counters of the uffd when
the engine has exactly one (with several, reads and installs cannot be split
per fd, so they stay in the migration's `extra`), and the migration state.
`send(cmd, arg)` carries the controls (pause, resume, bandwidth) for the TUI.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import threading
from collections.abc import Iterable
from typing import Any

from pctop import rates
from pctop.controls import BASE_COMMANDS, Command
from pctop.hostpaths import RUN_DIR
from pctop.model import MigrationState
from pctop.sources.readings import (
    MigrationInfo,
    Reading,
    TargetInfo,
    ThreadFaults,
    UffdCounters,
    UffdDepth,
    VcpuIdentity,
)

DEFAULT_RUN_DIR = RUN_DIR
_SOCK_NAME = re.compile(r"^engine-(\d+)\.sock$")
_EXTRA_KEYS = ("strategy", "readers", "vcpus", "workload", "address_source", "background", "link",
               "bandwidth_limit_bps", "elapsed_s",
               "commands")  # control commands the engine takes, when it lists them (the TUI shows their keys)


class EngineUnreachable(RuntimeError):
    """The engine could not be reached or refused a request (one-line message)."""


class EngineConnection:
    """One engine's socket. Requests are serialised by a lock so the TUI's
    controls and the collector's status polls can share it."""

    def __init__(self, path: str, timeout: float = 2.0) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._rfile = None

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise EngineUnreachable(f"cannot connect to engine at {self.path}: {e.strerror or e}") from None
        self._sock, self._rfile = s, s.makefile("rb")

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._sock is None:
                self._connect()
            try:
                self._sock.sendall(json.dumps(obj).encode() + b"\n")
                line = self._rfile.readline()
            except OSError as e:
                self._close_locked()
                raise EngineUnreachable(f"engine at {self.path}: {e.strerror or e}") from None
            if not line:
                self._close_locked()
                raise EngineUnreachable(f"engine at {self.path} closed the connection")
            try:
                reply = json.loads(line)
            except ValueError:
                self._close_locked()
                raise EngineUnreachable(f"engine at {self.path} sent a line that is not JSON") from None
            if not isinstance(reply, dict):
                raise EngineUnreachable(f"engine at {self.path} sent {type(reply).__name__}, not an object")
            return reply

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._rfile.close()
                self._sock.close()
            finally:
                self._sock = self._rfile = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()


class _Prev:
    """Cumulative counters of the previous status of one engine."""

    def __init__(self) -> None:
        self.vcpu: dict[int, dict[str, Any]] = {}  # tid -> per_vcpu entry
        self.totals: dict[str, int] = {}


def status_to_reading(status: dict[str, Any], prev: _Prev, source: str = "engine") -> Reading:
    """Diff one status reply against the previous one (updates `prev`). The
    first status of an engine is the baseline: its deltas are zero, so a run
    that started long ago does not show as one huge interval."""
    pid = int(status["pid"])
    first = not prev.totals

    def delta(cur: int, old: int | None) -> int:
        return 0 if first else rates.counter_delta(cur, old)
    threads, identities = [], []
    for v in status.get("per_vcpu", ()):
        tid = int(v["tid"])
        old = prev.vcpu.get(tid, {})
        faults = delta(int(v.get("faults", 0)), old.get("faults"))
        stall = delta(int(v.get("stall_ns", 0)), old.get("stall_ns"))
        hist = (0,) * 24 if first else rates.hist_delta(tuple(v.get("hist", ())), old.get("hist"))
        cum_max = int(v.get("max_ns", 0))
        # The engine's max_ns is the longest stall since the run began: when it grew,
        # the new record fell in this interval; otherwise this interval's longest is
        # unknown (max_ns 0), not the old record.
        max_ns = cum_max if faults and cum_max > old.get("max_ns", 0) and not first else 0
        prev.vcpu[tid] = {"faults": int(v.get("faults", 0)), "stall_ns": int(v.get("stall_ns", 0)),
                          "hist": tuple(v.get("hist", ())), "max_ns": cum_max}
        threads.append(ThreadFaults(pid=pid, tid=tid, faults=faults, stall_ns=stall, queued_ns=0,
                                    service_ns=0, runq_ns=0, faults_no_read=0, max_ns=max_ns,
                                    hist=hist if len(hist) == 24 else (0,) * 24))
        identities.append(VcpuIdentity(pid, tid, int(v["vcpu"]), "engine"))

    cum = {"msgs": sum(int(r.get("msgs", 0)) for r in status.get("reader_threads", ())),
           "reads": sum(int(r.get("reads", 0)) for r in status.get("reader_threads", ())),
           "busy_ns": sum(int(r.get("busy_ns", 0)) for r in status.get("reader_threads", ())),
           "pages": int(status.get("pages_received", 0)),
           "bytes": int(status.get("bytes_received", 0)),
           "eexist": int(status.get("eexist", 0))}
    diff = {k: delta(v, prev.totals.get(k)) for k, v in cum.items()}
    prev.totals = cum

    uffds = list(status.get("uffds", ()))
    counters, depths = [], []
    for u in uffds:
        # One instantaneous reading; the procfs sampler's mean/max wins when present.
        p, t = int(u.get("pending", 0)), int(u.get("total", 0))
        depths.append(UffdDepth(pid, int(u["fd"]), float(p), p, float(t), t, 1, max(0, t - p)))
    if len(uffds) == 1:
        counters.append(UffdCounters(pid, int(uffds[0]["fd"]), msgs_read=diff["msgs"],
                                     read_calls=diff["reads"],
                                     pages_installed=diff["pages"], bytes_installed=diff["bytes"],
                                     eexist=diff["eexist"]))
    extra = {k: status[k] for k in _EXTRA_KEYS if k in status}
    extra.update(msgs_read=diff["msgs"], reader_busy_ns=diff["busy_ns"])
    mig = MigrationInfo(pid=pid, source=source, state=MigrationState.parse(status.get("state")),
                        pages_total=status.get("pages_total"), pages_received=status.get("pages_received"),
                        pages_demand=status.get("pages_demand"),
                        pages_background=status.get("pages_background"),
                        bandwidth_bps=status.get("bandwidth_bps"), extra=extra)
    return Reading(source=source, threads=tuple(threads), uffds=tuple(counters), depths=tuple(depths),
                   identities=tuple(identities), targets=(TargetInfo(pid, ""),), migrations=(mig,))


def find_engine_sockets(run_dir: str = DEFAULT_RUN_DIR, pids: Iterable[int] | None = None) -> list[str]:
    """Engine sockets in run_dir (engine-<pid>.sock), only those of `pids` if given."""
    want = None if pids is None else set(pids)
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "engine-*.sock"))):
        m = _SOCK_NAME.match(os.path.basename(path))
        if m and (want is None or int(m.group(1)) in want):
            out.append(path)
    return out


class EngineSource:
    """Polls `status` of every engine it knows, once per collect().

    sockets: explicit socket paths; with `discover` it also picks up
    run_dir/engine-<pid>.sock as engines appear (only those of `pids` if set).
    """

    name = "engine"

    def __init__(self, sockets: Iterable[str] = (), *, discover: bool = True,
                 run_dir: str = DEFAULT_RUN_DIR, pids: Iterable[int] | None = None,
                 timeout: float = 2.0) -> None:
        self.explicit = list(sockets)
        self.discover = discover
        self.run_dir = run_dir
        self.pids = None if pids is None else set(pids)
        self.timeout = timeout
        self._conns: dict[str, EngineConnection] = {}
        self._prev: dict[str, _Prev] = {}
        self._pid_of: dict[str, int] = {}  # socket path -> engine pid, once known
        self._failed: set[str] = set()  # paths that went away: not retried until they change

    def _paths(self) -> list[str]:
        found = find_engine_sockets(self.run_dir, self.pids) if self.discover else []
        return sorted(set(self.explicit) | set(found))

    def start(self) -> None:
        for path in self.explicit:  # a socket the user named must work now
            conn = EngineConnection(path, self.timeout)
            status = conn.request({"cmd": Command.STATUS})
            if not status.get("ok", False) or "pid" not in status:
                conn.close()
                raise EngineUnreachable(f"engine at {path} answered status with {status.get('error', status)}")
            status_to_reading(status, self._prev.setdefault(path, _Prev()), self.name)  # baseline
            self._conns[path] = conn

    def collect(self) -> Reading:
        threads, counters, depths, idents, targets, migs, gone, notes = [], [], [], [], [], [], [], []
        for path in self._paths():
            if path in self._failed:
                continue
            conn = self._conns.get(path)
            if conn is None:
                conn = self._conns[path] = EngineConnection(path, self.timeout)
            try:
                status = conn.request({"cmd": Command.STATUS})
                if not status.get("ok", False) or "pid" not in status:
                    raise EngineUnreachable(f"engine at {path} answered status with {status.get('error', status)}")
                r = status_to_reading(status, self._prev.setdefault(path, _Prev()), self.name)
            except (EngineUnreachable, KeyError, TypeError, ValueError) as e:
                conn.close()
                del self._conns[path]
                self._failed.add(path)
                self._prev.pop(path, None)
                pid = self._pid_of.pop(path, None)
                if pid is not None:
                    gone.append(pid)
                notes.append(f"lost engine {path}: {e}")
                continue
            if path not in self._pid_of:
                self._pid_of[path] = int(status["pid"])
                notes.append(f"engine pid {status['pid']} at {path}: strategy {status.get('strategy')}, "
                             f"{status.get('vcpus')} vCPUs, addresses from {status.get('address_source')}")
            threads += r.threads
            counters += r.uffds
            depths += r.depths
            idents += r.identities
            targets += r.targets
            migs += r.migrations
        self._failed &= set(self._paths())  # a socket that disappeared may come back
        return Reading(source=self.name, threads=tuple(threads), uffds=tuple(counters),
                       depths=tuple(depths), identities=tuple(idents), targets=tuple(targets),
                       migrations=tuple(migs), gone=tuple(gone), events=tuple(notes))

    def supports(self, cmd: Command) -> bool:
        """pctop.ui.feeds.Controls: the base commands; others only as the engine lists them
        in its status (Migration.commands)."""
        return cmd in BASE_COMMANDS

    def send(self, cmd: Command, arg: Any = None, pid: int | None = None) -> dict[str, Any]:
        """Send a control command to the engine of `pid` (or the only one)."""
        conns = {p: c for p, c in self._conns.items() if pid is None or self._pid_of.get(p) == pid}
        if len(conns) != 1:
            what = f"pid {pid}" if pid is not None else "an engine"
            raise EngineUnreachable(f"no single engine for {what} (connected: {len(self._conns)})")
        req: dict[str, Any] = {"cmd": cmd}
        if arg is not None:
            req["arg"] = arg
        return next(iter(conns.values())).request(req)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
