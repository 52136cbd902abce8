"""One post-copy migration, start to verified finish.

This process is the destination: it owns the guest memory (registered with
userfaultfd), runs the guest workload, installs pages, keeps the telemetry
and serves the control socket. The source is either a child process
(`python -m pctop.engine.page_server`, listening on a unix socket in a private
directory: what `pctop demo` does) or a `pctop engine source` anywhere on the
network (`connect`). Either way one or more demand channels and one background
channel, opened with the handshake of docs/protocol.md; a failed link pauses
the run and is recovered (pctop.engine.recovery).

The run ends when every page has arrived (then the vCPUs are stopped), or
when `duration` elapses (the vCPUs are stopped and the source is told to
stream everything left, unlimited). Then every page is verified.

The run's state moves only along pctop.engine.states.TRANSITIONS; what the run is
made of (memory, uffds, source, link) is built at once by Engine._build_parts, after
the control socket listens so that `status` answers while the source builds its image.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pctop.controls import ENGINE_COMMANDS, Command
from pctop.engine import strategies
from pctop.engine.control import ControlServer, default_path
from pctop.engine.dest import Installer, Receiver, UffdReader, VcpuExitHandler, VcpuMap, pin
from pctop.engine.image import PageImage
from pctop.engine.integrity import IntegrityReport, verify
from pctop.engine.link import DestLink, LinkError, parse_address
from pctop.engine.page_server import MAX_CHUNK_PAGES
from pctop.engine.recovery import Link
from pctop.engine.states import EngineStateError, RunState
from pctop.engine.telemetry import Telemetry, UffdGauge
from pctop.engine.transport import Channel, HandshakeRefused, LinkClosed, ProtocolError, config_digest
from pctop.engine.uffd import AnonMemory
from pctop.model import MigrationState as S

PAGE_SIZE = 4096
# Control commands this engine takes (listed in status so clients show what works).
COMMANDS = ENGINE_COMMANDS


class EngineError(Exception):
    """The run could not be set up or failed; the message says why, in one line."""


@dataclass
class EngineConfig:
    memory: int = 256 << 20
    vcpus: int = 2
    strategy: str = "uffd"
    readers: int = 1
    pattern: str = "random"
    write_ratio: float = 0.0
    bandwidth: int | None = 0  # background bytes/s, 0 = unlimited; None = the source's own (connect)
    background: bool = True
    prefetch: int = 0  # pages after each demand fault the stream sends first
    duration: float | None = None
    seed: int = 1
    control: str | None = None  # control socket path; None = default_path(); "" = none
    workload: str = "auto"  # auto | kvm | threads
    layout: str = "sharded"
    hot_fraction: float = 0.1
    passes: int | None = None
    page_size: int = PAGE_SIZE
    # Each vCPU and the threads serving its faults on one CPU (see dest.pin): faster on a
    # quiet machine, but a CPU-bound stranger on that CPU then delays every wake-up by
    # up to a scheduler tick (measured: 150 faults/s instead of 12k), so it is opt-in.
    pin: bool = False
    corrupt_page: int | None = None  # test hook: damage this page before verifying
    # The link (docs/protocol.md). connect: a `pctop engine source` address; None = start one here.
    connect: str | None = None
    token: bytes | None = None  # shared token, when the source requires one
    auto_recover: bool = False  # reconnect by itself after a link failure (else: `recover`)
    latency_us: int = 0  # added by the source to every demand reply
    link_timeout: float = 3.0  # no frame (data or heartbeat) this long: the link is down
    give_up_s: float = 5.0  # the source's address refuses connections this long: it is gone
    recover_timeout: float = 60.0  # the link down this long, for any reason: fail


class Workload(Protocol):
    """The guest the engine migrates (pctop.engine.workload: KvmWorkload, ThreadWorkload)."""

    kind: str

    def start(self, on_memory_fault: Any = None) -> None: ...

    def vcpu_tids(self) -> list[int]: ...

    def wait(self, timeout: float) -> bool: ...

    def stop(self) -> None: ...

    def dirty_pages(self) -> set[int]: ...


@runtime_checkable
class TimedWorkload(Protocol):
    """A workload that also times its vCPUs' stalls on its own clocks (KvmWorkload)."""

    stall_clock: str

    def stall_clocks(self) -> list: ...


