"""One post-copy migration, start to verified finish.

This process is the destination: it owns the guest memory (registered with
userfaultfd), runs the guest workload, installs pages, keeps the telemetry
and serves the control socket. The source is a child process
(`python -m pctop.engine.source`) joined by unix socketpairs: one or more
demand channels and one background channel.

The run ends when every page has arrived (then the vCPUs are stopped), or
when `duration` elapses (the vCPUs are stopped and the source is told to
stream everything left, unlimited). Then every page is verified.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pctop.engine import strategies
from pctop.engine.control import ControlServer, default_path
from pctop.engine.dest import Installer, pin, Receiver, UffdReader, VcpuExitHandler, VcpuMap
from pctop.engine.image import PageImage
from pctop.engine.integrity import IntegrityReport, verify
from pctop.engine.source import MAX_CHUNK_PAGES
from pctop.engine.telemetry import Telemetry, UffdGauge
from pctop.engine.transport import Channel
from pctop.engine.uffd import AnonMemory

PAGE_SIZE = 4096


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
    bandwidth: int = 0  # background bytes/s, 0 = unlimited
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
        self.state = "precopy"
        self.source_ended = threading.Event()
        self.source_ready = threading.Event()
        self.errors: list[str] = []
        self.background_state = "running" if cfg.background else "off"
        self.bandwidth_limit = cfg.bandwidth
        self.address_source = "uffd"
        self.workload = None
        self.report: IntegrityReport | None = None
        self._cleanup: list[Callable[[], None]] = []
        self._stop_fd = -1
        self._readers: list[UffdReader] = []

    # --- status (control socket, progress lines) ---
    def status(self) -> dict:
        c = self.tel.counters()
        if getattr(self, "vcpu_exit", None) is not None:
            # Live, so every progress line says where vcpu-exit addresses come from.
            self.address_source = ",".join(sorted(self.vcpu_exit.address_sources)) or "guest-assisted"
        d = {"type": "status", "ok": True, "pid": os.getpid(), "state": self.state,
             "strategy": self.cfg.strategy, "readers": len(self._readers),
             "vcpus": self.cfg.vcpus, "workload": getattr(self.workload, "kind", None),
             "address_source": self.address_source,
             "bandwidth_bps": round(self.tel.bandwidth_bps(), 1),
             "bandwidth_limit_bps": self.bandwidth_limit, "background": self.background_state}
        d.update(c)
        return d

    # --- control commands ---
    def _ctrl(self, msg: dict) -> None:
        self.bg.send_ctrl(msg)

    def cmd_pause(self, _arg) -> None:
        if self.background_state == "off":
            raise ValueError("the background stream is off (--no-background)")
        self._ctrl({"cmd": "pause"})
        self.background_state = "paused"
        if self.state == "postcopy":
            self.state = "paused"

    def cmd_resume(self, _arg) -> None:
        if self.background_state == "off":
            raise ValueError("the background stream is off (--no-background)")
        self._ctrl({"cmd": "resume"})
        self.background_state = "running"
        if self.state == "paused":
            self.state = "postcopy"

    def cmd_bandwidth(self, arg) -> None:
        if isinstance(arg, bool) or not isinstance(arg, (int, float)) or arg < 0:
            raise ValueError("bandwidth needs a number of bytes/s >= 0 (0 = unlimited)")
        self._ctrl({"cmd": "bandwidth", "arg": int(arg)})
        self.bandwidth_limit = int(arg)

    # --- set-up ---
    def _spawn_source(self, demand_channels: int) -> tuple[list[Channel], Channel]:
        cfg = self.cfg
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(demand_channels + 1)]
        child_fds = [b.fileno() for _, b in pairs]
        argv = [sys.executable, "-m", "pctop.engine.source", "--npages", str(self.npages),
                "--page-size", str(cfg.page_size), "--seed", str(cfg.seed),
                "--bandwidth", str(cfg.bandwidth), "--prefetch", str(cfg.prefetch),
                "--bg-fd", str(child_fds[-1])]
        for fd in child_fds[:-1]:
            argv += ["--demand-fd", str(fd)]
        if not cfg.background:
            argv.append("--no-background")
        cpus = [self._cpu_for(i) for i in range(demand_channels)]
        argv.append("--demand-cpus=" + ",".join(str(-1 if c is None else c) for c in cpus))
        self.source_proc = subprocess.Popen(argv, pass_fds=child_fds)
        self._cleanup.append(self._reap_source)
        for _, b in pairs:
            b.close()
        chans = [Channel(a, self.npages, cfg.page_size) for a, _ in pairs]
        for ch in chans:
            self._cleanup.append(ch.close)
        return chans[:-1], chans[-1]

    def _cpu_for(self, index: int) -> int | None:
        """The CPU of vCPU / shard / channel `index` when pinning, else None."""
        cpus = sorted(os.sched_getaffinity(0))
        if not self.cfg.pin or len(cpus) < 2:
            return None
        return cpus[index % len(cpus)]

    def _reap_source(self) -> None:
        p = self.source_proc
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def _on_source_ctrl(self, msg: dict) -> None:
        if msg.get("ready"):
            self.source_ready.set()

    def _on_error(self, e: BaseException) -> None:
        if self.state not in ("completed", "stopping"):
            self.errors.append(f"{type(e).__name__}: {e}")

    def _setup(self) -> None:
        cfg = self.cfg
        self.mem = AnonMemory(cfg.memory)
        self._cleanup.append(self.mem.close)
        self.layout = strategies.build(cfg.strategy, self.mem.addr, self.npages, cfg.page_size,
                                       cfg.vcpus, cfg.readers)
        for uf, _, _ in self.layout.shards:
            self._cleanup.append(uf.close)
            self.tel.uffds.append(UffdGauge(uf.fd))
        demand, self.bg = self._spawn_source(self.layout.demand_channels)
        self.installer = Installer(self.mem.addr, self.npages, cfg.page_size, self.layout.shards, self.tel)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._cleanup.append(lambda: os.close(self._stop_fd))
        self._threads: list[threading.Thread] = []
        bg_rx = Receiver("bg-receiver", self.bg, self.installer, MAX_CHUNK_PAGES, buffers=3,
                         on_ctrl=self._on_source_ctrl, on_end=self.source_ended.set, on_error=self._on_error)
        self._threads.append(bg_rx)
        self.vcpu_exit = None
        if self.layout.vcpu_exit:
            self.vcpu_exit = VcpuExitHandler(self.installer, demand)
            self._cleanup.append(self.vcpu_exit.close)
        else:
            for i, ch in enumerate(demand):
                self._threads.append(Receiver(f"demand-receiver{i}", ch, self.installer, 64,
                                              on_error=self._on_error, cpu=self._cpu_for(i),
                                              demand=True))
        self._demand = demand
        for t in self._threads:
            t.start()
        self._cleanup.append(lambda: [r.close() for r in self._threads if isinstance(r, Receiver)])

    def _start_readers(self, vmap: VcpuMap) -> None:
        for n, (shard, chan) in enumerate(self.layout.readers):
            uf = self.layout.shards[shard][0]
            r = UffdReader(f"uffd-reader{n}", uf, self.installer, self._demand[chan], vmap, self._stop_fd,
                           on_error=self._on_error, cpu=self._cpu_for(n))
            self._readers.append(r)
            r.start()

    def _start_control(self) -> ControlServer | None:
        path = default_path() if self.cfg.control is None else self.cfg.control
        if not path:
            return None
        srv = ControlServer(path, self.status, {"pause": self.cmd_pause, "resume": self.cmd_resume,
                                                "bandwidth": self.cmd_bandwidth})
        srv.start()
        self._cleanup.append(srv.close)
        self.control_path = path
        return srv

    # --- the run ---
    def run(self, on_tick: Callable[["Engine"], None] | None = None, tick_s: float = 1.0) -> dict:
        """Migrate, verify, and return the summary (see summary())."""
        cfg = self.cfg
        try:
            self._setup()
            self._start_control()
            self._wait_source_ready(120)
            wl = self.workload_cls(self.mem.addr, cfg.memory, cfg.vcpus, pattern=cfg.pattern,
                                   write_ratio=cfg.write_ratio, seed=cfg.seed, layout=cfg.layout,
                                   hot_fraction=cfg.hot_fraction, passes=cfg.passes, page_size=cfg.page_size)
            self.workload = wl
            self._cleanup.append(wl.stop)
            vmap = VcpuMap(wl.vcpu_tids, self.tel)
            if self.vcpu_exit is None:
                self._start_readers(vmap)
            self.state = "postcopy"
            self.tel.vcpu_started = time.monotonic()
            wl.start(on_memory_fault=self.vcpu_exit.on_memory_fault if self.vcpu_exit else None)
            vmap.refresh()
            for i, tid in enumerate(wl.vcpu_tids()):
                pin(self._cpu_for(i), tid)
            self._migrate(on_tick, tick_s)
            self.state = "stopping"
            self._stop_threads()
            self._verify()
            self.state = "completed" if self.report.ok and not self.errors else "failed"
            return self.summary()
        except BaseException:
            self.state = "failed"
            raise
        finally:
            self._teardown()

    def _wait_source_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.source_ready.wait(0.05):
            if self.source_proc.poll() is not None:
                raise EngineError(f"the source process exited with status {self.source_proc.returncode} "
                                  "before its image was ready")
            if time.monotonic() > deadline:
                raise EngineError(f"the source process did not build its image within {timeout_s:.0f} s")

    def _migrate(self, on_tick, tick_s: float) -> None:
        cfg, inst, wl = self.cfg, self.installer, self.workload
        t_end = None if cfg.duration is None else time.monotonic() + cfg.duration
        next_tick = time.monotonic() + tick_s
        pulled = False
        while not inst.all_present.wait(0.02):
            self.tel.sample_uffds()
            now = time.monotonic()
            if self.errors:
                raise EngineError(self.errors[0])
            if self.source_proc.poll() is not None:
                raise EngineError(f"the source process exited with status {self.source_proc.returncode}")
            guest_done = wl.wait(0)
            if not pulled and ((t_end is not None and now >= t_end) or guest_done):
                # Out of time, or the guest will touch nothing more: stop it, pull the rest.
                self._stop_vcpus()
                self.bg.send_ctrl({"cmd": "finish"})
                self.background_state = "running"
                pulled = True
            if on_tick and now >= next_tick:
                on_tick(self)
                next_tick = now + tick_s
        self._stop_vcpus()
        if self.vcpu_exit is not None:
            self.address_source = ",".join(sorted(self.vcpu_exit.address_sources)) or "guest-assisted"

    def _stop_vcpus(self) -> None:
        if self.tel.vcpu_stopped is None:
            self.workload.stop()
            self.tel.vcpu_stopped = time.monotonic()

    def _stop_threads(self) -> None:
        self.tel.sample_uffds()
        for r in self._readers:
            r.stopping = True
        os.eventfd_write(self._stop_fd, 1)
        for r in self._readers:
            r.join(5)
        for ch in self._demand + [self.bg]:
            ch.close()  # the source sees EOF and exits; receivers see EOF and return
        for t in self._threads:
            t.join(5)
        self._reap_source()

    def _verify(self) -> None:
        cfg = self.cfg
        if cfg.corrupt_page is not None:
            p = cfg.corrupt_page % self.npages
            # Flip one byte past the header, in a page the guest did not write.
            a = self.mem.addr + p * cfg.page_size + cfg.page_size - 1
            ctypes.memset(a, ctypes.c_ubyte.from_address(a).value ^ 0xFF, 1)
        dirty = set(self.workload.dirty_pages())
        if cfg.corrupt_page is not None:
            dirty.discard(cfg.corrupt_page % self.npages)
        image = PageImage(self.npages, cfg.page_size, cfg.seed)
        self.report = verify(self.mem.addr, image, dirty, self.installer.installs, self.installer.present)

    def _teardown(self) -> None:
        if self.state == "failed" and hasattr(self, "layout"):
            # Releasing the uffds first wakes every vCPU still blocked on a missing page
            # (the kernel maps a zero page), so stopping the workload cannot hang. The
            # readers must leave poll() first: a poll in progress keeps the uffd alive.
            for r in self._readers:
                r.stopping = True
            if self._stop_fd >= 0:
                os.eventfd_write(self._stop_fd, 1)
            for r in self._readers:
                r.join(2)
            for uf, _, _ in self.layout.shards:
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
        s = {"type": "summary", "ok": bool(r and r.ok and not self.errors), "state": self.state,
             "strategy": self.cfg.strategy, "vcpus": self.cfg.vcpus, "readers": len(self._readers),
             "workload": getattr(self.workload, "kind", None), "address_source": self.address_source,
             "pattern": self.cfg.pattern, "background": self.cfg.background,
             "pages_total": self.npages, "pages_verified": r.pages_verified if r else 0,
             "mismatches": r.mismatch_count if r else None,
             "mismatch_list": [list(m) for m in r.mismatches] if r else [],
             "faults_total": c["faults_total"],
             "faults_per_vcpu": [v["faults"] for v in c["per_vcpu"]],
             "stall_ns_per_vcpu": [v["stall_ns"] for v in c["per_vcpu"]],
             "faults_no_read": self.installer.faults_no_read,
             "pages_demand": c["pages_demand"], "pages_background": c["pages_background"],
             "pages_prefetch": c["pages_prefetch"], "eexist": c["eexist"],
             "bytes_received": c["bytes_received"], "fault_rate": c["fault_rate"],
             "vcpu_seconds": round(self.tel.vcpu_seconds(), 3), "elapsed_s": c["elapsed_s"],
             "per_vcpu": c["per_vcpu"], "reader_threads": c["reader_threads"], "uffds": c["uffds"],
             "errors": self.errors}
        return s
