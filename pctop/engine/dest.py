"""The destination's moving parts: installing pages, reading faults, receiving frames.

Demand path for the uffd strategies (the fastest honest design measured, see
bench/RESULTS.md): a reader thread reads a batch of uffd messages in one
read(), notes each fault (time seen, vCPU from uffd_msg.ptid) and sends ONE
request frame for the batch; it never waits for the reply. A receiver thread
per channel receives each PAGES frame straight into a fixed buffer
(recv_into) and UFFDIO_COPYs from that buffer's address into guest memory,
which wakes the faulting vCPU. No Python object is made per page on the
background path; a demand page costs one small tuple for its waiter.

The stall a fault reports is "fault seen -> page installed": seen is when a
reader read the message (uffd strategies) or when KVM_RUN returned to the
vCPU thread (vcpu-exit). A fault whose page the stream installed before any
reader got to its message counts as a fault with a zero stall and in
`faults_no_read`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import select
import threading
import time
from bisect import bisect_right
from collections.abc import Callable

from pctop.engine.telemetry import Telemetry
from pctop.engine.transport import (
    KIND_BACKGROUND,
    KIND_DEMAND,
    KIND_PREFETCH,
    T_CTRL,
    T_END,
    T_PAGES,
    T_PING,
    Channel,
    Frame,
    LinkClosed,
    ProtocolError,
)
from pctop.engine.uffd import UFFD_EVENT_PAGEFAULT, UFFD_MSG, AnonMemory, Uffd, UffdError

_monotonic_ns = time.monotonic_ns


def pin(cpu: int | None, tid: int = 0) -> None:
    """Pin a thread (0 = the calling one) to one CPU. The engine keeps each vCPU and the
    threads that serve its faults on one CPU: the vCPU sleeps while they work, and a
    same-CPU wake-up costs a tenth of a cross-CPU one on the project's 2-CPU test VMs (about 4.5 vs 42 us)."""
    if cpu is not None:
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError:
            pass  # the thread is gone or the CPU is not ours: run unpinned


