"""Start a source and a destination QEMU on this host for a post-copy migration.

Both QEMUs run the same tiny guest (pctop.qemu.guest) from the same read-only
disk image (opened with snapshot=on), each with two QMP unix sockets in a
private folder: QEMU serves one client per QMP socket, so `<role>.qmp` is for
the watcher (pctop monitor --qmp) and `<role>-control.qmp` for whoever drives
the migration (the demo, the tests, `pctop qemu`). The destination
waits with `-incoming defer` so capabilities can be set before it listens.
Migration goes over TCP on 127.0.0.1.

Under PVM (KVM without VMX/SVM) `-cpu host` aborts; the default CPU model works, and
with `cpu="host"` we pass `host,-arch-capabilities`, which also works.
`QemuPair.stop()` (also on `with` exit) stops both processes and waits for them
(SIGTERM, then SIGKILL after a short grace: a destination QEMU in post-copy ignores
SIGTERM and spins); if pctop itself dies first, the kernel kills them
(PR_SET_PDEATHSIG with SIGKILL, for the same reason).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import NamedTuple

from pctop.qemu.guest import GuestImage, build_boot_sector, write_disk_image

QEMU_BINARY = "qemu-system-x86_64"
INSTALL_HINT = ("install it: `apt-get install qemu-system-x86` (Debian/Ubuntu), "
                "or run `make setup` (scripts/setup-system.sh installs it)")


class QemuUnavailable(RuntimeError):
    """QEMU (or the accelerator asked for) cannot run here; the message says how to fix it."""


def find_qemu() -> str | None:
    return shutil.which(QEMU_BINARY)


def qemu_unavailable_reason(accel: str = "tcg") -> str | None:
    """Why `pctop demo --vmm qemu --accel ACCEL` cannot run here, or None."""
    if find_qemu() is None:
        return f"{QEMU_BINARY} not found; {INSTALL_HINT}"
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "--accel kvm needs /dev/kvm, which is missing or not accessible (use --accel tcg)"
    return None


def default_accel() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class QemuConfig(NamedTuple):
    memory_mib: int = 64
    vcpus: int = 1
    accel: str = "kvm"          # "kvm" | "tcg"
    cpu: str | None = None      # None: QEMU's default model; "host" means host,-arch-capabilities
    name_threads: bool = True   # -name ...,debug-threads=on ("CPU 0/KVM"); pctop must not need it
    region_base: int = 1 << 20
    region_size: int = 16 << 20


class QemuProcess(NamedTuple):
    role: str                   # "source" | "destination"
    proc: subprocess.Popen
    qmp_path: str       # for the QMP source (pctop monitor --qmp)
    control_path: str   # for the driver (pctop qemu, the demo)
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 5) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-n:] if line.strip())
        except OSError:
            return ""


def qemu_argv(cfg: QemuConfig, role: str, qmp_paths: list[str], disk: str) -> list[str]:
    exe = find_qemu()
    if exe is None:
        raise QemuUnavailable(f"{QEMU_BINARY} not found; {INSTALL_HINT}")
    argv = [exe, "-machine", "pc", "-accel", cfg.accel, "-m", str(cfg.memory_mib), "-smp", str(cfg.vcpus),
            "-nodefaults", "-display", "none", "-no-user-config",
            # IDE, not floppy: SeaBIOS's floppy read gives up after a few seconds when the
            # host is busy (then waits 60 s to retry); its ATA polling waits far longer.
            # snapshot=on: both QEMUs read the one image and neither takes a write lock.
            "-drive", f"file={disk},format=raw,if=ide,snapshot=on", "-boot", "c"]
    for path in qmp_paths:
        argv += ["-qmp", f"unix:{path},server=on,wait=off"]
    if cfg.cpu:
        argv += ["-cpu", "host,-arch-capabilities" if cfg.cpu == "host" else cfg.cpu]
    name = f"pctop-{role}"
    argv += ["-name", f"{name},debug-threads=on" if cfg.name_threads else name]
    if role == "destination":
        argv += ["-incoming", "defer"]
    return argv


PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 2.0  # a QEMU that stops at all does so in well under a second


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started us exits (the
    disk is opened with snapshot=on, so there is nothing for QEMU to save)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _wait_for_socket(qp: QemuProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if qp.proc.poll() is not None:
            raise QemuUnavailable(f"{qp.role} QEMU exited with status {qp.proc.returncode}: {qp.log_tail()}")
        if os.path.exists(qp.qmp_path) and os.path.exists(qp.control_path):
            return
        time.sleep(0.02)
    raise QemuUnavailable(f"{qp.role} QEMU did not open its QMP socket within {timeout:.0f} s")


class QemuPair:
    """A source QEMU running the guest and a destination QEMU waiting for it."""

    def __init__(self, cfg: QemuConfig, workdir: str | None = None) -> None:
        self.cfg = cfg
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="pctop-qemu-")
        self.guest: GuestImage = build_boot_sector(cfg.region_base, cfg.region_size, cfg.vcpus)
        if cfg.region_base + cfg.region_size > cfg.memory_mib << 20:
            raise ValueError(f"guest region ends at {(cfg.region_base + cfg.region_size) >> 20} MiB, "
                             f"beyond the guest's {cfg.memory_mib} MiB")
        self.disk = os.path.join(self.workdir, "guest.img")
        self.source: QemuProcess | None = None
        self.destination: QemuProcess | None = None

    def start(self, timeout: float = 10.0) -> "QemuPair":
        write_disk_image(self.disk, self.guest)
        try:
            self.source = self._spawn("source")
            self.destination = self._spawn("destination")
            for qp in (self.source, self.destination):
                _wait_for_socket(qp, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, role: str) -> QemuProcess:
        qmp = os.path.join(self.workdir, f"{role}.qmp")
        ctl = os.path.join(self.workdir, f"{role}-control.qmp")
        log = os.path.join(self.workdir, f"{role}.log")
        with open(log, "wb") as logf:
            proc = subprocess.Popen(qemu_argv(self.cfg, role, [qmp, ctl], self.disk), stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        return QemuProcess(role, proc, qmp, ctl, log)

    def stop(self, grace: float = STOP_GRACE_S, log=None) -> None:
        """SIGTERM both; SIGKILL whichever still runs after `grace` seconds, and say so
        through `log` (a callable taking one line)."""
        running = [qp for qp in (self.destination, self.source) if qp is not None and qp.proc.poll() is None]
        for qp in running:
            qp.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for qp in running:
            try:
                qp.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                qp.proc.kill()
                qp.proc.wait(timeout=5)
                if log:
                    log(f"the {qp.role} QEMU (pid {qp.pid}) ignored SIGTERM for {grace:.0f} s; killed it")
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "QemuPair":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