@dataclass
class _Parts:
    """What one run is made of, built together by Engine._build_parts."""

    mem: AnonMemory
    layout: strategies.Layout
    installer: Installer
    link: Link
    vcpu_exit: VcpuExitHandler | None  # the vcpu-exit strategy: vCPUs fetch their own pages
    stop_fd: int  # an eventfd that tells the uffd readers to leave


def pick_workload(kind: str):
    """The workload class: KVM when /dev/kvm is present (or asked for), else threads."""
    from pctop.engine import workload as wl

    if kind == "kvm" or (kind == "auto" and os.path.exists("/dev/kvm")):
        return wl.KvmWorkload
    return wl.ThreadWorkload


class Engine:
    def __init__(self, cfg: EngineConfig, workload_cls=None, log: Callable[[str], None] | None = None):
        if cfg.memory % cfg.page_size or cfg.memory < cfg.page_size * cfg.vcpus:
            raise EngineError(f"memory must be a multiple of {cfg.page_size} with a page per vCPU")
        self.cfg = cfg
        self.npages = cfg.memory // cfg.page_size
        self.workload_cls = workload_cls or pick_workload(cfg.workload)
        self.log = log or (lambda s: None)
        self.tel = Telemetry(cfg.vcpus, self.npages, cfg.page_size)
        self._run = RunState()  # the link's threads move it too
        self.source_ended = threading.Event()
        self.source_ready = threading.Event()
        self.errors: list[str] = []
        self.background_state = "running" if cfg.background else "off"
        self.bandwidth_limit = cfg.bandwidth or 0
        self.latency_us = cfg.latency_us
        self.source_proc: subprocess.Popen | None = None
        self.failure: str | None = None
        self.address_source = "uffd"
        # Built by run(): the parts once the control socket listens, then the guest.
        self.parts: _Parts | None = None
        self.workload: Workload | None = None
        self.report: IntegrityReport | None = None
        self._cleanup: list[Callable[[], None]] = []
        self._readers: list[UffdReader] = []
        self._threads: list[threading.Thread] = []  # every epoch's receivers

    @property
    def state(self) -> S:
        return self._run.now

    def pages_arrived(self) -> int | None:
        """Pages at the destination so far; None before the run has set up."""
        return self.parts.installer.present_count if self.parts is not None else None

    # --- status (control socket, progress lines) ---
    def status(self) -> dict:
        c = self.tel.counters()
        p = self.parts
        if p is not None and p.vcpu_exit is not None:
            # Live, so every progress line says where vcpu-exit addresses come from.
            self.address_source = ",".join(sorted(p.vcpu_exit.address_sources)) or "guest-assisted"
        d = {"type": "status", "ok": True, "pid": os.getpid(), "state": self.state,
             "strategy": self.cfg.strategy, "readers": len(self._readers),
             "vcpus": self.cfg.vcpus, "workload": self.workload.kind if self.workload is not None else None,
             "address_source": self.address_source,
             "bandwidth_bps": round(self.tel.bandwidth_bps(), 1),
             "bandwidth_limit_bps": self.bandwidth_limit, "background": self.background_state}
        d.update(c)
        d.update(self._link_status())
        return d

    def _link_status(self) -> dict:
        p = self.parts
        if p is None:
            return {"commands": list(COMMANDS), "link": "down", "link_drops": 0, "recoveries": 0,
                    "link_error": None, "epoch": 0, "latency_us": self.latency_us,
                    "pages_missing": self.npages, "faults_waiting": 0}
        ln, inst = p.link, p.installer
        return {"commands": list(COMMANDS), "link": ln.state, "link_drops": ln.drops,
                "recoveries": ln.recoveries, "link_error": ln.error, "epoch": ln.epoch,
                "latency_us": self.latency_us, "pages_missing": self.npages - inst.present_count,
                "faults_waiting": inst.waiting_faults()}

    # --- control commands ---
    def _link(self) -> Link:
        if self.parts is None:
            raise ValueError("not connected to the source yet")
        return self.parts.link

    def _ctrl(self, msg: dict) -> None:
        self._link().send_ctrl(msg)

    def cmd_pause(self, _arg) -> None:
        if self.background_state == "off":
            raise ValueError("the background stream is off (--no-background)")
        # The migration goes on (demand faults are served), so its state stays; "paused"
        # means the link is down, as QEMU's postcopy-paused does.
        self._ctrl({"cmd": "pause"})
        self.background_state = "paused"

    def cmd_resume(self, _arg) -> None:
        if self.background_state == "off":
            raise ValueError("the background stream is off (--no-background)")
        self._ctrl({"cmd": "resume"})
        self.background_state = "running"

    def cmd_bandwidth(self, arg) -> None:
        if isinstance(arg, bool) or not isinstance(arg, (int, float)) or arg < 0:
            raise ValueError("bandwidth needs a number of bytes/s >= 0 (0 = unlimited)")
        self._ctrl({"cmd": "bandwidth", "arg": int(arg)})
        self.bandwidth_limit = int(arg)

    def cmd_latency(self, arg) -> None:
        if isinstance(arg, bool) or not isinstance(arg, int) or not 0 <= arg <= 10_000_000:
            raise ValueError("latency needs whole microseconds, 0..10000000")
        self._ctrl({"cmd": "latency", "arg": arg})
        self.latency_us = arg

    def cmd_drop_link(self, _arg) -> None:
        if self.parts is None or self.state not in (S.POSTCOPY, S.PAUSED):
            raise ValueError(f"no link to drop in state {self.state}")
        self.parts.link.drop()

    def cmd_recover(self, _arg) -> None:
        self._link().request_recover()

    # --- set-up ---
    def _source_address(self, demand_channels: int) -> str:
        """Where the source listens: cfg.connect, or a child started here on a unix socket."""
        cfg = self.cfg
        if cfg.connect:
            return cfg.connect
        tmp = tempfile.mkdtemp(prefix="pctop-engine-")
        self._cleanup.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
        argv = [sys.executable, "-m", "pctop.engine.page_server", "--npages", str(self.npages),
                "--page-size", str(cfg.page_size), "--seed", str(cfg.seed), "--listen", f"unix:{tmp}/source.sock",
                "--bandwidth", str(cfg.bandwidth or 0), "--prefetch", str(cfg.prefetch), "--wait", "30"]
        if not cfg.background:
            argv.append("--no-background")
        cpus = [self._cpu_for(i) for i in range(demand_channels)]
        argv.append("--demand-cpus=" + ",".join(str(-1 if c is None else c) for c in cpus))
        proc = self.source_proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        self._cleanup.append(self._reap_source)
        out = proc.stdout
        assert out is not None  # stdout=PIPE
        deadline = time.monotonic() + 120
        while not select.select([out], [], [], 0.1)[0]:
            if proc.poll() is not None:
                raise EngineError(f"the source process exited with status {proc.returncode} "
                                  "before its image was ready")
            if time.monotonic() > deadline:
                raise EngineError("the source process did not build its image within 120 s")
        line = out.readline()
        out.close()
        if not line:
            try:
                rc = proc.wait(5)
            except subprocess.TimeoutExpired:
                rc = None
            raise EngineError(f"the source process exited with status {rc} before it listened "
                              "(its own message, if any, is above)")
        try:
            return json.loads(line)["address"]
        except (ValueError, KeyError):
            raise EngineError(f"the source process said {line!r} instead of where it listens") from None

    def _cpu_for(self, index: int) -> int | None:
        """The CPU of vCPU / shard / channel `index` when pinning, else None."""
        cpus = sorted(os.sched_getaffinity(0))
        if not self.cfg.pin or len(cpus) < 2:
            return None
        return cpus[index % len(cpus)]

    def _reap_source(self) -> None:
        p = self.source_proc
        if p is None:
            return
        try:
            p.wait(timeout=0.1 if self.state is S.FAILED else 5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def _on_source_ctrl(self, msg: dict) -> None:
        if msg.get("ready"):
            self.source_ready.set()

    def _on_error(self, e: BaseException) -> None:
        if self.state not in (S.COMPLETED, S.STOPPING):
            self.errors.append(f"{type(e).__name__}: {e}")

    def _link_failed(self, epoch: int) -> Callable[[BaseException], None]:
        """on_error of an epoch's receivers: a broken link pauses the run (it can be
        recovered); a peer that breaks the protocol fails it."""
        def on_error(e: BaseException) -> None:
            if isinstance(e, ProtocolError) and not isinstance(e, LinkClosed):
                self._on_error(e)
            elif self.parts is not None:
                self.parts.link.lost(e, epoch)
        return on_error

    def _attach(self, demand: list[Channel], bg: Channel, epoch: int) -> Receiver:
        """Start the receivers of one epoch's channels; the background receiver is the
        one whose last frame time is the link's heartbeat."""
        p = self._built()
        lost = self._link_failed(epoch)
        closed = lambda: p.link.lost("the source closed the link", epoch)  # noqa: E731
        bg_rx = Receiver(f"bg-receiver{epoch}", bg, p.installer, MAX_CHUNK_PAGES, buffers=3,
                         on_ctrl=self._on_source_ctrl, on_end=self.source_ended.set, on_error=lost,
                         on_closed=closed)
        threads = [bg_rx]
        if not p.layout.vcpu_exit:
            for i, ch in enumerate(demand):
                threads.append(Receiver(f"demand-receiver{i}.{epoch}", ch, p.installer, 64, on_error=lost,
                                        on_closed=closed, cpu=self._cpu_for(i), demand=True))
        for t in threads:
            t.start()
        self._threads += threads
        return bg_rx

    def _after_recovery(self) -> None:
        p = self._built()
        if not p.layout.vcpu_exit:  # vCPUs of vcpu-exit ask again themselves
            p.link.waiting_requests(p.installer.waiting_pages())

    def _built(self) -> _Parts:
        if self.parts is None:
            raise EngineStateError("internal error: the run's parts are not built yet")
        return self.parts

    def _build_parts(self) -> _Parts:
        """The guest memory and its uffds, the source, the installer and the link (not yet
        connected). Each part is handed to _cleanup as it is made, so a failure half way
        leaves nothing behind (_teardown)."""
        cfg = self.cfg
        mem = AnonMemory(cfg.memory)
        self._cleanup.append(mem.close)
        layout = strategies.build(cfg.strategy, mem.addr, self.npages, cfg.page_size, cfg.vcpus, cfg.readers)
        for uf, _, _ in layout.shards:
            self._cleanup.append(uf.close)
            self.tel.uffds.append(UffdGauge(uf.fd))
        address = self._source_address(layout.demand_channels)
        installer = Installer(mem.addr, self.npages, cfg.page_size, layout.shards, self.tel)
        stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._cleanup.append(lambda: os.close(stop_fd))
        self._cleanup.append(self._close_receivers)
        try:
            dest = DestLink(parse_address(address), cfg.token, self.npages, cfg.page_size,
                            config_digest(self.npages, cfg.page_size, cfg.seed, 1), layout.demand_channels)
        except LinkError as e:
            raise EngineError(str(e)) from None
        link = Link(dest, layout.demand_channels, self._attach, lambda: installer.present,
                    self._after_recovery, self._run.follow_link, auto_recover=cfg.auto_recover,
                    link_timeout=cfg.link_timeout, give_up_s=cfg.give_up_s,
                    recover_timeout=cfg.recover_timeout, log=self.log)
        self._cleanup.append(lambda: link.close(stop_source=False))
        vcpu_exit = None
        if layout.vcpu_exit:
            vcpu_exit = VcpuExitHandler(installer, link.ports, link.up,
                                        failed=lambda: link.fatal is not None or self.state is S.FAILED)
            self._cleanup.append(vcpu_exit.close)
        return _Parts(mem, layout, installer, link, vcpu_exit, stop_fd)

    def _close_receivers(self) -> None:
        for t in self._threads:
            if isinstance(t, Receiver):
                t.close()

    def _connect(self, p: _Parts) -> None:
        """The first connection to the source, and this run's settings for it."""
        cfg = self.cfg
        try:
            settings = p.link.connect(timeout_s=cfg.give_up_s)
        except (HandshakeRefused, ConnectionError) as e:
            raise EngineError(str(e)) from None
        if cfg.bandwidth is not None:
            self._ctrl({"cmd": "bandwidth", "arg": cfg.bandwidth})
        else:
            self.bandwidth_limit = int(settings.get("bandwidth") or 0)
        if cfg.connect and not cfg.background:
            self._ctrl({"cmd": "background", "arg": False})
        elif cfg.connect and settings.get("background") is False:
            self.background_state = "off"
        if cfg.latency_us:
            self._ctrl({"cmd": "latency", "arg": cfg.latency_us})

    def _start_readers(self, p: _Parts, vmap: VcpuMap) -> None:
        for n, (shard, chan) in enumerate(p.layout.readers):
            uf = p.layout.shards[shard][0]
            r = UffdReader(f"uffd-reader{n}", uf, p.installer, p.link.ports[chan], vmap, p.stop_fd,
                           on_error=self._on_error, cpu=self._cpu_for(n), link_up=p.link.up)
            self._readers.append(r)
            r.start()

    def _start_control(self) -> ControlServer | None:
        path = default_path() if self.cfg.control is None else self.cfg.control
        if not path:
            return None
        srv = ControlServer(path, self.status, {
            Command.PAUSE: self.cmd_pause, Command.RESUME: self.cmd_resume, Command.BANDWIDTH: self.cmd_bandwidth,
            Command.LATENCY: self.cmd_latency, Command.DROP_LINK: self.cmd_drop_link, Command.RECOVER: self.cmd_recover})
        try:
            srv.start(make_dir=self.cfg.control is None)
        except OSError as e:
            raise EngineError(f"cannot open the control socket {path}: {e.strerror or e}") from None
        self._cleanup.append(srv.close)
        return srv

    # --- the run ---
    def run(self, on_tick: Callable[["Engine"], None] | None = None, tick_s: float = 1.0) -> dict:
        """Migrate, verify, and return the summary (see summary())."""
        cfg = self.cfg
        try:
            self._start_control()
            p = self.parts = self._build_parts()
            self._connect(p)
            self._wait_source_ready(p, 30)
            wl: Workload = self.workload_cls(p.mem.addr, cfg.memory, cfg.vcpus, pattern=cfg.pattern,
                                             write_ratio=cfg.write_ratio, seed=cfg.seed, layout=cfg.layout,
                                             hot_fraction=cfg.hot_fraction, passes=cfg.passes,
                                             page_size=cfg.page_size)
            self.workload = wl
            if isinstance(wl, TimedWorkload):
                self.tel.stall_clocks, self.tel.stall_clock = wl.stall_clocks, wl.stall_clock
            self._cleanup.append(wl.stop)
            vmap = VcpuMap(wl.vcpu_tids, self.tel)
            if p.vcpu_exit is None:
                self._start_readers(p, vmap)
            self._run.begin(lambda: p.link.state)
            self.tel.vcpu_started = time.monotonic()
            wl.start(on_memory_fault=p.vcpu_exit.on_memory_fault if p.vcpu_exit else None)
            vmap.refresh()
            for i, tid in enumerate(wl.vcpu_tids()):
                pin(self._cpu_for(i), tid)
            self._migrate(p, wl, on_tick, tick_s)
            self._run.go(S.STOPPING)
            self._stop_threads(p)
            self.report = self._verify(p, wl)
            self._run.go(S.COMPLETED if self.report.ok and not self.errors else S.FAILED)
            return self.summary()
        except BaseException as e:
            self.failure = self.failure or str(e) or type(e).__name__
            self._run.fail()
            self.log(f"state failed: {self.failure}")
            raise
        finally:
            self._teardown()

    def _wait_source_ready(self, p: _Parts, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.source_ready.wait(0.05):
            if p.link.fatal:
                raise EngineError(p.link.fatal)
            if self.source_proc is not None and self.source_proc.poll() is not None:
                raise EngineError(f"the source process exited with status {self.source_proc.returncode} "
                                  "before its image was ready")
            if time.monotonic() > deadline:
                raise EngineError(f"the source process did not build its image within {timeout_s:.0f} s")

    def _migrate(self, p: _Parts, wl: Workload, on_tick, tick_s: float) -> None:
        cfg, inst = self.cfg, p.installer
        t_end = None if cfg.duration is None else time.monotonic() + cfg.duration
        next_tick = time.monotonic() + tick_s
        pulled = False
        while not inst.all_present.wait(0.02):
            self.tel.sample_uffds()
            now = time.monotonic()
            if self.errors:
                raise EngineError(self.errors[0])
            if self.source_proc is not None and self.source_proc.poll() is not None:
                raise EngineError(self._failure_message(
                    p, f"the source is gone: the source process exited with status {self.source_proc.returncode}"))
            p.link.check(now)
            if p.link.fatal:
                raise EngineError(self._failure_message(p, p.link.fatal))
            guest_done = wl.wait(0)
            if not pulled and ((t_end is not None and now >= t_end) or guest_done):
                # Out of time, or the guest will touch nothing more: stop it, pull the rest.
                self._stop_vcpus(wl)
                p.link.send_ctrl({"cmd": "finish"})
                self.background_state = "running"
                pulled = True
            if on_tick and now >= next_tick:
                on_tick(self)
                next_tick = now + tick_s
        self._stop_vcpus(wl)
        if p.vcpu_exit is not None:
            self.address_source = ",".join(sorted(p.vcpu_exit.address_sources)) or "guest-assisted"

    def _failure_message(self, p: _Parts, why: str) -> str:
        """Why the run fails and what never arrived (the guest's loss had it been real)."""
        missing = self.npages - p.installer.present_count
        waiting = p.installer.waiting_faults()
        self.failure = (f"{why}; {missing} of {self.npages} pages never arrived, "
                        f"{waiting} vCPU faults were waiting; vCPUs stopped")
        return self.failure

    def _stop_vcpus(self, wl: Workload) -> None:
        if self.tel.vcpu_stopped is None:
            wl.stop()
            self.tel.vcpu_stopped = time.monotonic()

    def _stop_threads(self, p: _Parts) -> None:
        self.tel.sample_uffds()
        for r in self._readers:
            r.stopping = True
        os.eventfd_write(p.stop_fd, 1)
        for r in self._readers:
            r.join(5)
        p.link.close(stop_source=True)  # the source exits; receivers see EOF and return
        for t in self._threads:
            t.join(5)
        if self.source_proc is not None:
            self._reap_source()

    def _verify(self, p: _Parts, wl: Workload) -> IntegrityReport:
        cfg = self.cfg
        if cfg.corrupt_page is not None:
            page = cfg.corrupt_page % self.npages
            # Flip one byte past the header, in a page the guest did not write.
            a = p.mem.addr + page * cfg.page_size + cfg.page_size - 1
            ctypes.memset(a, ctypes.c_ubyte.from_address(a).value ^ 0xFF, 1)
        dirty = set(wl.dirty_pages())
        if cfg.corrupt_page is not None:
            dirty.discard(cfg.corrupt_page % self.npages)
        image = PageImage(self.npages, cfg.page_size, cfg.seed)
        return verify(p.mem.addr, image, dirty, p.installer.installs, p.installer.present)

    def _teardown(self) -> None:
        p = self.parts
        if self.state is S.FAILED and p is not None:
            # Releasing the uffds first wakes every vCPU still blocked on a missing page
            # (the kernel maps a zero page), so stopping the workload cannot hang. The
            # readers must leave poll() first: a poll in progress keeps the uffd alive.
            for r in self._readers:
                r.stopping = True
            os.eventfd_write(p.stop_fd, 1)
            for r in self._readers:
                r.join(2)
            for uf, _, _ in p.layout.shards:
                uf.close()
        for fn in reversed(self._cleanup):
            try:
                fn()
            except Exception:
                pass
        self._cleanup.clear()

    def summary(self) -> dict:
        c = self.tel.counters()
        r = self.report
        p = self._built()
        s = {"type": "summary", "ok": bool(r and r.ok and not self.errors), "state": self.state,
             "strategy": self.cfg.strategy, "vcpus": self.cfg.vcpus, "readers": len(self._readers),
             "workload": self.workload.kind if self.workload is not None else None,
             "address_source": self.address_source,
             "pattern": self.cfg.pattern, "background": self.cfg.background,
             "pages_total": self.npages, "pages_verified": r.pages_verified if r else 0,
             "mismatches": r.mismatch_count if r else None,
             "mismatch_list": [list(m) for m in r.mismatches] if r else [],
             "faults_total": c["faults_total"],
             "faults_per_vcpu": [v["faults"] for v in c["per_vcpu"]],
             "stall_ns_per_vcpu": [v["stall_ns"] for v in c["per_vcpu"]],
             "stall_clock": c["stall_clock"],
             "faults_no_read": p.installer.faults_no_read,
             "pages_demand": c["pages_demand"], "pages_background": c["pages_background"],
             "pages_prefetch": c["pages_prefetch"], "eexist": c["eexist"],
             "bytes_received": c["bytes_received"], "fault_rate": c["fault_rate"],
             "vcpu_seconds": round(self.tel.vcpu_seconds(), 3), "elapsed_s": c["elapsed_s"],
             "per_vcpu": c["per_vcpu"], "reader_threads": c["reader_threads"], "uffds": c["uffds"],
             "errors": self.errors,
             "link_drops": p.link.drops, "recoveries": p.link.recoveries, "failure": self.failure,
             "stall_us_p50": self.tel.stall_percentile_us(0.5),
             "stall_us_p99": self.tel.stall_percentile_us(0.99)}
        return s