class Installer:
    """Installs pages into guest memory through the uffd covering them, tracks
    which pages are present and which faults wait for which page."""

    def __init__(self, base: int, npages: int, page_size: int, shards: list[tuple[Uffd, int, int]],
                 telemetry: Telemetry):
        self.base = base
        self.npages = npages
        self.page_size = page_size
        self.shards = shards
        self.tel = telemetry
        self.present = bytearray(npages)
        self.present_count = 0
        self.installs = 0  # pages UFFDIO_COPY reported as copied (each page must be exactly once)
        self.faults_no_read = 0
        self._waiters: dict[int, list[tuple[int, int]]] = {}
        self._lock = telemetry.lock  # one lock for page state and counters: one acquire per page
        self._shard_starts = [lo for _, lo, _ in shards]
        self.all_present = threading.Event()

    def note_fault(self, page: int, vcpu: int, seen_ns: int) -> bool:
        """Record a fault; True if its page must be requested (first waiter, not present)."""
        with self._lock:
            if self.present[page]:
                self.faults_no_read += 1
                resolved = True
            else:
                w = self._waiters.get(page)
                if w is None:
                    self._waiters[page] = [(seen_ns, vcpu)]
                    return True
                w.append((seen_ns, vcpu))
                return False
        if resolved:
            self.tel.stall(vcpu, 0)
        return False

    def waiting_pages(self) -> list[int]:
        """Pages some fault waits for (requested, not installed yet): after a link
        failure each is requested again, since its request or reply may be lost."""
        with self._lock:
            return [p for p in self._waiters if not self.present[p]]

    def waiting_faults(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._waiters.values())

    def install_page(self, kind: int, page: int, src: int) -> int:
        """The demand path: one page from address src; 1 if installed, 0 if it was
        already present (EEXIST race). Page state, waiters and counters in one lock."""
        ps = self.page_size
        shards = self.shards
        uf = shards[0][0] if len(shards) == 1 else shards[bisect_right(self._shard_starts, page) - 1][0]
        called = _monotonic_ns()
        r = uf.copy(self.base + page * ps, src, ps)
        if r == ps:
            ok = 1
        elif r == -errno.EEXIST:
            ok = 0
        else:
            raise UffdError(-r, f"UFFDIO_COPY page {page}: {os.strerror(-r)}")
        now = _monotonic_ns()
        tel = self.tel
        with self._lock:
            if not self.present[page]:
                self.present[page] = 1
                self.present_count += 1
            self.installs += ok
            if kind == KIND_DEMAND:
                tel.pages_demand += ok
            else:
                tel.pages_background += ok
                tel.pages_prefetch += ok if kind == KIND_PREFETCH else 0
            tel.eexist += 1 - ok
            w = self._waiters.pop(page, None) if self._waiters else None
            if w:
                for seen, vcpu in w:
                    tel.stall_locked(vcpu, now - seen, called - seen if ok else None)
            done = self.present_count >= self.npages
        if done:
            self.all_present.set()
        return ok

    def install(self, kind: int, start: int, count: int, src: int) -> tuple[int, int]:
        """Copy pages [start, start+count) from address src; returns (installed, eexist)."""
        ps = self.page_size
        installed = eexist = 0
        p = start
        end = start + count
        called = _monotonic_ns()
        for uf, lo, hi in self.shards:
            if p >= end:
                break
            if p >= hi or lo >= end:
                continue
            n = min(end, hi) - p
            dst, s = self.base + p * ps, src + (p - start) * ps
            if n == 1:
                r = uf.copy(dst, s, ps)
                if r == ps:
                    installed += 1
                elif r == -errno.EEXIST:
                    eexist += 1
                else:
                    raise UffdError(-r, f"UFFDIO_COPY page {p}: {os.strerror(-r)}")
            else:
                done, skipped = uf.copy_range(dst, s, n * ps, ps)
                installed += done // ps
                eexist += skipped
            p += n
        resolved = None
        with self._lock:
            fresh = count - self.present[start:end].count(1)
            self.present[start:end] = b"\x01" * count
            self.present_count += fresh
            self.installs += installed
            if self._waiters:
                if count == 1:
                    w = self._waiters.pop(start, None)
                    resolved = w
                else:
                    resolved = []
                    for q in [q for q in self._waiters if start <= q < end]:
                        resolved += self._waiters.pop(q)
        if resolved:
            now = _monotonic_ns()
            for seen, vcpu in resolved:
                self.tel.stall(vcpu, now - seen, None if eexist else called - seen)
        self.tel.installed(installed if kind == KIND_DEMAND else 0,
                           installed if kind == KIND_BACKGROUND else 0,
                           installed if kind == KIND_PREFETCH else 0, eexist)
        if self.present_count >= self.npages:
            self.all_present.set()
        return installed, eexist


class FrameBuffer:
    """A page-aligned receive buffer known by address (UFFDIO_COPY's source)."""

    def __init__(self, size: int):
        self.mem = AnonMemory(size)
        ctypes.memset(self.mem.addr, 0, size)  # fault it in now, not during a copy
        self.addr = self.mem.addr
        self.size = size
        self.view = memoryview((ctypes.c_char * size).from_address(self.addr)).cast("B")

    def close(self) -> None:
        self.view.release()
        self.mem.close()


