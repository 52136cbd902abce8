"""One real QEMU post-copy migration on this host, step by step.

Used by `pctop demo --vmm qemu` and by the tests. The steps:

1. boot:     start both QEMUs (pctop.qemu.launch); wait until the guest on the
             source runs (its mailbox has the magic and a pass count);
2. prepare:  post-copy capabilities on both ends (blocktime on the destination),
             pre-copy bandwidth, max-postcopy-bandwidth, a 1 ms downtime limit
             (so pre-copy never converges on its own: the guest rewrites its
             region far faster than the link can send it), destination listens;
3. precopy:  `migrate`; wait for at least one whole pass over RAM;
4. postcopy: `migrate-start-postcopy`; the guest resumes on the destination
             and faults on every page of its region not yet sent;
5. done:     the migration completes; the guest keeps running on the destination.

The driver talks to each QEMU on its control socket, so a watcher (the QMP
source) can hold the other one.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

from pctop.qemu import control
from pctop.qemu.guest import MAGIC, MAILBOX_GPA, MB_MAGIC, MB_PASSES
from pctop.qemu.launch import QemuConfig, QemuPair
from pctop.qemu.qmp import QmpConnection, QmpError

MIB = 1 << 20


class MigrationSettings(NamedTuple):
    accel: str = "kvm"
    memory_mib: int = 64
    vcpus: int = 1
    region_mib: int = 8              # guest memory the guest keeps writing (post-copy moves it)
    precopy_bandwidth: int = 32 * MIB
    postcopy_bandwidth: int = 2 * MIB  # max-postcopy-bandwidth: with 8 MiB dirty, about 4 s
    cpu: str | None = None
    name_threads: bool = True


class PhaseTimes(NamedTuple):
    booted_s: float = 0.0
    precopy_s: float = 0.0       # migrate issued -> post-copy asked
    postcopy_s: float = 0.0      # post-copy asked -> completed


class QemuMigration:
    """Two QEMUs and the steps that migrate the guest from one to the other."""

    def __init__(self, settings: MigrationSettings, workdir: str | None = None) -> None:
        self.settings = settings
        cfg = QemuConfig(memory_mib=settings.memory_mib, vcpus=settings.vcpus, accel=settings.accel, cpu=settings.cpu,
                         name_threads=settings.name_threads, region_size=settings.region_mib * MIB)
        self.pair = QemuPair(cfg, workdir)
        self.src: QmpConnection | None = None
        self.dst: QmpConnection | None = None
        self.uri = ""
        self.times = PhaseTimes()
        self._t0 = 0.0

    @property
    def guest(self):
        return self.pair.guest

    # ---- steps ----------------------------------------------------------------------------------

    def boot(self, timeout: float = 90.0) -> None:
        """Start both QEMUs and wait for the guest to run on the source. SeaBIOS takes a
        few seconds under PVM, where it is emulated instruction by instruction."""
        self._t0 = time.monotonic()
        self.pair.start()
        try:
            self.src = QmpConnection(self.pair.source.control_path).connect()
            self.dst = QmpConnection(self.pair.destination.control_path).connect()
            self.wait_guest(self.src, 1, timeout)
        except BaseException:
            self.close()
            raise
        self.times = self.times._replace(booted_s=time.monotonic() - self._t0)

    def prepare(self) -> None:
        s = self.settings
        control.enable_postcopy(self.src, destination=False)
        control.enable_postcopy(self.dst, destination=True)
        for conn in (self.src, self.dst):
            control.set_capabilities(conn, events=True)
        control.set_bandwidth(self.src, s.precopy_bandwidth, postcopy=False)
        control.set_bandwidth(self.src, s.postcopy_bandwidth, postcopy=True)
        self.src.execute("migrate-set-parameters", {"downtime-limit": 1})
        self.uri = control.local_uri()
        control.listen(self.dst, self.uri)

    def start_precopy(self) -> None:
        control.start_migration(self.src, self.uri)
        self._t_precopy = time.monotonic()

    def wait_precopy_pass(self, timeout: float = 60.0, syncs: int = 2) -> dict:
        """Until pre-copy has sent all of RAM once (QEMU synced the dirty bitmap `syncs` times)."""
        deadline = time.monotonic() + timeout
        while True:
            info = control.query(self.src)
            if info.get("ram", {}).get("dirty-sync-count", 0) >= syncs:
                return info
            if info.get("status") in control.ENDED:
                raise QmpError(f"migration {info.get('status')} during pre-copy: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise QmpError(f"pre-copy did not finish a pass within {timeout:.0f} s")
            time.sleep(0.05)

    def switch_to_postcopy(self, timeout: float = 30.0) -> None:
        t = time.monotonic()
        control.start_postcopy(self.src)
        self._t_postcopy = t
        self.times = self.times._replace(precopy_s=t - self._t_precopy)
        info = control.wait_status(self.dst, ("postcopy-active", "completed"), timeout)
        if info.get("status") == "completed" and not control.query(self.src).get("ram", {}).get("postcopy-bytes"):
            # Pre-copy converged before the switch (a region that fits QEMU's first
            # 100 ms burst): nothing was moved by post-copy.
            raise QmpError("the migration completed in pre-copy, before post-copy began")

    def wait_completed(self, timeout: float = 120.0) -> dict:
        """Until both ends say completed; returns the source's last query-migrate."""
        info = control.wait_status(self.src, ("completed",), timeout)
        control.wait_status(self.dst, ("completed",), timeout)
        self.times = self.times._replace(postcopy_s=time.monotonic() - self._t_postcopy)
        return info

    def run(self, on_step: Callable[[str], None] | None = None, precopy_s: float = 0.0) -> dict:
        """prepare -> precopy (at least one pass, and `precopy_s`) -> postcopy -> completed."""
        say = on_step or (lambda _: None)
        say("prepare: post-copy capabilities, bandwidth caps, destination listening")
        self.prepare()
        say(f"pre-copy: migrate to {self.uri}")
        self.start_precopy()
        self.wait_precopy_pass()
        time.sleep(max(0.0, precopy_s - (time.monotonic() - self._t_precopy)))
        say("post-copy: migrate-start-postcopy")
        self.switch_to_postcopy()
        info = self.wait_completed()
        say(f"completed: post-copy took {self.times.postcopy_s:.1f} s")
        return info

    # ---- the guest ------------------------------------------------------------------------------

    def guest_passes(self, conn: QmpConnection, vcpu: int = 0) -> int:
        """How many times this vCPU has written all of its part of the region."""
        return control.read_guest_u32(conn, MAILBOX_GPA + MB_PASSES + 4 * vcpu)

    def wait_guest(self, conn: QmpConnection, passes: int, timeout: float) -> None:
        """Until every vCPU has done `passes` passes."""
        magic = int.from_bytes(MAGIC, "little")
        deadline = time.monotonic() + timeout
        while True:
            if (control.read_guest_u32(conn, MAILBOX_GPA + MB_MAGIC) == magic
                    and all(self.guest_passes(conn, i) >= passes for i in range(self.settings.vcpus))):
                return
            if time.monotonic() > deadline:
                raise QmpError(f"the guest did not start within {timeout:.0f} s "
                               f"(source log: {self.pair.source.log_tail()})")
            time.sleep(0.1)

    def close(self, log=None) -> None:
        """Disconnect and stop both QEMUs; `log` hears of any that had to be killed."""
        for conn in (self.src, self.dst):
            if conn is not None:
                conn.close()
        self.pair.stop(log=log)

    def __enter__(self) -> "QemuMigration":
        self.boot()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