class Receiver(threading.Thread):
    """Receives frames on one channel and installs the pages they carry.

    demand: the channel carries single-page frames only; one recvmsg each.
    buffers > 1 (the background stream): receiving and installing overlap. This
    thread receives into one buffer while an installer thread UFFDIO_COPYs from
    another, so the socket copy hides behind the page copy (both calls release
    the GIL) instead of adding to it."""

    def __init__(self, name: str, ch: Channel, installer: Installer, max_pages: int,
                 on_ctrl: Callable[[dict], None] | None = None, on_end: Callable[[], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, cpu: int | None = None,
                 demand: bool = False, buffers: int = 1, on_closed: Callable[[], None] | None = None):
        super().__init__(name=name, daemon=True)
        self.on_closed = on_closed  # the peer closed the link (end of stream)
        self.last_rx = time.monotonic()  # any frame, heartbeats included: the link is alive
        self.cpu = cpu
        self.demand = demand
        self.ch = ch
        self.installer = installer
        self.bufs = [FrameBuffer(max_pages * installer.page_size) for _ in range(buffers)]
        self.on_ctrl = on_ctrl
        self.on_end = on_end
        self.on_error = on_error

    def close(self) -> None:
        for b in self.bufs:
            b.close()

    def run(self) -> None:
        pin(self.cpu)
        try:
            if self.demand:
                self._run_demand()
            elif len(self.bufs) > 1:
                self._run_pipelined()
            else:
                buf, inst = self.bufs[0], self.installer
                while (f := self._next_pages(buf)) is not None:
                    inst.install(f.kind, f.start, f.count, buf.addr)
        except (OSError, ProtocolError) as e:
            if self.on_error:
                self.on_error(e)
            return
        if self.on_closed:
            self.on_closed()

    def _run_demand(self) -> None:
        ch, buf, inst = self.ch, self.bufs[0], self.installer
        while True:
            f = ch.recv_demand_page(buf.view)
            if f is None:
                return
            self.last_rx = time.monotonic()
            inst.install_page(f.kind, f.start, buf.addr)

    def _next_pages(self, buf: FrameBuffer) -> Frame | None:
        """The next PAGES frame, its pages received into buf; control and end frames
        on the way are handled here. None at EOF."""
        ch = self.ch
        while True:
            f = ch.recv_frame()
            if f is None:
                return None
            self.last_rx = time.monotonic()
            if f.type == T_PAGES:
                if f.length > buf.size:
                    raise ProtocolError(f"PAGES frame of {f.length} bytes, at most {buf.size} fit")
                ch.recv_payload_into(buf.view, f.length)
                return f
            elif f.type == T_PING:
                continue
            elif f.type == T_END:
                if self.on_end:
                    self.on_end()
            elif f.type == T_CTRL:
                msg = ch.recv_ctrl(f)
                if self.on_ctrl:
                    self.on_ctrl(msg)
            else:
                raise ProtocolError(f"destination got frame type {f.type}")

    def _run_pipelined(self) -> None:
        free: queue.Queue = queue.Queue()
        full: queue.Queue = queue.Queue()
        for b in self.bufs:
            free.put(b)
        errors: list[BaseException] = []

        def install_loop() -> None:
            inst = self.installer
            try:
                while True:
                    item = full.get()
                    if item is None:
                        return
                    f, b = item
                    inst.install(f.kind, f.start, f.count, b.addr)
                    free.put(b)
            except (OSError, ProtocolError) as e:
                errors.append(e)
                free.put(None)

        t = threading.Thread(target=install_loop, name=self.name + "-install", daemon=True)
        t.start()
        try:
            while True:
                buf = free.get()
                if buf is None:
                    raise errors[0]
                f = self._next_pages(buf)
                if f is None:
                    return
                full.put((f, buf))
        finally:
            full.put(None)
            t.join()


class VcpuMap:
    """uffd_msg.ptid -> vCPU index, from the workload's vcpu_tids(). A tid not
    known yet triggers a refresh (vCPU threads start while faults arrive); once
    every vCPU has a tid, an unknown tid is remembered as not a vCPU."""

    def __init__(self, vcpu_tids: Callable[[], list[int]], telemetry: Telemetry):
        self._source = vcpu_tids
        self._tel = telemetry
        self._map: dict[int, int] = {}
        self._complete = False

    def refresh(self) -> None:
        tids = list(self._source() or [])
        self._map = {tid: i for i, tid in enumerate(tids) if tid}
        self._complete = bool(tids) and all(tids)
        for i, tid in enumerate(tids[:len(self._tel.vcpus)]):
            self._tel.vcpus[i].tid = tid or 0

    def get(self, tid: int) -> int:
        v = self._map.get(tid)
        if v is None:
            if self._complete:
                return -1
            self.refresh()
            v = self._map.get(tid)
            if v is None:
                if self._complete:
                    self._map[tid] = -1  # not a vCPU: do not refresh for it again
                return -1
        return v


class DemandPort:
    """A demand channel that survives link failures: readers send through it while
    the run swaps the channel underneath on each (re)connection. While the link is
    down, `ch` is None and requests are dropped: every page still waited for is
    requested again on recovery (Installer.waiting_pages)."""

    def __init__(self, on_lost: Callable[[BaseException, int], None]):
        # (channel, epoch) swapped as one object, so a user that read it knows which
        # epoch a failure it sees belongs to (a stale one must not drop a new link).
        self.cur: tuple[Channel, int] | None = None
        self.on_lost = on_lost

    def send_request(self, pages) -> None:
        cur = self.cur
        if cur is None:
            return
        try:
            cur[0].send_request(pages)
        except OSError as e:
            self.on_lost(e, cur[1])


class UffdReader(threading.Thread):
    """Reads fault messages from one uffd in batches and requests their pages.
    `link_up` (optional): while it is clear the reader leaves messages in the uffd,
    so faults of blocked vCPUs show as the uffd's `pending` queue."""

    def __init__(self, name: str, uf: Uffd, installer: Installer, ch, vcpus: VcpuMap,
                 stop_fd: int, on_error: Callable[[BaseException], None] | None = None,
                 cpu: int | None = None, link_up: threading.Event | None = None):
        super().__init__(name=name, daemon=True)
        self.cpu = cpu
        self.uf, self.installer, self.ch, self.vcpus, self.stop_fd = uf, installer, ch, vcpus, stop_fd
        self.stats = installer.tel.add_reader(name)
        self.on_error = on_error
        self.link_up = link_up
        self.stopping = False

    def run(self) -> None:
        st = self.stats
        st.tid = threading.get_native_id()
        pin(self.cpu)
        uf, inst, ch, vmap = self.uf, self.installer, self.ch, self.vcpus
        base, shift = inst.base, inst.page_size.bit_length() - 1
        note, unpack = inst.note_fault, UFFD_MSG.iter_unpack
        poller = select.poll()
        poller.register(uf.fd, select.POLLIN)
        poller.register(self.stop_fd, select.POLLIN)
        try:
            while not self.stopping:
                # poll, then one read for the whole batch: 2 syscalls per wake-up
                poller.poll()
                if self.link_up is not None and not self.link_up.is_set():
                    self.link_up.wait(0.05)  # the link is down: leave faults queued in the uffd
                    continue
                raw = uf.read_raw(64)
                if not raw:
                    continue
                t = _monotonic_ns()
                need = []
                n = 0
                for event, _flags, addr, ptid in unpack(raw):
                    if event != UFFD_EVENT_PAGEFAULT:
                        continue
                    n += 1
                    page = (addr - base) >> shift
                    if note(page, vmap.get(ptid), t):
                        need.append(page)
                if need:
                    ch.send_request(need)
                    inst.tel.requests += 1
                st.msgs += n
                st.reads += 1
                st.busy_ns += _monotonic_ns() - t
        except (OSError, ProtocolError) as e:
            if self.on_error and not self.stopping:
                self.on_error(e)


class VcpuExitHandler:
    """vcpu-exit strategy: the vCPU thread that got the memory-fault exit fetches
    its own page on its own channel, installs it, and goes back into the guest."""

    def __init__(self, installer: Installer, channels: list, link_up: threading.Event | None = None,
                 failed: Callable[[], bool] = lambda: False):
        self.installer = installer
        self.channels = channels  # DemandPorts (or Channels when the link cannot fail)
        self.link_up = link_up
        self.failed = failed
        self.bufs = [FrameBuffer(installer.page_size) for _ in channels]
        self.address_sources: set[str] = set()
        self.outside = 0  # exits for addresses outside guest data memory (not ours to fix)

    def on_memory_fault(self, vcpu: int, host_addr: int, address_source: str) -> bool:
        t0 = _monotonic_ns()
        inst = self.installer
        self.address_sources.add(address_source)
        page = (host_addr - inst.base) // inst.page_size
        if not 0 <= page < inst.npages or not 0 <= vcpu < len(self.channels):
            self.outside += 1
            return False
        while not inst.present[page]:
            port, buf = self.channels[vcpu], self.bufs[vcpu]
            cur = port.cur if isinstance(port, DemandPort) else (port, None)
            if cur is None:  # link down: this vCPU waits here until it is back (or the run fails)
                if self.failed():
                    raise ProtocolError("the link is gone")
                self.link_up.wait(0.05)
                continue
            ch, epoch = cur
            try:
                ch.send_request((page,))
                inst.tel.requests += 1
                f = ch.recv_demand_page(buf.view)
            except (OSError, LinkClosed) as e:  # a frame cut by the link closing is a link failure
                if epoch is None:
                    raise
                port.on_lost(e, epoch)
                continue
            if f is None:
                if epoch is None:
                    raise ProtocolError(f"vCPU {vcpu}: the link closed")
                port.on_lost(LinkClosed("end of stream"), epoch)
                continue
            if f.start != page:
                raise ProtocolError(f"vCPU {vcpu}: asked for page {page}, got {f}")
            inst.install_page(f.kind, f.start, buf.addr)
        inst.tel.stall(vcpu, _monotonic_ns() - t0)
        return True

    def close(self) -> None:
        for b in self.bufs:
            b.close()
